"""The issue's steering lines (evaluate.py ``goals``) of finished runs under several eval dirs (e.g. one discovery
steered with two gates), side by side: per run and eval dir, the lines met, the share of the oracle's worst-group
headroom and the cue-free group's accuracy with the share of cue-free images touched. Files only (eval.json).

    python benchmarks/shortcut_suite/steering_lines.py --eval-dir eval eval_rwf --run RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluate import goals

STEERING = ("worst-group gain", "average_", "worst group beats")  # goals() keys of the steering lines


def steering_lines(result: dict) -> dict:
    """Of one eval.json: the steering lines met / judged (an 'n/a' line is not judged), the worst-group share of
    the oracle's headroom (None without headroom), cue-free accuracy and the share of cue-free images touched."""
    lines = {k: v for k, v in goals(result).items() if k.startswith(STEERING)}
    judged = [v for v in lines.values() if not v.startswith("n/a")]
    acc = result["accuracy"]
    out = {"met": sum(v.startswith("met") for v in judged), "judged": len(judged), "share": None,
           "none_acc": acc.get("mask_tokens", {}).get("none"),
           "touched_none": (result.get("mask_tokens_steered_share") or {}).get("none"), "lines": lines}
    if "mask_tokens" in acc and "oracle_tokens" in acc:
        headroom = acc["oracle_tokens"]["worst_group"] - acc["none"]["worst_group"]
        if headroom > 0:
            out["share"] = (acc["mask_tokens"]["worst_group"] - acc["none"]["worst_group"]) / headroom
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs="+", required=True)
    p.add_argument("--eval-dir", nargs="+", default=["eval"])
    a = p.parse_args(argv)
    total = {e: [0, 0] for e in a.eval_dir}
    for run in map(Path, a.run):
        for e in a.eval_dir:
            if not (run / e / "eval.json").is_file():
                print(f"{run} {e}: no eval.json (not evaluated)")
                continue
            r = steering_lines(json.loads((run / e / "eval.json").read_text()))
            total[e][0] += r["met"]
            total[e][1] += r["judged"]
            share = "n/a" if r["share"] is None else f"{r['share']:.0%}"
            none = "n/a" if r["none_acc"] is None else f"{r['none_acc']:.3f}"
            touched = "n/a" if r["touched_none"] is None else f"{r['touched_none']:.1%}"
            missed = "; ".join(k + " " + v for k, v in r["lines"].items() if v.startswith("not met"))
            print(f"{run} {e}: {r['met']}/{r['judged']} steering lines met, worst-group share {share}, cue-free "
                  f"accuracy {none} (touched {touched}){' | not met: ' + missed if missed else ''}")
    for e, (met, judged) in total.items():
        print(f"total {e}: {met}/{judged} steering lines met")


if __name__ == "__main__":
    main()
