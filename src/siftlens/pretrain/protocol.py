"""The low-noise verdict on guided pre-training (issue 15, step 1): speed measured on whole probe curves.

Inputs are per-image probe outcomes, ``correct[s, e, i]`` (seed s, probe e at ``epochs[e]``, validation
image i), so the uncertainty can be resampled over both seeds and images:

- ``epochs_to_reach``: the first epoch at which a curve reaches a target accuracy, linearly interpolated
  between probes (``inf`` if it never does);
- ``curve_area``: the area under the accuracy curve over the run, divided by its length (the run's mean
  accuracy; trapezoids between probes);
- ``speedup``: for a strategy against random masking, the ratio of epochs to reach ``fraction`` (e.g. 0.95)
  of random's final accuracy (target from the same resample), and the difference of curve areas, with
  percentile CIs from a bootstrap that resamples each strategy's seeds and, paired across strategies,
  the validation images.

``siftlens pretrain`` writes the per-image outcomes (``probe_outcomes.npz``); ``benchmarks/bench_pretrain.py``
turns them into the verdict table and figure.
"""

from __future__ import annotations

import math

import numpy as np


def epochs_to_reach(epochs: np.ndarray, acc: np.ndarray, target: float) -> float:
    """First epoch where ``acc`` (at ``epochs``, increasing) reaches ``target``, interpolated; inf if never."""
    epochs, acc = np.asarray(epochs, float), np.asarray(acc, float)
    hit = np.flatnonzero(acc >= target)
    if not len(hit):
        return float("inf")
    j = int(hit[0])
    if j == 0:
        return float(epochs[0])
    e0, e1, a0, a1 = epochs[j - 1], epochs[j], acc[j - 1], acc[j]
    return float(e0 + (target - a0) / (a1 - a0) * (e1 - e0))


def curve_area(epochs: np.ndarray, acc: np.ndarray) -> float:
    """Mean accuracy over the run: trapezoid area under the curve / (last epoch − first epoch)."""
    epochs, acc = np.asarray(epochs, float), np.asarray(acc, float)
    span = epochs[-1] - epochs[0]
    if span <= 0:
        return float(acc[0])
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(epochs)) / span)  # trapezoids (np.trapz left numpy 2)


def area_gain_of_speedup(epochs: np.ndarray, acc: np.ndarray, epochs_ratio: float) -> float:
    """The curve-area difference a strategy would show if it were exactly ``epochs_ratio``× random's epochs to
    every accuracy (its curve ``acc(t / epochs_ratio)``, flat at the final accuracy past the last probe): turns
    "a 25% speed-up" (ratio 0.75) into the area metric, whose CI is far tighter than a single crossing's."""
    epochs, acc = np.asarray(epochs, float), np.asarray(acc, float)
    faster = np.interp(epochs / epochs_ratio, epochs, acc)  # np.interp holds the last value beyond the end
    return curve_area(epochs, faster) - curve_area(epochs, acc)


