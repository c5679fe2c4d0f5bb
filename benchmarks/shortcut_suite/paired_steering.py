"""Paired bootstrap of gated ``mask_tokens`` accuracy between two eval dirs of the same run (same models, images).

    python benchmarks/shortcut_suite/paired_steering.py --new eval --old eval_nocast RUN [RUN ...]

Per test group (conflict, aligned, none): accuracy with OLD's and NEW's steering and the mean paired difference
(NEW - OLD, image by image) with a 95% bootstrap CI (2000 draws, seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def steered(run: Path, eval_dir: str) -> pd.DataFrame:
    p = pd.read_parquet(run / eval_dir / "prompt_mask_tokens" / "predictions.parquet")
    # predictions.parquet holds the paths as the CLI was given them: make them relative to the run like test.csv
    rel = [str(Path(x).resolve().relative_to(run.resolve())) if Path(x).is_absolute() else x for x in p["path"]]
    return pd.DataFrame({"path": rel, eval_dir: p["pred_steered"].to_numpy()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--new", default="eval")
    ap.add_argument("--old", default="eval_nocast")
    a = ap.parse_args(argv)
    for run in map(Path, a.runs):
        m = pd.read_csv(run / "test.csv").merge(steered(run, a.new), on="path").merge(steered(run, a.old), on="path")
        rng = np.random.default_rng(0)
        out = [f"{run.parent.parent.name}/{run.parent.name}"]
        for g in ("conflict", "aligned", "none"):
            s = m[m["group"] == g]
            new, old = (s[a.new] == s["label"]).to_numpy(float), (s[a.old] == s["label"]).to_numpy(float)
            d = new - old
            lo, hi = np.quantile(d[rng.integers(0, len(d), (2000, len(d)))].mean(1), [0.025, 0.975])
            out.append(f"{g}: {old.mean():.3f} -> {new.mean():.3f}, diff {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
                       f"(n={len(d)})")
        print(" | ".join(out))


if __name__ == "__main__":
    main()
