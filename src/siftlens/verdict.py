"""What an `analyze` report concludes, and the test behind each conclusion (METHOD.md §3, CHOICES.md).

Per layer and statistic (S_cls, S_pp), the report draws two conclusions:

1. **follows SIFT**: the image's own SIFT map gets more attention than the null maps (the image-swap
   null by default: other images' maps, which share centre bias, smoothness and keypoint density), and by
   more than the same architecture with random weights gets (the twin) plus a minimal effect:
   H0: E[effect_model] − E[effect_twin] ≤ MIN_EFFECT, effect = S_own − mean S_null per image (heads
   averaged), Welch one-sided t-test (one-sample against MIN_EFFECT without a twin), Holm over layers.
2. **SIFT-specific**: (1), and S_sift beats every baseline map (paired one-sided t-test per baseline,
   Holm over layers; all must hold, an intersection-union test, so no correction across baselines), and
   for S_cls the partial rank correlation (SIFT | edges, centre) beats the twin's by MIN_PARTIAL (Welch, Holm).

Per-map p-values (image × head) are reported as the share significant after Benjamini–Hochberg within each
layer (the family: all image × head tests of that layer), next to the twin's share; they are context,
not a conclusion of their own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from .dataset_stats import bootstrap_mean_ci, per_image_layer_means
from .per_image_summary import PerImage, bh_fraction, has_values
from .stats import MIN_EFFECT

ALPHA = 0.05
# The margin of the partial-correlation test (model minus twin). Random-weights ViT-Ti/S layers have partial
# rank correlations within ±0.06 and differ from their twin by up to 0.10 (benchmarks/RESULTS.md, calibration
# setting b): one twin is one draw of random weights, and that seed-to-seed spread is not in a test over images.
MIN_PARTIAL = 0.1
BASELINES = ("random_kp", "edges", "edges_sparse", "orb", "center")
BASELINE_LABELS = {"random_kp": "random keypoints", "edges": "edges", "edges_sparse": "sparsity-matched edges",
                   "orb": "ORB", "center": "centre prior"}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error over the given tests; NaN = no test)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adj, 1.0)
    return out


def p_mean_above(x: np.ndarray, mu0: float) -> float:
    """One-sided one-sample t-test p-value of H0: E[x] <= mu0 (NaNs dropped; NaN with < 2 values)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan")
    if np.ptp(x) == 0:  # no spread: the t statistic is undefined; decide on the value itself
        return 0.0 if x[0] > mu0 else 1.0
    return float(sps.ttest_1samp(x, mu0, alternative="greater").pvalue)


