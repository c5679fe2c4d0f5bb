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

Not wired into ``siftlens pretrain`` yet: the loop logs mean accuracies, not per-image outcomes.
"""

from __future__ import annotations

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


def _curves(correct: np.ndarray, seeds: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Mean accuracy per probe [E] over the chosen seeds and images of ``correct`` [S, E, N]."""
    return correct[seeds][:, :, images].mean(axis=(0, 2))


def speedup(epochs: np.ndarray, correct: np.ndarray, correct_random: np.ndarray, fraction: float = 0.95,
            n_boot: int = 2000, seed: int = 0) -> dict:
    """Epochs-to-target ratio (strategy / random) and curve-area difference (strategy − random), each with a
    95% bootstrap CI; ``correct`` [S, E, N] and ``correct_random`` [S_r, E, N] on the same images and probes."""
    correct, correct_random = np.asarray(correct, float), np.asarray(correct_random, float)
    if correct.shape[1:] != correct_random.shape[1:] or correct.shape[1] != len(epochs):
        raise ValueError(f"shapes {correct.shape} and {correct_random.shape} do not share probes {len(epochs)} "
                         "and images")

    def stats(s_a, s_r, imgs) -> tuple[float, float]:
        a, r = _curves(correct, s_a, imgs), _curves(correct_random, s_r, imgs)
        target = fraction * r[-1]
        t_r = epochs_to_reach(epochs, r, target)
        return epochs_to_reach(epochs, a, target) / t_r, curve_area(epochs, a) - curve_area(epochs, r)

    S, S_r, N = len(correct), len(correct_random), correct.shape[2]
    ratio, area = stats(np.arange(S), np.arange(S_r), np.arange(N))
    rng = np.random.default_rng([seed, 31])
    boot = np.array([stats(rng.integers(0, S, S), rng.integers(0, S_r, S_r), rng.integers(0, N, N))
                     for _ in range(n_boot)])
    # a resample where the strategy never reaches the target gives ratio inf: it sorts last, as it should
    # (order statistics, no interpolation, so an inf bound stays inf rather than NaN)
    lo_r, hi_r = np.quantile(boot[:, 0], [0.025, 0.975], method="inverted_cdf")
    lo_a, hi_a = np.quantile(boot[:, 1], [0.025, 0.975])
    return {"epochs_ratio": ratio, "epochs_ratio_ci": (float(lo_r), float(hi_r)),
            "area_difference": area, "area_difference_ci": (float(lo_a), float(hi_a)),
            "fraction": fraction, "n_seeds": (S, S_r), "n_images": N, "n_boot": n_boot}
