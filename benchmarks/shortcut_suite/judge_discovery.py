"""Judge one `siftlens spurious` run on a generated suite run, discovery only (no flag / prompt): per class, is the
top causal unit at the planted cue, which units are claimed as shortcuts (one per unit family at most), is each
at the cue, and its effect. A quick dev check of a discovery change (`evaluate.py run` does all of it, with
steering, in ~30 min).

    python benchmarks/shortcut_suite/judge_discovery.py --run runs/suite/dev_stripe_frame_2/scratch/s0 \
        --spurious runs/dev5/f2_gw0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shortcut_suite.evaluate import located, method_centres, method_tokens, model_patch  # noqa: E402


def judge(run: Path, spurious: Path) -> dict:
    disc = pd.read_csv(run / "discovery.csv")
    meta = json.loads((run / "model" / "model.json").read_text())
    size = int(meta["input_size"][-1])
    # the model's own patch (a ViT/16 at 96 px has a 6 x 6 grid; size // 8 assumed an 8 x 8 one), from its weights
    patch = model_patch(run / "model")
    names = sorted(disc["class_name"].unique(), key=lambda n: int(disc[disc.class_name == n].label.iloc[0]))
    k = len(names)
    _, centres = method_centres(spurious, names)
    top = located(centres, disc, k, size, patch, method_tokens(spurious, names))
    sj = json.loads((spurious / "shortcuts.json").read_text())
    units, first_dense = sj["units"], len(sj["centroids"]) - sj.get("dense_words", 0)
    motifs = pd.read_csv(spurious / "motifs.csv")
    claims: dict[int, list[dict]] = {c: [] for c in range(k)}  # a class may have one claim per unit family
    for u in units:
        x0, y0, x1, y1 = u["box"]
        at = located({u["cls"]: ((x0 + x1) / 2, (y0 + y1) / 2)}, disc, k, size, patch, {u["cls"]: u["tokens"]})
        eff = float(motifs[(motifs.cls == u["cls"]) & (motifs.unit == u["unit"])].causal_effect.iloc[0])
        family = u.get("family", "dense" if u["word"] >= first_dense else "keypoint")  # files before families
        claims[u["cls"]].append({"unit": u["unit"], "family": family,
                                 "at_cue": at["per_class"][u["cls"]], "effect": eff})
    rows = [{"class": names[c], "top_at_cue": top["per_class"][c], "claims": claims[c]} for c in range(k)]
    return {"located": top["rate"], "chance": top["chance"], "claims": sum(bool(v) for v in claims.values()),
            "claims_at_cue": sum(any(u["at_cue"] for u in v) for v in claims.values()),
            "off_cue_units": sum(u["at_cue"] is False for v in claims.values() for u in v), "per_class": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a generated (variant, setting, seed) folder")
    ap.add_argument("--spurious", nargs="+", required=True, help="`siftlens spurious` output folders on its discovery")
    args = ap.parse_args()
    for sp in args.spurious:
        r = judge(Path(args.run), Path(sp))
        where = ("n/a (global cue)" if r["located"] is None
                 else f"{r['located']:.2f} (chance {r['chance']:.2f})")
        print(f"{sp}: located {where}, classes claimed {r['claims']}, "
              f"with a claim at the cue {r['claims_at_cue']}, claimed units off the cue {r['off_cue_units']}")
        for row in r["per_class"]:
            claimed = "; ".join(f"{u['unit']} ({u['family']}) at cue {u['at_cue']} effect {u['effect']:.4f}"
                                for u in row["claims"]) or "-"
            print(f"  {row['class']:<20} top at cue {row['top_at_cue']!s:<5} claims: {claimed}")


if __name__ == "__main__":
    main()
