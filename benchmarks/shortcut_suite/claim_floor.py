"""How large are the effects of the units a shortcut claim could pick, run by run? For fixing and checking the
claim's effect floor (``CausalConfig.shortcut_min_effect``, `siftlens spurious --min-effect`).

    python benchmarks/shortcut_suite/claim_floor.py --runs runs/cal/rand*_gw0 --floors 0.001 0.005 0.01 0.02

Per `siftlens spurious` output folder (its ``motifs.csv``), per class: the largest effect of a unit that passes
every other part of the claim (class-specific, label-permutation p <= alpha; the claim itself takes the
causal top of those), and how many classes would get a claim at each floor. On random weights every claim is
false, so the largest such effect over many random models is what a floor has to sit above; on planted runs
the true cues' effects are what it has to stay below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from siftlens.spurious.causal import CausalConfig, by_effect, is_specific, shortcut_candidates


def claimable(units: pd.DataFrame, cfg: CausalConfig) -> pd.DataFrame:
    """Per class, the unit a claim would take with no effect floor (the causal top of the class's specific,
    significant units), with its effect; classes without one are left out."""
    rows = []
    for k in sorted(units["cls"].unique()):
        cand = by_effect(shortcut_candidates(units, int(k), cfg))
        if len(cand):
            rows.append(cand.iloc[0])
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="`siftlens spurious` output folders")
    ap.add_argument("--floors", nargs="+", type=float, default=[0.001, 0.005, 0.01, 0.02, 0.05])
    args = ap.parse_args()
    cfg = CausalConfig(shortcut_min_effect=-np.inf)  # every effect; the floors are applied below
    print("| run | classes | largest effect: any unit / class-specific unit | claimable without a floor (unit: effect) "
          "| largest | "
          + " | ".join(f"claims at {f:g}" for f in args.floors) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.floors))
    for run in args.runs:
        units = pd.read_csv(Path(run) / "motifs.csv")
        c = claimable(units, cfg)
        eff = c["causal_effect"].to_numpy() if len(c) else np.zeros(0)
        listed = ", ".join(f"{r['class']} {r['unit']}: {r['causal_effect']:.4f}" for _, r in c.iterrows()) or "none"
        counts = " | ".join(str(int((eff > f).sum())) for f in args.floors)
        spec = units[is_specific(units, cfg)]
        print(f"| {run} | {units['cls'].nunique()} | {units['causal_effect'].max():.4f} / "
              f"{spec['causal_effect'].max() if len(spec) else float('nan'):.4f} | {listed} | "
              f"{eff.max() if len(eff) else float('nan'):.4f} | {counts} |")


if __name__ == "__main__":
    main()
