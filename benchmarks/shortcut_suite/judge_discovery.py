"""Judge one `siftlens spurious` run on a generated suite run, discovery only (no flag / prompt): per class, is the
top causal unit at the planted cue, which unit is claimed as the shortcut, is the claimed unit at the cue, and its
effect. A quick dev check of a discovery change (`evaluate.py run` does all of it, with steering, in ~30 min).

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
from shortcut_suite.evaluate import located, method_centres, method_tokens  # noqa: E402


def judge(run: Path, spurious: Path) -> dict:
    disc = pd.read_csv(run / "discovery.csv")
    meta = json.loads((run / "model" / "model.json").read_text())
    size = int(meta["input_size"][-1])
    patch = size // 8
    names = sorted(disc["class_name"].unique(), key=lambda n: int(disc[disc.class_name == n].label.iloc[0]))
    k = len(names)
    _, centres = method_centres(spurious, names)
    top = located(centres, disc, k, size, patch, method_tokens(spurious, names))
    units = json.loads((spurious / "shortcuts.json").read_text())["units"]
    claim_centres, claim_tokens, claims = {}, {}, {}
    for u in units:
        x0, y0, x1, y1 = u["box"]
        claim_centres[u["cls"]] = ((x0 + x1) / 2, (y0 + y1) / 2)
        claim_tokens[u["cls"]] = u["tokens"]
        claims[u["cls"]] = u
    at_cue = located(claim_centres, disc, k, size, patch, claim_tokens)
    motifs = pd.read_csv(spurious / "motifs.csv")
    rows = []
    for c in range(k):
        u = claims.get(c)
        eff = (float(motifs[(motifs.cls == c) & (motifs.unit == u["unit"])].causal_effect.iloc[0]) if u else None)
        rows.append({"class": names[c], "top_at_cue": top["per_class"][c], "claim": u["unit"] if u else "",
                     "claim_at_cue": at_cue["per_class"][c] if u else None, "claim_effect": eff})
    return {"located": top["rate"], "chance": top["chance"], "claims": len(claims),
            "claims_at_cue": sum(bool(r["claim_at_cue"]) for r in rows), "per_class": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a generated (variant, setting, seed) folder")
    ap.add_argument("--spurious", nargs="+", required=True, help="`siftlens spurious` output folders on its discovery")
    args = ap.parse_args()
    for sp in args.spurious:
        r = judge(Path(args.run), Path(sp))
        print(f"{sp}: located {r['located']:.2f} (chance {r['chance']:.2f}), claims {r['claims']}, "
              f"at the cue {r['claims_at_cue']}")
        for row in r["per_class"]:
            eff = f" effect {row['claim_effect']:.4f}" if row["claim_effect"] is not None else ""
            print(f"  {row['class']:<20} top at cue {row['top_at_cue']!s:<5} claim {row['claim'] or '-':<28} "
                  f"at cue {row['claim_at_cue']!s:<5}{eff}")


if __name__ == "__main__":
    main()
