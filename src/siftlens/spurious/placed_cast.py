"""Colour casts with a place: a class's colour beyond the classes' mean, per cell of a coarse grid (a background tint).

A global cast (cast.py) is one colour for the whole image. A tint blended only into the background leaves the object
its colours, so the class's mean colour, pasted over a whole image, moves few other classes' images to the class
(dev round 20: casts claimed for 1-2 of 5 classes), and no colour removal undoes it without changing most cue-free
predictions (bg_cast_probe.py). A placed cast keeps where the colour sits:

- class k's cast map ``map_k`` [3, G, G] = the mean colour of class k's discovery images in each cell of a G x G grid
  minus the mean over classes of that cell's class means (normalised input space);
- claim (sufficiency, as for casts): other classes' sample images with their own class's map swapped for class k's
  (``x - up(map_y) + up(map_k)``: the colours a conflicting image carries, where they sit), against the same swap
  with each cell of ``map_k`` turned to a random direction of the same length (as strong a colour change in the same
  places). Claimed where the rise of p_k beyond the control has its CI lower bound >= ``shortcut_sufficiency`` and
  at least ``MIN_FLIP`` of the recipients are then predicted as k;
- its place: the tokens whose centre lies where the map's strength (each cell's norm over the strongest cell's, 0
  below 1/4, 1 above 3/4, interpolated between cells) is above 1/2;
- a claimed placed cast becomes a token unit of family ``cast_place`` (kind ``region``, no word): flag and the
  counterfactual gate remove it by masking its place, in images predicted as its class only (a background ring is
  the same place for every class). Masking the place, not editing colour: on two dev background tints the
  predicted class's place masked and gated (every class's map, probe) steered conflicting images to 0.25 / 0.18
  (cue-removed twin 0.31 / 0.44, token oracle 0.30 / 0.32) and flagged right-for-the-wrong-reason images at 0.86 /
  0.66 (1 - max softmax 0.48 / 0.66); colour edits moved most cue-free predictions or did nothing. In the method,
  beside its other units, it added +0.04 conflicting accuracy on one dev model and +0.07 to the flag on the other
  (RESULTS.md, "Dev round 21").

Tested only for classes whose global cast is not claimed (a whole-image tint is a cast; its place would be every
token). A colour measurement, SIFT-free: the report says so. Off by default (``CausalConfig.placed_casts``):
held-out round 21 (two new background tints) found a placed cast for every class without a cast and raised the
right-for-the-wrong-reason flag by 0.08 / 0.10, but its steering gain (+0.03 / +0.06) was not separable from zero
and it cost 17-18 aligned points, so its pre-set line failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..models import LoadedModel
from ..resume import Part, RunParts
from .cast import MIN_FLIP, _ci, edit_probs, pixel_range

MAP_GRID = 4  # cells per side of a cast map: coarse enough for 40 images a class to estimate, fine enough for a ring
FAMILY = "cast_place"


@torch.no_grad()
def image_cells(source, n: int, batch_size: int, parts: RunParts | None = None) -> np.ndarray:
    """Each readable image's mean colour per cell [n, 3, G, G] (normalised input space), one read of every image."""
    parts = parts or RunParts.memory()

    def chunk(c: int) -> Part:
        x = source.get(np.arange(c * batch_size, min((c + 1) * batch_size, n))).float()
        return Part(arrays={"cells": F.adaptive_avg_pool2d(x, MAP_GRID).numpy().astype(np.float64)})

    done = list(parts.run("cast_cells", -(-n // batch_size), chunk))
    return (np.concatenate([p.arrays["cells"] for p in done]) if done
            else np.zeros((0, 3, MAP_GRID, MAP_GRID)))


def class_cast_maps(cells: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """[K, 3, G, G]: each class's mean cell colours minus the mean over classes (classes without images: 0)."""
    means = np.stack([cells[labels == k].mean(0) if (labels == k).any() else np.full(cells.shape[1:], np.nan)
                      for k in range(K)])
    return np.nan_to_num(means - np.nanmean(means, 0))


def _up(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, C, G, G] -> [B, C, H, W], bilinear (the map's cells blend into each other, no seams)."""
    return F.interpolate(maps, size=hw, mode="bilinear", align_corners=False)


def cast_place(cast_map: np.ndarray, grid: tuple[int, int], input_hw: tuple[int, int]) -> np.ndarray:
    """bool [h * w]: the tokens of a ``grid`` whose centre lies where ``cast_map`` [3, G, G] is strong (module
    docstring); none for a map that is zero."""
    norm = np.linalg.norm(cast_map, axis=0)
    if norm.max() <= 0:
        return np.zeros(grid[0] * grid[1], bool)
    ramp = np.clip((norm / norm.max() - 0.25) / 0.5, 0, 1)
    weight = _up(torch.as_tensor(ramp, dtype=torch.float32)[None, None], input_hw)[0, 0].numpy()
    (H, W), (h, w) = input_hw, grid
    rows = ((np.arange(h) + 0.5) * H / h).astype(int)
    cols = ((np.arange(w) + 0.5) * W / w).astype(int)
    return (weight[rows[:, None], cols[None, :]] > 0.5).reshape(-1)


def random_directions(cast_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``cast_map`` [3, G, G] with each cell's colour vector turned to a random direction, its length kept."""
    v = rng.standard_normal(cast_map.shape)
    v /= np.linalg.norm(v, axis=0, keepdims=True)
    return v * np.linalg.norm(cast_map, axis=0, keepdims=True)


@torch.no_grad()
def map_edit_probs(lm: LoadedModel, source, jobs: Sequence[tuple[int, np.ndarray]], batch_size: int = 64,
                   parts: RunParts | None = None, columns: np.ndarray | None = None) -> np.ndarray:
    """For job j = (image index, colour change map [3, G, G]): the class probabilities [J, K] of the image with the
    map, upsampled, added (clipped to the pixel range; ``columns``: the run's classes' outputs, in its order)."""
    lo, hi = pixel_range(lm)

    def edit(x: torch.Tensor, chunk) -> torch.Tensor:
        x = x.float()
        delta = torch.as_tensor(np.stack([d for _, d in chunk]), dtype=torch.float32)
        return torch.maximum(torch.minimum(x + _up(delta, tuple(x.shape[-2:])), hi), lo)

    return edit_probs(lm, source, jobs, edit, batch_size, parts, "cast_place", columns)


def placed_cast_check(lm: LoadedModel, source, maps: np.ndarray, sample: np.ndarray, y: np.ndarray,
                      probs: np.ndarray, cfg, grid: tuple[int, int], skip: set[int] = frozenset(),
                      parts: RunParts | None = None, columns: np.ndarray | None = None) -> pd.DataFrame:
    """One row per class: its map's strength and place, and the claim (module docstring). ``maps`` [K, 3, G, G]
    (``class_cast_maps``); ``sample``: the causal sample's image indices, ``y`` their labels; ``probs`` [N, K]: every
    image's class probabilities (the run's classes); ``skip``: classes not tested (their global cast is claimed);
    ``cfg``: a ``CausalConfig`` (seed, n_boot, shortcut_alpha, shortcut_sufficiency, transplant_images,
    batch_size)."""
    K = len(maps)
    rng = np.random.default_rng([cfg.seed, 37])
    label_of = dict(zip(sample.tolist(), y.tolist()))
    jobs, at = [], []  # at: (class, image, "swap" | "swap_random")
    for k in range(K):
        if k in skip or not np.any(maps[k]):
            continue
        others = sample[y != k]
        if cfg.transplant_images > 0 and len(others) > cfg.transplant_images:
            others = np.sort(rng.choice(others, cfg.transplant_images, replace=False))
        for i in others if cfg.transplant_images > 0 else []:
            own = maps[label_of[int(i)]]
            jobs += [(int(i), maps[k] - own), (int(i), random_directions(maps[k], rng) - own)]
            at += [(k, int(i), "swap"), (k, int(i), "swap_random")]
    pm = map_edit_probs(lm, source, jobs, cfg.batch_size, parts, columns)
    a = pd.DataFrame(at, columns=["cls", "image", "kind"])
    k_of, img = a["cls"].to_numpy(int), a["image"].to_numpy(int)
    a["rise"] = pm[np.arange(len(a)), k_of] - probs[img, k_of] if len(a) else np.zeros(0)
    a["to_k"] = pm.argmax(1) == k_of if len(a) else np.zeros(0, bool)
    level = cfg.shortcut_alpha / max(K, 1)
    input_hw = tuple(source.input_hw)
    rows = []
    for k in range(K):
        g = a[a["cls"] == k]
        swap, swap_r = g[g["kind"] == "swap"], g[g["kind"] == "swap_random"]
        rise, rise_r = swap["rise"].to_numpy(), swap_r["rise"].to_numpy()
        lo, hi = _ci(rise - rise_r, level, cfg.n_boot, rng)
        place = cast_place(maps[k], grid, input_hw)
        rows.append({"cls": k, "map_norm": float(np.linalg.norm(maps[k], axis=0).mean()),
                     "place_tokens": " ".join(map(str, np.flatnonzero(place))), "place_n": int(place.sum()),
                     "place_tested": k not in skip and len(rise) > 0,
                     "place_rise": float(rise.mean()) if len(rise) else np.nan,
                     "place_rise_random": float(rise_r.mean()) if len(rise_r) else np.nan,
                     "place_sufficiency": float((rise - rise_r).mean()) if len(rise) else np.nan,
                     "place_sufficiency_lo": lo, "place_sufficiency_hi": hi,
                     "place_flip": float(swap["to_k"].mean()) if len(swap) else np.nan,
                     "place_recipients": len(rise)})
    out = pd.DataFrame(rows)
    n_tokens = grid[0] * grid[1]
    out["place_claimed"] = ((out["place_sufficiency_lo"] >= cfg.shortcut_sufficiency) & (out["place_flip"] >= MIN_FLIP)
                            & (out["place_n"] > 0) & (out["place_n"] < n_tokens))
    return out


def placed_cast_unit(row, class_name: str, grid: tuple[int, int], cell: tuple[float, float] | None = None) -> dict:
    """The shortcut unit (shortcuts.json) of a claimed placed cast: its place as a fixed token set (``cell``: see
    ``causal.token_box``)."""
    from .causal import token_box

    tokens = [int(t) for t in str(row.place_tokens).split()]
    box = [float(v) for v in token_box(tokens, grid, cell)]
    return {"cls": int(row.cls), "class_name": class_name, "unit": f"colour cast at {len(tokens)} tokens",
            "kind": "region", "family": FAMILY, "word": -1, "tokens": tokens, "gate_words": [],
            "causal_effect": float(row.place_sufficiency), "causal_p": None,  # claimed by sufficiency, not permutation
            "box": box, "gate_box": box}
