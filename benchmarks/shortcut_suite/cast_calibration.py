"""How often the colour-cast claim (spurious/cast.py; with --placed, the placed cast's too, placed_cast.py) fires
where no colour is planted: clean images, a trained model (true and permuted labels) and random-weights models. Runs
only the cast check, as `siftlens spurious` runs it (the same causal sample, config and seed), so a calibration costs
minutes, not a whole discovery.

    python benchmarks/shortcut_suite/cast_calibration.py --images runs/calibration/A40 --out runs/cast_calib.csv \
        --permute 1 2 --random-init 0 1 2 [--placed]

One row per (run, class) with the cast's columns (and the placed cast's); the printed summary counts claims per run.
A claim on a random-weights model or with permuted labels is a false positive by construction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from siftlens.image_source import find_images, read_labels
from siftlens.models import load_model
from siftlens.spurious.cast import cast_check, class_casts, image_colours
from siftlens.spurious.causal import CausalConfig, sample_images
from siftlens.spurious.placed_cast import class_cast_maps, image_cells, placed_cast_check
from siftlens.spurious.source import PathSource


def cast_table(lm, images: Path, labels: np.ndarray, cfg: CausalConfig, placed: bool = False) -> pd.DataFrame:
    """The cast check of one model on ``images`` with ``labels`` (one per file, class index); ``placed``: the placed
    cast check too, for the classes whose cast is not claimed (as `spurious --placed-casts` runs it)."""
    source = PathSource(lm, find_images(images), images)  # images read on demand
    probs = []
    with torch.no_grad():
        for _, batch in source.batches(cfg.batch_size):
            probs.append(lm.forward(batch).float().softmax(-1).numpy())
    probs = np.concatenate(probs).astype(np.float64)
    K = int(labels.max()) + 1
    colours, grey_change = image_colours(lm, source, len(labels), cfg.batch_size)
    casts = class_casts(colours, labels, K)
    sample = sample_images(labels, K, cfg.causal_images, cfg.seed)
    out = cast_check(lm, source, casts, grey_change, sample, labels[sample], probs[:, :K], cfg)
    if placed:
        maps = class_cast_maps(image_cells(source, len(labels), cfg.batch_size), labels, K)
        grid = lm.layout(tuple(source.input_hw)).grid
        out = out.merge(placed_cast_check(lm, source, maps, sample, labels[sample], probs[:, :K], cfg, grid,
                                          set(out.loc[out["cast_claimed"], "cls"].tolist())), on="cls")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="ImageFolder of clean images (calibration_images.py)")
    ap.add_argument("--model", default="vit_tiny_imagenette", help="model spec (default: the bundled model)")
    ap.add_argument("--permute", type=int, nargs="*", default=[], help="label-permutation seeds to run as well")
    ap.add_argument("--random-init", type=int, nargs="*", default=[], help="random-weights seeds to run as well")
    ap.add_argument("--placed", action="store_true", help="the placed cast check too (spurious --placed-casts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    images = Path(a.images)
    y, names = read_labels(find_images(images), None, images)
    y = np.asarray(y)
    cfg = CausalConfig()
    runs = [("trained, true labels", load_model(a.model), y)]
    runs += [(f"trained, labels permuted ({s})", runs[0][1], np.random.default_rng(s).permutation(y))
             for s in a.permute]
    runs += [(f"random weights ({s})", load_model(a.model, random_init=True, seed=s), y) for s in a.random_init]
    tables = []
    for name, lm, labels in runs:
        t = cast_table(lm, images, labels, cfg, a.placed)
        t.insert(0, "run", name)
        t.insert(2, "class", [names[k] for k in t["cls"]])
        tables.append(t)
        print(f"{name}: {int(t['cast_claimed'].sum())}/{len(t)} casts claimed; sufficiency_lo max "
              f"{t['cast_sufficiency_lo'].max():.3f}, flip max {t['cast_flip'].max():.2f}"
              + (f"; placed: {int(t['place_claimed'].sum())} claimed, sufficiency_lo max "
                 f"{t['place_sufficiency_lo'].max():.3f}, flip max {t['place_flip'].max():.2f}" if a.placed else ""),
              flush=True)
    out = pd.concat(tables, ignore_index=True)
    out.to_csv(a.out, index=False)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