def _curves(correct: np.ndarray, seeds: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Mean accuracy per probe [E] over the chosen seeds and images (with repeats) of ``correct`` [S, E, N]."""
    weights = np.bincount(images, minlength=correct.shape[2]) / len(images)  # a resample as image weights
    return (correct @ weights)[seeds].mean(axis=0)  # [S, E] per-seed curves, then the chosen seeds


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval by order statistics (no interpolation, so an inf bound stays inf, not NaN)."""
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def speedup(epochs: np.ndarray, correct: np.ndarray, correct_random: np.ndarray, fraction: float = 0.95,
            n_boot: int = 2000, seed: int = 0, paired: bool = False, levels: tuple[float, ...] = (0.95,),
            epochs_random: np.ndarray | None = None) -> dict:
    """Epochs-to-target ratio (strategy / random) and curve-area difference (strategy − random), with bootstrap
    CIs at each of ``levels`` (e.g. 0.95 and a Bonferroni-corrected family-wise level).

    ``correct`` [S, E, N] at ``epochs`` and ``correct_random`` [S_r, E_r, N] at ``epochs_random`` (default: the
    same probes) hold per-image outcomes on the same validation images. The target is ``fraction`` of random's
    final accuracy, recomputed in every resample. ``paired``: seed s of both runs shares initialisation, data
    order, crops and masking draws, so seeds are resampled jointly (S must equal S_r); otherwise each run's
    seeds are resampled on their own. Images are always resampled jointly (the same validation images). With
    different probe epochs (e.g. a longer schedule), the areas are compared over the common span only.
    """
    epochs = np.asarray(epochs, float)
    epochs_random = epochs if epochs_random is None else np.asarray(epochs_random, float)
    correct, correct_random = np.asarray(correct, float), np.asarray(correct_random, float)
    if (correct.shape[1] != len(epochs) or correct_random.shape[1] != len(epochs_random)
            or correct.shape[2] != correct_random.shape[2]):
        raise ValueError(f"shapes {correct.shape} and {correct_random.shape} do not share probes "
                         f"({len(epochs)}, {len(epochs_random)}) and images")
    S, S_r, N = len(correct), len(correct_random), correct.shape[2]
    if paired and S != S_r:
        raise ValueError(f"paired seeds need as many seeds in both runs, got {S} and {S_r}")
    span = min(epochs[-1], epochs_random[-1])
    in_a, in_r = epochs <= span, epochs_random <= span

    def stats(s_a, s_r, imgs) -> tuple[float, float]:
        a, r = _curves(correct, s_a, imgs), _curves(correct_random, s_r, imgs)
        target = fraction * r[-1]
        ratio = epochs_to_reach(epochs, a, target) / epochs_to_reach(epochs_random, r, target)
        return ratio, curve_area(epochs[in_a], a[in_a]) - curve_area(epochs_random[in_r], r[in_r])

    ratio, area = stats(np.arange(S), np.arange(S_r), np.arange(N))
    rng = np.random.default_rng([seed, 31])
    boot = []
    for _ in range(n_boot):
        s_a = rng.integers(0, S, S)
        s_r = s_a if paired else rng.integers(0, S_r, S_r)
        boot.append(stats(s_a, s_r, rng.integers(0, N, N)))
    boot = np.array(boot)
    # a resample where the strategy never reaches the target gives ratio inf: it sorts last, as it should
    out = {"epochs_ratio": ratio, "area_difference": area, "fraction": fraction, "n_seeds": (S, S_r),
           "n_images": N, "n_boot": n_boot, "paired": paired,
           "epochs_ratio_cis": {lv: _interval(boot[:, 0], lv) for lv in levels},
           "area_difference_cis": {lv: _interval(boot[:, 1][np.isfinite(boot[:, 1])], lv) for lv in levels}}
    out["epochs_ratio_ci"] = out["epochs_ratio_cis"][levels[0]]
    out["area_difference_ci"] = out["area_difference_cis"][levels[0]]
    return out


def accuracy_band(correct: np.ndarray, level: float = 0.95, n_boot: int = 500, seed: int = 0) -> np.ndarray:
    """[3, E]: mean accuracy per probe over seeds and images, and its bootstrap interval (seeds and images
    resampled), for the curve figure's bands. ``correct`` [S, E, N]."""
    correct = np.asarray(correct, float)
    S, _, N = correct.shape
    rng = np.random.default_rng([seed, 37])
    boot = np.stack([_curves(correct, rng.integers(0, S, S), rng.integers(0, N, N)) for _ in range(n_boot)])
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], axis=0)
    return np.stack([correct.mean(axis=(0, 2)), lo, hi])


def curve_metrics(history: list[dict], targets: dict[str, float] | None) -> dict[str, float]:
    """The low-noise metrics of the probes so far: curve area (the run's mean probe accuracy, trapezoids) and,
    given a reference, the epoch at which each probe first reached its target (interpolated; NaN until then)."""
    out = {}
    for probe in ("knn_acc", "linear_acc"):
        rows = [(r["epoch"], r[probe]) for r in history if r.get(probe) is not None]
        if not rows:
            continue
        epochs, acc = np.array(rows, float).T
        out[probe.replace("_acc", "_area")] = curve_area(epochs, acc)
        if targets:
            reached = epochs_to_reach(epochs, acc, targets[probe])
            out[probe.replace("_acc", "_epochs_to_reference")] = reached if math.isfinite(reached) else math.nan
    return out
