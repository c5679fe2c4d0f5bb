"""Dataset-level reductions of the per-image table: bootstrap CIs and paired differences."""

from __future__ import annotations

import numpy as np
import pandas as pd

BOOT_CHUNK = 16  # bootstrap resamples drawn and applied at a time (16 N float64 + 16 N int64 bytes)


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile bootstrap CI over rows (images), per column; NaNs are skipped.

    values: [N, K]. Returns (mean, lo, hi), each [K]. Resampling uses multinomial counts, drawn BOOT_CHUNK
    resamples at a time (the same draws as all at once), so memory is O(BOOT_CHUNK * N + n_boot * K) however
    many columns there are. The chunked matrix products can differ from one [n_boot, N] product in the last
    bits (BLAS picks its kernels by shape): relative differences of ~1e-15 in a resample's mean.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    valid = ~np.isnan(v)
    x = np.where(valid, v, 0.0)
    N = len(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(0) / valid.sum(0)
        if N == 0:
            nan = np.full(v.shape[1], np.nan)
            return nan, nan, nan
        rng = np.random.default_rng(seed)
        p = np.full(N, 1.0 / N)
        weights = valid.astype(np.float64)  # what ``counts @ valid`` casts to, once
        boots = np.empty((n_boot, v.shape[1]))
        for start in range(0, n_boot, BOOT_CHUNK):
            counts = rng.multinomial(N, p, size=min(BOOT_CHUNK, n_boot - start)).astype(np.float64)  # [chunk, N]
            boots[start:start + len(counts)] = (counts @ x) / (counts @ weights)
        alpha = (1 - level) / 2
        lo, hi = np.nanquantile(boots, [alpha, 1 - alpha], axis=0) if N > 1 else (mean, mean)
    return mean, np.asarray(lo), np.asarray(hi)


def per_image_layer_means(per_image: pd.DataFrame, column: str) -> pd.DataFrame:
    """[images x layers] table of ``column`` averaged over heads (``per_image``: the rows, or a
    ``per_image_summary.PerImageSummary`` that averaged them while reading the file)."""
    if not isinstance(per_image, pd.DataFrame):
        return per_image.layer_means(column)
    return per_image.groupby(["image_id", "layer"])[column].mean().unstack("layer").sort_index(axis=1)


def layer_curve(per_image: pd.DataFrame, column: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per layer: mean over images of the head-averaged ``column`` with its 95% bootstrap CI."""
    wide = per_image_layer_means(per_image, column)
    mean, lo, hi = bootstrap_mean_ci(wide.to_numpy(), n_boot, seed=seed)
    n = wide.notna().sum(axis=0).to_numpy()
    return pd.DataFrame({"layer": wide.columns, "mean": mean, "lo": lo, "hi": hi, "n_images": n})


def paired_difference(per_image: pd.DataFrame, col_a: str, col_b: str, n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """Per layer: mean over images of (a - b), head-averaged, with its 95% bootstrap CI."""
    a = per_image_layer_means(per_image, col_a)
    b = per_image_layer_means(per_image, col_b)
    mean, lo, hi = bootstrap_mean_ci((a - b).to_numpy(), n_boot, seed=seed)
    return pd.DataFrame({"layer": a.columns, "mean": mean, "lo": lo, "hi": hi})


def lift_matrices(obs: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """Dataset lift L = Σ observed / Σ expected group mass, per layer x head: [L, H, G, G]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(exp > 0, obs / exp, np.nan)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    pv = p[ok]
    m = len(pv)
    if m == 0:
        return q
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = adj
    q[ok] = out
    return q


def significant_fraction(per_image: pd.DataFrame, p_column: str, alpha: float = 0.05) -> pd.DataFrame:
    """Per layer: fraction of (image, head) tests with BH q < alpha. The BH family is one layer's image x head
    tests (the layers are separate questions; the report's per-layer conclusions are Holm-adjusted across
    layers in verdict.py)."""
    df = pd.DataFrame({"layer": per_image["layer"].to_numpy(), "p": per_image[p_column].to_numpy(np.float64)})
    df["q"] = np.nan
    for _, idx in df.groupby("layer").groups.items():
        df.loc[idx, "q"] = benjamini_hochberg(df.loc[idx, "p"].to_numpy())
    df["sig"] = df["q"] < alpha
    df["valid"] = df["q"].notna()
    g = df.groupby("layer")
    return pd.DataFrame({"fraction": g["sig"].sum() / g["valid"].sum().clip(lower=1), "tests": g["valid"].sum()})


def bh_detectable_share(k: int, alpha: float = 0.05) -> float:
    """With K null maps the smallest p is 1/(K+1); BH at level alpha then rejects nothing unless at least this
    share of a family's tests sits at that floor (1 / (alpha (K+1)))."""
    return min(1.0, 1.0 / (alpha * (k + 1))) if k > 0 else 1.0
