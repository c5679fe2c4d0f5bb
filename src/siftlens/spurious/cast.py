"""Colour-cast units: a shortcut that sits nowhere in the image but in its overall colour (a tint).

Token and word units remove a place; a global cast has none, and removing the tokens of a class's colours takes the
object's own colours with it (held-out round 15's tint: the token flag ranked right-for-the-wrong-reason images
*below* chance, 0.322). A cast unit removes the colour instead:

- class k's cast ``cast_k`` [3] = the mean colour of class k's discovery images minus the mean of the classes' mean
  colours (per channel, in the model's normalised input space): what class k's images share in colour beyond what
  every class's images share. A tint blended into class k's images at strength a moves it by a (tint_k - mean tint).
- removing it from an image = moving the image's mean colour back to the classes' average along the cast's direction
  (``removal_shift``: the image's excess colour along ``cast_k``, subtracted from every pixel, clipped to the valid
  pixel range), its content kept. An image without the cast then moves little: subtracting the whole cast from it
  instead gave it the opposite colour and moved the prediction of every cue-free toy image (dev, session 20).
  Pasting the cast into another class's image = removing its own class's cast and adding ``cast_k``.

Claim, per class k (on the causal sample, ``causal.sample_images``), beside its SIFT-free-by-construction controls:

- ``cast_effect``: mean over class k's sample images of p_k(x) - p_k(x - cast_k);
- ``cast_effect_random``: the same for ``RANDOM_SHIFTS`` random directions of the same length per image (a model
  that loses p_k under any colour shift loses it under these too); ``cast_specific_lo/hi``: bootstrap CI of the
  per-image difference (cast - random) at level 1 - alpha / K;
- ``cast_sufficiency``: mean over up to ``transplant_images`` other classes' sample images of the rise of p_k when
  their own class's cast is removed and ``cast_k`` added (a conflicting image's colour), minus the rise when their
  cast is removed and a random direction as long as ``cast_k`` added; CI as above.

A cast is claimed where ``cast_sufficiency_lo >= shortcut_sufficiency`` and ``cast_flip`` (the share of those
recipients then predicted as k) ``>= MIN_FLIP``: the colour alone moves other classes' images to class k, beyond any
colour shift as large, and outweighs their objects in most of them. A class's natural colour that the model uses as
evidence beside its object moves p_k without taking most predictions (the toy of tests/test_causal.py, where the
class colour is the task and a patch the shortcut: flips 0.22-0.44; the planted tint of tests/test_cast.py: 1.0).
The removal's effect is reported, not required: a model that also learned the object keeps p_k on its own images
moved to the average colour, yet follows another class's cast into them (the two-cue toy of tests/test_cast.py:
removal effect 0.02-0.13 for two of three classes whose casts their conflicting images follow). Flag and the
counterfactual gate then test it as one more removal (``shifted_probs``), for images predicted as k. It is a colour
measurement, SIFT-free: the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..models import LoadedModel
from ..resume import Part, RunParts

RANDOM_SHIFTS = 4  # random directions per sample image in the removal's control
MIN_FLIP = 0.5  # a claimed cast takes the prediction of at least half of the other classes' images it is swapped into
COLUMNS = ("cast_effect", "cast_effect_random", "cast_specific_lo", "cast_specific_hi", "cast_rise",
           "cast_rise_random", "cast_sufficiency", "cast_sufficiency_lo", "cast_sufficiency_hi", "cast_flip",
           "cast_n", "cast_recipients")


def pixel_range(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised input's lowest and highest value per channel [3, 1, 1] (pixels 0 and 1)."""
    mean = torch.tensor(lm.preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(lm.preprocess.std, dtype=torch.float32).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def shift_colour(x: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x`` [B, 3, H, W] (normalised) plus ``shift`` [B, 3] at every pixel, clipped to the pixel range."""
    out = x + shift.to(x)[:, :, None, None]
    return torch.maximum(torch.minimum(out, hi.to(x)), lo.to(x))


@torch.no_grad()
def image_colours(source, n: int, batch_size: int, parts: RunParts | None = None) -> np.ndarray:
    """Each readable image's mean colour [n, 3] in the normalised input space (one read of every image)."""
    parts = parts or RunParts.memory()

    def chunk(c: int) -> Part:
        idx = np.arange(c * batch_size, min((c + 1) * batch_size, n))
        return Part(arrays={"mean": source.get(idx).float().mean((2, 3)).numpy().astype(np.float64)})

    return np.concatenate([p.arrays["mean"] for p in parts.run("cast_colours", -(-n // batch_size), chunk)]
                          or [np.zeros((0, 3))])


def class_casts(colours: np.ndarray, labels: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """([K, 3], [3]): each class's mean image colour minus the mean over classes (classes without images: 0), and
    that mean over classes (the origin ``removal_shift`` moves an image back to)."""
    means = np.array([colours[labels == k].mean(0) if (labels == k).any() else np.full(3, np.nan) for k in range(K)])
    origin = np.nanmean(means, 0)
    return np.nan_to_num(means - origin), origin


@torch.no_grad()
def shifted_probs(lm: LoadedModel, source, jobs: Sequence[tuple[int, np.ndarray]], batch_size: int = 64,
                  parts: RunParts | None = None, name: str = "cast", columns: np.ndarray | None = None
                  ) -> np.ndarray:
    """For job j = (image index, shift [3]): the class probabilities [J, K] of the image shifted in colour
    (``shift_colour``; softmax over all outputs, ``columns``: the run's classes' outputs, in its order)."""
    if not jobs:
        return np.zeros((0, 0))
    device = next(lm.module.parameters()).device
    lo, hi = pixel_range(lm)
    parts = parts or RunParts.memory()

    def batch(c: int) -> Part:
        chunk = jobs[c * batch_size:(c + 1) * batch_size]
        x = source.get([i for i, _ in chunk])
        shift = torch.as_tensor(np.stack([s for _, s in chunk]), dtype=torch.float32)
        p = lm.forward(shift_colour(x, shift, lo, hi).to(device)).float().softmax(-1).cpu().numpy()
        return Part(arrays={"p": p if columns is None else p[:, columns]})

    return np.concatenate([p.arrays["p"] for p in parts.run(name, -(-len(jobs) // batch_size), batch)]
                          ).astype(np.float64)


def removal_shift(colour: np.ndarray, cast: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The shift [3] that removes ``cast`` [3] from an image of mean colour ``colour`` [3]: minus the image's
    colour excess over ``origin`` (the classes' mean colour) along the cast's direction (0 where it has none)."""
    norm = float(np.linalg.norm(cast))
    if norm == 0:
        return np.zeros(3)
    unit = np.asarray(cast, np.float64) / norm
    return -max(float((np.asarray(colour, np.float64) - origin) @ unit), 0.0) * unit


def _random_like(cast: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A direction drawn uniformly on the sphere, as long as ``cast`` [3]."""
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v) * np.linalg.norm(cast)


def _ci(diff: np.ndarray, level: float, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Bootstrap CI of the mean of ``diff`` at two-sided ``level`` (e.g. 0.05 / K)."""
    if not len(diff):
        return np.nan, np.nan
    boot = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
    lo, hi = np.quantile(boot, [level / 2, 1 - level / 2])
    return float(lo), float(hi)


def cast_check(lm: LoadedModel, source, casts: np.ndarray, origin: np.ndarray, colours: np.ndarray,
               sample: np.ndarray, y: np.ndarray, probs: np.ndarray, cfg, parts: RunParts | None = None,
               columns: np.ndarray | None = None) -> pd.DataFrame:
    """One row per class: its cast [3] and the columns of the module docstring. ``origin`` [3], ``colours`` [N, 3]:
    the classes' mean colour and every image's (``class_casts``, ``image_colours``); ``sample``: the causal sample's
    image indices, ``y`` their labels; ``probs`` [N, K]: every image's class probabilities (the run's classes);
    ``cfg``: a ``CausalConfig`` (seed, n_boot, shortcut_alpha, transplant_images, batch_size)."""
    K = len(casts)
    rng = np.random.default_rng([cfg.seed, 31])
    labels_of = dict(zip(sample.tolist(), np.asarray(y).tolist()))
    jobs, at = [], []  # at: (class, image, "remove" | "remove_random" | "add" | "add_random")
    for k in range(K):
        if not np.any(casts[k]):
            continue
        for i in sample[y == k]:
            shift = removal_shift(colours[i], casts[k], origin)
            jobs.append((int(i), shift))
            at.append((k, int(i), "remove"))
            for _ in range(RANDOM_SHIFTS):
                jobs.append((int(i), _random_like(shift, rng)))
                at.append((k, int(i), "remove_random"))
        others = sample[y != k]
        if cfg.transplant_images > 0 and len(others) > cfg.transplant_images:
            others = np.sort(rng.choice(others, cfg.transplant_images, replace=False))
        for i in others if cfg.transplant_images > 0 else []:
            # the recipient's own class cast swapped for class k's (as a conflicting image carries it), against the
            # same removal with a random shift as long as class k's cast
            own = removal_shift(colours[i], casts[int(labels_of[i])], origin)
            jobs += [(int(i), own + casts[k]), (int(i), own + _random_like(casts[k], rng))]
            at += [(k, int(i), "add"), (k, int(i), "add_random")]
    pm = shifted_probs(lm, source, jobs, cfg.batch_size, parts, "cast", columns)
    a = pd.DataFrame(at, columns=["cls", "image", "kind"])
    if len(a):
        k_of, img = a["cls"].to_numpy(), a["image"].to_numpy()
        a["change"] = pm[np.arange(len(a)), k_of] - probs[img, k_of]  # removal: negative where p_k falls
        a["to_k"] = pm.argmax(1) == k_of
    level = cfg.shortcut_alpha / max(K, 1)
    rows = []
    for k in range(K):
        g = a[a["cls"] == k] if len(a) else a
        row = {"cls": k, "cast_r": casts[k][0], "cast_g": casts[k][1], "cast_b": casts[k][2],
               "cast_norm": float(np.linalg.norm(casts[k]))}
        rem, rem_r = g[g["kind"] == "remove"], g[g["kind"] == "remove_random"]
        add, add_r = g[g["kind"] == "add"], g[g["kind"] == "add_random"]
        drop = -rem["change"].to_numpy()
        drop_r = -rem_r.groupby("image", sort=True)["change"].mean().reindex(rem["image"]).to_numpy()
        rise, rise_r = add["change"].to_numpy(), add_r["change"].to_numpy()
        lo, hi = _ci(drop - drop_r, level, cfg.n_boot, rng)
        slo, shi = _ci(rise - rise_r, level, cfg.n_boot, rng)
        row.update({"cast_effect": float(drop.mean()) if len(drop) else np.nan,
                    "cast_effect_random": float(drop_r.mean()) if len(drop_r) else np.nan,
                    "cast_specific_lo": lo, "cast_specific_hi": hi,
                    "cast_rise": float(rise.mean()) if len(rise) else np.nan,
                    "cast_rise_random": float(rise_r.mean()) if len(rise_r) else np.nan,
                    "cast_sufficiency": float((rise - rise_r).mean()) if len(rise) else np.nan,
                    "cast_sufficiency_lo": slo, "cast_sufficiency_hi": shi,
                    "cast_flip": float(add["to_k"].mean()) if len(add) else np.nan,
                    "cast_n": len(drop), "cast_recipients": len(rise)})
        rows.append(row)
    out = pd.DataFrame(rows)
    out["cast_claimed"] = claimed(out, cfg)
    return out


def claimed(casts: pd.DataFrame, cfg) -> pd.Series:
    """Which classes' casts are shortcuts (module docstring; NaN compares False)."""
    return (casts["cast_sufficiency_lo"] >= cfg.shortcut_sufficiency) & (casts["cast_flip"] >= MIN_FLIP)
