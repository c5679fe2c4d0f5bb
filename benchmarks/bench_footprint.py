"""Footprint map: the exact closed form of `semantic_maps.keypoint_mass` against the 32-chord integration
it replaced (issue 14), in one run.

    python benchmarks/bench_footprint.py
    python benchmarks/bench_footprint.py --sizes 128 224 --rounds 31

For each input size, the bundled images are preprocessed like the bundled model (128 px: its own
preprocessing; other sizes: resize + centre crop, ImageNet crop 0.875) to the 8-bit grey model input, and
the three keypoint sets whose footprint map analyze builds per image are made once: OpenCV SIFT, the
`random_kp` baseline (seeded as in `keypoint_maps`) and ORB. Each round times one pass of `keypoint_mass`
(footprint, response weights, patch 16) over all images and all three sets, old and new in alternating
order; the median round, per image, is printed with the ratio old/new. Accuracy: the max abs difference of
the normalised maps (concentration) new vs old (32 chords, the old default), and vs the old rule at 4096
chords (its error shrinks towards the closed form as the chords grow).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from siftlens.models import load_model
from siftlens.preprocess import Preprocess, load_rgb
from siftlens.semantic_maps import (
    Keypoints,
    MapConfig,
    concentration,
    detect_orb,
    detect_sift,
    keypoint_mass,
    random_keypoints_like,
)

BUNDLED_IMAGES = Path(__file__).resolve().parents[1] / "src" / "siftlens" / "bundled" / "images"


# --- the old implementation (main at 228e8b9), copied as the reference ---
def old_keypoint_mass(kp: Keypoints, grid: tuple[int, int], patch: int, mode: str = "footprint",
                      weight: str = "response", samples: int = 32) -> np.ndarray:
    """The old footprint map with response weights (the only mode timed here; same call as keypoint_mass)."""
    if (mode, weight) != ("footprint", "response"):
        raise ValueError("the copied reference covers mode='footprint', weight='response' only")
    h, w = grid
    if len(kp) == 0:
        return np.zeros(h * w)
    wk = kp.response.copy()
    r = np.maximum(kp.size / 2, 1e-6)  # [K]
    cx, cy = kp.xy[:, 0], kp.xy[:, 1]
    first = np.floor((cx - r) / patch).astype(int)  # first patch column the disc touches
    row0 = np.floor((cy - r) / patch).astype(int)  # first patch row
    col_span = np.floor((cx + r) / patch).astype(int) - first + 1
    row_span = np.floor((cy + r) / patch).astype(int) - row0 + 1
    flat_index, share = [], []
    for cs, rs in sorted(set(zip(col_span.tolist(), row_span.tolist()))):
        sel = np.flatnonzero((col_span == cs) & (row_span == rs))
        fi, sh = _old_footprint_shares(cx[sel], cy[sel], r[sel], wk[sel], first[sel], row0[sel], cs, rs, grid,
                                       patch, samples)
        flat_index.append(fi)
        share.append(sh)
    return np.bincount(np.concatenate(flat_index), weights=np.concatenate(share), minlength=h * w)


def _old_footprint_shares(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, wk: np.ndarray, first: np.ndarray,
                          row0: np.ndarray, span: int, rspan: int, grid: tuple[int, int], patch: int, samples: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    h, w = grid
    col = first[:, None] + np.arange(span)  # [K, C] columns the disc touches
    a = np.maximum(col * patch, (cx - r)[:, None])  # [K, C] x-extent of disc within each column
    b = np.minimum((col + 1) * patch, (cx + r)[:, None])
    valid = (b > a) & (col >= 0) & (col < w)
    t = (np.arange(samples) + 0.5) / samples  # [S] midpoints within each column's extent
    x = a[..., None] + (b - a)[..., None] * t  # [K, C, S]
    dx = np.where(valid, b - a, 0.0)[..., None] / samples  # [K, C, 1]
    half = np.sqrt(np.clip(r[:, None, None] ** 2 - (x - cx[:, None, None]) ** 2, 0, None))
    lo, hi = cy[:, None, None] - half, cy[:, None, None] + half  # [K, C, S] vertical chord
    rows = row0[:, None] + np.arange(rspan)  # [K, R] the patch rows the disc reaches
    tops = (rows * patch)[:, None, None, :]  # [K, 1, 1, R]
    overlap = np.clip(np.minimum(hi[..., None], tops + patch) - np.maximum(lo[..., None], tops), 0, None)
    overlap *= ((rows >= 0) & (rows < h))[:, None, None, :]  # rows outside the image hold nothing
    area = (overlap * dx[..., None]).sum(2)  # [K, C, R] disc area in each (column, row) patch
    total = area.sum(axis=(1, 2))  # [K] area inside the image
    keep = total > 0
    share = area[keep] * (wk[keep] / total[keep])[:, None, None]
    flat_index = np.clip(rows[keep], 0, h - 1)[:, None, :] * w + np.clip(col[keep], 0, w - 1)[..., None]
    return flat_index.ravel(), share.ravel()


def keypoint_sets(size: int | None, patch: int) -> tuple[list[list[Keypoints]], tuple[int, int], int]:
    """Per bundled image: [SIFT, random_kp, ORB] keypoints at the given input size (None: the bundled model's)."""
    cfg = MapConfig()
    pre = load_model("vit_tiny_imagenette").preprocess if size is None else Preprocess(input_size=(size, size))
    H, W = pre.input_size
    grid = (H // patch, W // patch)
    paths = sorted(p for p in BUNDLED_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sets = []
    for seed, path in enumerate(paths):
        gray = pre.to_uint8_gray(pre(load_rgb(path)))
        kp = detect_sift(gray, cfg.sift)
        rk = random_keypoints_like(kp, (grid[0] * patch, grid[1] * patch), np.random.default_rng(seed))
        sets.append([kp, rk, detect_orb(gray, cfg.orb_nfeatures)])
    return sets, grid, H


def one_pass(fn, sets: list[list[Keypoints]], grid: tuple[int, int], patch: int) -> float:
    t0 = time.perf_counter()
    for image in sets:
        for kp in image:
            fn(kp, grid, patch, "footprint", "response")
    return time.perf_counter() - t0


def max_map_diff(sets: list[list[Keypoints]], grid: tuple[int, int], patch: int, samples: int) -> float:
    worst = 0.0
    for image in sets:
        for kp in image:
            new = concentration(keypoint_mass(kp, grid, patch, "footprint", "response"))
            old = concentration(old_keypoint_mass(kp, grid, patch, "footprint", "response", samples))
            if new is None or old is None:
                assert new is None and old is None, "one rule gives a map, the other none"
                continue
            worst = max(worst, float(np.abs(new - old).max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 224],
                    help="square input sizes; 0 = the bundled model's own (128 px)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()
    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"{args.rounds} interleaved rounds, patch {args.patch}")
    for size in args.sizes:
        sets, grid, side = keypoint_sets(size or None, args.patch)
        n_img = len(sets)
        n_kp = np.array([[len(k) for k in image] for image in sets])
        old_fn, new_fn = old_keypoint_mass, keypoint_mass
        one_pass(old_fn, sets, grid, args.patch)  # warm-up
        one_pass(new_fn, sets, grid, args.patch)
        t_old, t_new = [], []
        for i in range(args.rounds):
            order = [(old_fn, t_old), (new_fn, t_new)]
            for fn, times in (order if i % 2 == 0 else order[::-1]):
                times.append(one_pass(fn, sets, grid, args.patch))
        old_ms = 1e3 * np.median(t_old) / n_img
        new_ms = 1e3 * np.median(t_new) / n_img
        print(f"\n{side} px, grid {grid[0]}x{grid[1]}, {n_img} bundled images; keypoints per image (mean): "
              f"SIFT {n_kp[:, 0].mean():.0f}, random_kp {n_kp[:, 1].mean():.0f}, ORB {n_kp[:, 2].mean():.0f}")
        print(f"  per image (3 footprint maps), median of {args.rounds} rounds: old {old_ms:.3f} ms, "
              f"new {new_ms:.3f} ms, old/new {old_ms / new_ms:.1f}x")
        print(f"  max |new - old| of the normalised maps: {max_map_diff(sets, grid, args.patch, 32):.2e} "
              f"(old, 32 chords), {max_map_diff(sets, grid, args.patch, 4096):.2e} (old at 4096 chords)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