def p_diff_above(x: np.ndarray, y: np.ndarray, delta: float) -> float:
    """One-sided Welch t-test p-value of H0: E[x] − E[y] <= delta (NaNs dropped)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return 0.0 if x[0] - y[0] > delta else 1.0
    return float(sps.ttest_ind(x, y + delta, equal_var=False, alternative="greater").pvalue)


def effect_over_null(per_image: PerImage, stat: str, own: pd.DataFrame | None = None) -> pd.DataFrame:
    """[images x layers] S_own − mean S_null (heads averaged; ``own``: S_own's table if already computed).
    Without a null column the null is uniform attention (S = 1). ``per_image``: the rows or their
    ``PerImageSummary`` (the same numbers)."""
    own = per_image_layer_means(per_image, f"{stat}__sift") if own is None else own
    null_col = f"{stat}_null"
    if has_values(per_image, null_col):
        return own - per_image_layer_means(per_image, null_col)
    return own - 1.0


def _ci(wide: pd.DataFrame, layers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wide = wide.reindex(columns=layers)
    return bootstrap_mean_ci(wide.to_numpy())


def layer_verdicts(per_image: PerImage, stat: str, map_names: list[str],
                   twin: PerImage | None = None, min_effect: float = MIN_EFFECT,
                   alpha: float = ALPHA, min_partial: float = MIN_PARTIAL) -> pd.DataFrame:
    """One row per layer: effect over the null (mean, 95% CI), the twin's, the tests and the two conclusions."""
    own = per_image_layer_means(per_image, f"{stat}__sift")  # [images x layers], reused below
    eff = effect_over_null(per_image, stat, own)
    layers = eff.columns.to_numpy()
    rows = pd.DataFrame({"layer": layers})
    rows["S"], rows["S_lo"], rows["S_hi"] = _ci(own, layers)
    rows["effect"], rows["effect_lo"], rows["effect_hi"] = _ci(eff, layers)
    rows["n_images"] = eff.notna().sum(axis=0).to_numpy()
    has_twin = has_values(twin, f"{stat}__sift")
    if has_twin:
        teff = effect_over_null(twin, stat).reindex(columns=layers)
        rows["twin_effect"], rows["twin_effect_lo"], rows["twin_effect_hi"] = _ci(teff, layers)
        p = [p_diff_above(eff[lay].to_numpy(), teff[lay].to_numpy(), min_effect) for lay in layers]
    else:
        rows["twin_effect"] = rows["twin_effect_lo"] = rows["twin_effect_hi"] = np.nan
        p = [p_mean_above(eff[lay].to_numpy(), min_effect) for lay in layers]
    rows["p_follows"] = holm(np.array(p))
    rows["follows"] = rows["p_follows"] < alpha

    beats_all = np.ones(len(layers), dtype=bool)
    for b in BASELINES:
        if b not in map_names:
            continue
        diff = (own - per_image_layer_means(per_image, f"{stat}__{b}")).reindex(columns=layers)
        rows[f"minus_{b}"], rows[f"minus_{b}_lo"], rows[f"minus_{b}_hi"] = _ci(diff, layers)
        rows[f"p_beats_{b}"] = holm(np.array([p_mean_above(diff[lay].to_numpy(), 0.0) for lay in layers]))
        beats_all &= (rows[f"p_beats_{b}"] < alpha).to_numpy()
    specific = rows["follows"].to_numpy() & beats_all
    if stat == "s_cls" and "partial_spearman_sift" in per_image:
        part = per_image_layer_means(per_image, "partial_spearman_sift").reindex(columns=layers)
        rows["partial"], rows["partial_lo"], rows["partial_hi"] = _ci(part, layers)
        if has_twin:
            tpart = per_image_layer_means(twin, "partial_spearman_sift").reindex(columns=layers)
            rows["twin_partial"] = tpart.mean(axis=0).to_numpy()
            pp = [p_diff_above(part[lay].to_numpy(), tpart[lay].to_numpy(), min_partial) for lay in layers]
        else:
            pp = [p_mean_above(part[lay].to_numpy(), min_partial) for lay in layers]
        rows["p_partial"] = holm(np.array(pp))
        specific &= (rows["p_partial"] < alpha).to_numpy()
    rows["specific"] = specific

    p_col = f"{stat}_p"
    if has_values(per_image, p_col):
        rows["bh_share"] = bh_fraction(per_image, p_col, alpha).reindex(layers).to_numpy()
        if has_twin and has_values(twin, p_col):
            rows["twin_bh_share"] = bh_fraction(twin, p_col, alpha).reindex(layers).to_numpy()
    return rows


def _ranges(xs) -> str:
    xs = sorted(int(x) for x in xs)
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}–{a}")
            start = b
    return ", ".join(out)


def verdict_sentences(rows: pd.DataFrame, stat: str, null_mode: str, has_twin: bool,
                      min_effect: float = MIN_EFFECT) -> list[str]:
    """The report's conclusions in words, from ``layer_verdicts``."""
    null = {"swap": "other images' SIFT maps (image-swap null)", "shift": "cyclic shifts of the image's own map",
            "permute": "shuffles of the image's own map (anti-conservative null)"}.get(null_mode, "uniform attention")
    bar = (f"beyond {null}, by more than the random-weights twin + {min_effect}" if has_twin
           else f"beyond {null} by more than {min_effect} (NO random-weights twin in this run: sanity check not done)")
    words = []
    follows = rows.loc[rows["follows"], "layer"].to_numpy()
    if len(follows) == 0:
        words.append(f"{stat}: no layer's attention follows SIFT keypoints {bar} "
                     "(one-sided tests, Holm-adjusted over layers, α = 0.05).")
        return words
    words.append(f"{stat}: attention follows SIFT keypoints {bar} in layers {_ranges(follows)} "
                 "(Holm-adjusted over layers, α = 0.05).")
    specific = rows.loc[rows["specific"], "layer"].to_numpy()
    # the baseline maps this run compared SIFT with (MapConfig.baselines; "uniform" is the null, not a rival)
    rivals = [BASELINE_LABELS[b] for b in BASELINES if f"minus_{b}" in rows]

    def listed(conj: str) -> str:
        return ", ".join(rivals[:-1]) + (f" {conj} " if len(rivals) > 1 else "") + (rivals[-1] if rivals else "")

    partial = "partial" in rows
    if not rivals:
        words.append("No baseline map was compared in this run (no baselines configured): SIFT-specificity rests "
                     + ("on the partial rank correlation beyond the twin's alone" +
                        (f" (layers {_ranges(specific)})." if len(specific) else ", and no layer passes it.")
                        if partial else "on nothing here and is not claimed."))
    elif len(specific):
        words.append(f"SIFT-specific (also beats {listed('and')}" +
                     (", with a positive partial rank correlation beyond the twin's" if partial else "") +
                     f"): layers {_ranges(specific)}.")
    else:
        words.append("But in no layer does SIFT beat every baseline map of this run" +
                     (" with a partial rank correlation beyond the twin's" if partial else "") +
                     f": {listed('or')} explain{'s' if len(rivals) == 1 else ''} what SIFT shows here.")
    return words
