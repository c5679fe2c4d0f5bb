"""Re-apply the dense-over-keypoint claim rule (``CausalConfig.dense_over_keypoint``) to an evaluation folder whose
`siftlens spurious` run selected its claims without it, so flag and prompt can be re-run on the new claims without
re-running discovery (the rule reads only the claimed units' families and effects, which shortcuts.json keeps):

    python benchmarks/shortcut_suite/reselect_claims.py --eval RUN/eval --out RUN/eval_rule
    python benchmarks/shortcut_suite/evaluate.py run --run RUN --eval-dir eval_rule --spurious-args "..."

The copy keeps the spurious and location runs (evaluate.py skips a step whose output exists) and drops the flag and
prompt outputs, which the second command makes again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from siftlens.io import atomic_write_json
from siftlens.spurious.causal import CausalConfig, dense_set_aside


def reselect(units: list[dict], cfg: CausalConfig) -> list[dict]:
    """The units ``ShortcutSet.select`` keeps under ``cfg``'s rule, given the top claim per family of each class."""
    if not units:
        return units
    df = pd.DataFrame(units)
    drop = pd.concat([dense_set_aside(g, cfg) for _, g in df.groupby("cls")])
    return [u for i, u in enumerate(units) if not drop.loc[i]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", required=True, type=Path, help="an evaluate.py output folder (with spurious/)")
    ap.add_argument("--out", required=True, type=Path, help="new evaluation folder (must not exist)")
    ap.add_argument("--dense-over-keypoint", type=float, default=CausalConfig().dense_over_keypoint)
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"--out {args.out}: exists")
    top = args.eval.resolve()

    def results(folder: str, names: list[str]) -> list[str]:
        # the top level's flag, prompt and result files, and every run lock (the copy is no run in progress)
        locks = [n for n in names if n == ".siftlens.lock"]
        if Path(folder).resolve() != top:
            return locks
        return locks + [n for n in names if n == "flag" or n.startswith("prompt_") or n.endswith((".json", ".md"))]

    shutil.copytree(args.eval, args.out, ignore=results)
    path = args.out / "spurious" / "shortcuts.json"
    sj = json.loads(path.read_text())
    kept = reselect(sj["units"], CausalConfig(dense_over_keypoint=args.dense_over_keypoint))
    for u in sj["units"]:
        print(("kept   " if u in kept else "dropped"), u["class_name"], u["family"], u["unit"],
              f"effect {u['causal_effect']:.3f}")
    sj["units"] = kept
    atomic_write_json(path, sj)


if __name__ == "__main__":
    main()
