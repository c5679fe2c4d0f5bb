"""The fixed-seed analyze run that tests/test_analyze_reference.py compares against a stored reference.

The reference tables in tests/data/analyze_reference/ were written by this module with the code of main at
commit 86f5ab2 (before the issue-14 speed work), rewritten once when the footprint areas became exact (issue 14:
the 32-chord integration's ~1e-3 error removed; the moves are listed in that commit):
``python -m tests.analyze_reference`` rewrites them (only do that when a statistic is meant to change, and say
so in the commit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

QKV_SCALE = 6.0
REFERENCE = Path(__file__).parent / "data" / "analyze_reference"
BUNDLED = Path(__file__).parents[1] / "src" / "siftlens" / "bundled" / "images"
# (name, analyze options): the default swap null with its twin, and the within-image shift null
RUNS = {
    "swap": dict(null_mode="swap", twin="random-init", twin_images=4, examples=2),
    "shift": dict(null_mode="shift", null_permutations=30, twin="none", examples=0),
}


def tiny_model():
    from timm.models.vision_transformer import VisionTransformer

    from siftlens.models import from_module
    from siftlens.preprocess import Preprocess

    torch.manual_seed(0)
    module = VisionTransformer(img_size=64, patch_size=8, depth=3, embed_dim=48, num_heads=3, num_classes=5)
    with torch.no_grad():  # sharper attention than random init's near-uniform maps: statistics far from 1
        for block in module.blocks:
            block.attn.qkv.weight.mul_(QKV_SCALE)
    lm = from_module(module)
    lm.preprocess = Preprocess((64, 64), crop_pct=None)
    return lm


def run(name: str, out: Path):
    """Analyse the bundled images with the tiny model into ``out``; returns analyze's result."""
    from siftlens.analyze import analyze

    with torch.inference_mode(False):
        return analyze(tiny_model(), images=BUNDLED, out=out, workers=0, batch_size=3, seed=7, report=False,
                       progress=False, **RUNS[name])


TABLES = ("per_image.parquet", "images.parquet", "twin/per_image.parquet", "twin/images.parquet")


def strip_paths(table: Path) -> None:
    """Keep only the file name in a stored table's ``path`` column (the test compares names; no machine's
    absolute paths in the repository)."""
    import pandas as pd

    df = pd.read_parquet(table)
    if "path" in df:
        df["path"] = [Path(p).name for p in df["path"]]
        df.to_parquet(table, index=False)


def main() -> None:
    import shutil
    import tempfile

    import numpy as np

    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(name, Path(tmp) / name).out
            for table in TABLES:
                if (out / table).is_file():
                    dst = REFERENCE / name / table
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(out / table, dst)
                    strip_paths(dst)
            with np.load(out / "lift.npz") as z:
                np.savez_compressed(REFERENCE / name / "lift.npz", obs=z["obs"], exp=z["exp"])
    print(f"wrote {REFERENCE}", file=sys.stderr)


if __name__ == "__main__":
    main()
