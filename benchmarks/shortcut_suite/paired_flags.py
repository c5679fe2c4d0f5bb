"""Paired bootstrap of the flag's AUROCs between two eval dirs of the same run (same model, same test images).

    python benchmarks/shortcut_suite/paired_flags.py --new eval --old eval_grey RUN [RUN ...]
    python benchmarks/shortcut_suite/paired_flags.py --new eval --old eval --new-column unsupported_shortcut RUN

(``--new-column`` / ``--old-column``: which flags.parquet column each side reads, flag_score by default.)

Both targets as evaluate.py scores them: right for the wrong reason (aligned images the model gets right whose
cue-removed twin it gets wrong, among the aligned images it gets right) and conflicting vs rest. Printed per target:
OLD's and NEW's AUROC and NEW - OLD with a 95% CI from 2000 bootstrap draws of the images (seed 0), both scores
read on the same draw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from evaluate import image_key, load_images, probs
from planted.evaluate import auroc

from siftlens.models import load_model
from siftlens.train import normalize


def flag_scores(run: Path, eval_dir: str, test: pd.DataFrame, column: str = "flag_score") -> np.ndarray:
    fl = pd.read_parquet(run / eval_dir / "flag" / "flags.parquet")
    by_path = {image_key(p): s for p, s in zip(fl["path"], fl[column])}
    return np.array([by_path[image_key(p)] for p in test.path], dtype=float)


def paired(new: np.ndarray, old: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> str:
    d = auroc(new, positive) - auroc(old, positive)
    draws = []
    for _ in range(2000):
        b = rng.integers(0, len(new), len(new))
        if 0 < positive[b].sum() < len(b):
            draws.append(auroc(new[b], positive[b]) - auroc(old[b], positive[b]))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return f"{auroc(old, positive):.3f} -> {auroc(new, positive):.3f}, diff {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--new", default="eval")
    ap.add_argument("--old", default="eval_grey")
    ap.add_argument("--new-column", default="flag_score")
    ap.add_argument("--old-column", default="flag_score")
    a = ap.parse_args(argv)
    for run in map(Path, a.runs):
        test = pd.read_csv(run / "test.csv", keep_default_na=False)
        lm = load_model(str(run / "model" / "model.safetensors"))
        has_twin = (test.twin_path != "").to_numpy()
        x = load_images(run, test.path)
        twins = x.clone()
        twins[np.flatnonzero(has_twin)] = load_images(run, test.twin_path[has_twin])
        mean, std = tuple(lm.preprocess.mean), tuple(lm.preprocess.std)
        labels, groups = test.label.to_numpy(), test.group.to_numpy()
        correct = probs(lm, normalize(x, mean, std)).argmax(1) == labels
        twin_correct = probs(lm, normalize(twins, mean, std)).argmax(1) == labels
        aligned_ok = (groups == "aligned") & correct
        rwr = aligned_ok & ~twin_correct
        new, old = flag_scores(run, a.new, test, a.new_column), flag_scores(run, a.old, test, a.old_column)
        rng = np.random.default_rng(0)
        meta = json.loads((run / "variant.json").read_text())
        print(f"{meta['variant']['name']}/{meta['setting']}: right for the wrong reason (n={int(rwr.sum())} of "
              f"{int(aligned_ok.sum())}): {paired(new[aligned_ok], old[aligned_ok], rwr[aligned_ok], rng)} | "
              f"conflicting vs rest: {paired(new, old, groups == 'conflict', rng)}")


if __name__ == "__main__":
    main()
