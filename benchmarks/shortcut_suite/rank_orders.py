""""Cue located" of a `siftlens spurious` run's top unit under two orders of the same motifs.csv: its ``causal_rank``
1 (as the run's siftlens wrote it: held-out round 32's frozen cb8515d ranked by evidence per masked token among the
units a claim could rest on; before and after it, by effect; since session 36 by effect with a smaller unit inside a
larger one that removes as much in its place, ``causal.parsimonious_rank``) and the largest ``causal_effect``, with
how many of the run's claims sit at their cue. Files only, no forwards.

    python benchmarks/shortcut_suite/rank_orders.py --eval-dir eval RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from evaluate import claims_located, located, run_geometry

ORDERS = ("causal_rank", "largest_effect")


def top_units(motifs: pd.DataFrame, order: str) -> pd.DataFrame:
    """Each class's top unit (indexed by cls) under ``order``."""
    ranked = motifs[motifs["causal_rank"].notna()]
    if order == "causal_rank":
        top = ranked[ranked["causal_rank"] == 1]
    else:
        top = ranked.sort_values("causal_effect", ascending=False, kind="stable").groupby("cls").head(1)
    return top.set_index("cls")


def located_by_order(run: Path, eval_dir: str) -> dict[str, dict]:
    names, disc, size, patch = run_geometry(run)
    motifs = pd.read_csv(run / eval_dir / "spurious" / "motifs.csv")
    out = {}
    for order in ORDERS:
        top = top_units(motifs, order)
        centres = {c: ((top.box_x0[c] + top.box_x1[c]) / 2, (top.box_y0[c] + top.box_y1[c]) / 2) for c in top.index}
        tokens = {c: [int(t) for t in str(top.tokens[c]).split()] for c in top.index}
        r = located(centres, disc, len(names), size, patch, tokens)
        r["missed_units"] = {int(c): str(top.unit[c]) for c, v in enumerate(r["per_class"]) if v is False
                             and c in top.index}
        out[order] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--eval-dir", default="eval")
    args = ap.parse_args()
    total = {o: [0, 0] for o in ORDERS}
    for run in args.runs:
        res = located_by_order(run, args.eval_dir)
        cells = []
        for o in ORDERS:
            r = res[o]
            hit = sum(bool(v) for v in r["per_class"])
            total[o][0] += hit
            total[o][1] += r["n_judged"]
            cells.append(f"{o} {hit}/{r['n_judged']} (missed: {', '.join(r['missed_units'].values()) or '-'})")
        claims = claims_located(run, args.eval_dir)
        cells.append(f"claims at their cue {sum(c['located'] for c in claims)}/{len(claims)}")
        print(f"{run}: " + "; ".join(cells))
    print("all: " + "; ".join(f"{o} {h}/{n}" for o, (h, n) in total.items()))


if __name__ == "__main__":
    main()
