"""Self-contained HTML report of an `analyze` run (figures embedded as PNG data URIs)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402

from .dataset_stats import bh_detectable_share, bootstrap_mean_ci, layer_curve, lift_matrices  # noqa: E402
from .html_page import html_page, png_data_uri, skipped_html, table_html  # noqa: E402
from .io import atomic_write_text  # noqa: E402
from .per_image_summary import PerImage, has_values, head_grid, read_per_image_summary  # noqa: E402
from .verdict import BASELINE_LABELS, BASELINES, MIN_EFFECT, effect_over_null, layer_verdicts, verdict_sentences  # noqa: E402

MAP_STYLE = {
    "sift": dict(color="C3", lw=2.5, label="SIFT"),
    "random_kp": dict(color="C7", ls="--", label="random keypoints"),
    "edges": dict(color="C0", label="edge density"),
    "edges_sparse": dict(color="C0", ls=":", label="edges, sparsity-matched"),
    "orb": dict(color="C2", label="ORB"),
    "center": dict(color="C1", ls="-.", label="centre prior"),
    "uniform": dict(color="k", lw=0.8, ls=(0, (1, 3)), label="uniform (null, S=1)"),
}


def overview_layers(L: int) -> list[int]:
    """The first, middle and last layer (the layers the overview figures show)."""
    return sorted({0, L // 2, L - 1})


def fig_examples(ex: dict, manifest: dict) -> str | None:
    if "rgb" not in ex:
        return None
    k = len(ex["rgb"])
    grid, p = tuple(ex["grid"]), int(ex["patch"])
    names = list(ex["map_names"])
    has_cls = "cls_attn" in ex
    L = ex["cls_attn"].shape[1] if has_cls else 0
    layers = overview_layers(L) if has_cls else []
    cols = 3 + len(layers) + ("rollout" in ex)
    fig, axes = plt.subplots(k, cols, figsize=(2.1 * cols, 2.2 * k), squeeze=False)
    for r in range(k):
        rgb = ex["rgb"][r]
        H, W = rgb.shape[:2]
        ext = (0, grid[1] * p, grid[0] * p, 0)
        ax = axes[r, 0]
        ax.imshow(rgb)
        xy, size = np.asarray(ex[f"kp_xy_{r}"], float).reshape(-1, 2), np.asarray(ex[f"kp_size_{r}"], float)
        # one collection, not one patch per keypoint: add_patch re-computes the data limits each time
        ax.add_collection(EllipseCollection(size, size, 0.0, units="xy", offsets=xy - 0.5,
                                            offset_transform=ax.transData, facecolors="none",
                                            edgecolors="yellow", linewidths=0.6), autolim=False)
        ax.set_title(f"{len(ex[f'kp_size_{r}'])} SIFT keypoints", fontsize=8)
        panels = [("SIFT concentration", ex["C"][r][names.index("sift")]),
                  ("edge density", ex["C"][r][names.index("edges")] if "edges" in names else None)]
        panels += [(f"CLS attn, layer {layer}", ex["cls_attn"][r, layer].mean(0)) for layer in layers]
        if "rollout" in ex:
            panels.append(("attention rollout", ex["rollout"][r]))
        for c, (title, m) in enumerate(panels, start=1):
            ax = axes[r, c]
            ax.imshow(rgb, alpha=0.45)
            if m is not None and np.isfinite(m).all():
                ax.imshow(m.reshape(grid), cmap="inferno", alpha=0.65, extent=ext, interpolation="nearest")
            ax.set_title(title, fontsize=8)
        for ax in axes[r]:
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.axis("off")
    fig.suptitle("Examples: keypoints (circles = SIFT scale), maps and attention (mean over heads)", fontsize=9)
    return png_data_uri(fig)


def fig_layer_curves(curves: dict[str, dict[str, pd.DataFrame]]) -> str:
    stats = [s for s in ("s_cls", "s_pp") if s in curves]
    fig, axes = plt.subplots(1, len(stats), figsize=(6 * len(stats), 3.8), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        for name, df in curves[stat].items():
            if df["mean"].isna().all():
                continue
            st = MAP_STYLE.get(name, {"label": name})
            ax.plot(df["layer"], df["mean"], **st)
            ax.fill_between(df["layer"], df["lo"], df["hi"], color=st.get("color"), alpha=0.15)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlabel("layer")
        ax.set_ylabel({"s_cls": "S_cls", "s_pp": "S_pp"}[stat])
        ax.set_title({"s_cls": "CLS -> patches", "s_pp": "patch -> patch"}[stat] +
                     " semantic attention ratio (95% bootstrap CI)", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="best")
    return png_data_uri(fig)


def fig_lift(lift: np.ndarray) -> str:
    L, _, G, _ = lift.shape
    layers = overview_layers(L)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2), squeeze=False)
    labels = ["none"] + [f"g{g}" for g in range(1, G)]
    if G == 4:
        labels = ["none", "low", "mid", "high"]
    m = np.nanmean(lift[layers], axis=1)
    vmax = max(1.5, float(np.nanmax(m))) if np.isfinite(m).any() else 2
    for ax, layer, mat in zip(axes[0], layers, m):
        im = ax.imshow(mat, cmap="RdBu_r", vmin=2 - vmax, vmax=vmax)
        for i in range(G):
            for j in range(G):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(G), labels, fontsize=7)
        ax.set_yticks(range(G), labels, fontsize=7)
        ax.set_xlabel("key group")
        ax.set_ylabel("query group")
        ax.set_title(f"layer {layer}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="lift (1 = uniform)")
    return png_data_uri(fig)


def fig_layer_head_grid(per_image: PerImage, column: str, title: str) -> str:
    grid = head_grid(per_image, column)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * grid.shape[1], 0.6 + 0.35 * grid.shape[0]))
    center = 1.0 if column.startswith("s_") else 0.0
    span = float(np.nanmax(np.abs(grid.to_numpy() - center))) if np.isfinite(grid.to_numpy()).any() else 1
    im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=center - span, vmax=center + span, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return png_data_uri(fig)


def _fmt(m: float, lo: float, hi: float) -> str:
    return "n/a" if not np.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _share(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.0%}"


def verdict_table(per_image: PerImage, map_names: list[str], stat: str = "s_cls",
                  twin: PerImage | None = None, null_mode: str = "swap") -> tuple[pd.DataFrame, list[str]]:
    """Per layer: the statistic, its effect over the null beside the random-weights twin's, the tests and the
    conclusions (verdict.layer_verdicts); plus the conclusions in words."""
    rows = layer_verdicts(per_image, stat, map_names, twin)
    has_twin = bool(rows["twin_effect"].notna().any())
    t = {"layer": rows["layer"],
         "S (SIFT)": [_fmt(*r) for r in rows[["S", "S_lo", "S_hi"]].to_numpy()],
         "S − null": [_fmt(*r) for r in rows[["effect", "effect_lo", "effect_hi"]].to_numpy()]}
    if has_twin:
        t["twin: S − null"] = [_fmt(*r) for r in rows[["twin_effect", "twin_effect_lo", "twin_effect_hi"]].to_numpy()]
    t[f"p (Holm), effect > {'twin + ' if has_twin else ''}{MIN_EFFECT}"] = [f"{p:.3g}" for p in rows["p_follows"]]
    t["follows SIFT"] = ["yes" if f else "no" for f in rows["follows"]]
    for b in BASELINES:
        if f"minus_{b}" in rows:
            cols = [f"minus_{b}", f"minus_{b}_lo", f"minus_{b}_hi"]
            t[f"SIFT − {BASELINE_LABELS[b]}"] = [_fmt(*r) for r in rows[cols].to_numpy()]
    if "partial" in rows:
        t["partial Spearman (SIFT | edges, centre)"] = [_fmt(*r) for r in rows[["partial", "partial_lo",
                                                                               "partial_hi"]].to_numpy()]
        if "twin_partial" in rows:
            t["twin partial"] = [f"{v:.3f}" if np.isfinite(v) else "n/a" for v in rows["twin_partial"]]
    t["SIFT-specific"] = ["yes" if f else "no" for f in rows["specific"]]
    if "bh_share" in rows:
        t["image×head maps significant (BH within layer)"] = [_share(v) for v in rows["bh_share"]]
        if "twin_bh_share" in rows:
            t["twin: maps significant"] = [_share(v) for v in rows["twin_bh_share"]]
    return pd.DataFrame(t), verdict_sentences(rows, stat, null_mode, has_twin)


def fig_effects(per_image: PerImage, twin: PerImage | None, stats: list[str]) -> str:
    """S_own − S_null per layer with 95% CIs, the model beside its random-weights twin."""
    fig, axes = plt.subplots(1, len(stats), figsize=(6 * len(stats), 3.4), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        for df, label, color in ((per_image, "model", "C3"), (twin, "random-weights twin", "C7")):
            if not has_values(df, f"{stat}__sift"):
                continue
            eff = effect_over_null(df, stat)
            mean, lo, hi = bootstrap_mean_ci(eff.to_numpy())
            ax.plot(eff.columns, mean, color=color, label=label, marker="o", ms=3)
            ax.fill_between(eff.columns, lo, hi, color=color, alpha=0.2)
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(MIN_EFFECT, color="k", lw=0.6, ls=":", label=f"minimal effect {MIN_EFFECT}")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{stat}: own map − null maps")
        ax.set_title(f"{stat}: effect over the null (95% bootstrap CI)", fontsize=9)
        ax.legend(fontsize=7)
    return png_data_uri(fig)


def write_report(out: str | Path) -> Path:
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    map_names = manifest["options"]["map_names"]
    # per_image.parquet is read in record batches and reduced as it goes (per_image_summary.py): per image and
    # layer the head means the CIs and tests need, per layer and head the grid figure's means, per layer the
    # p-value counts of the BH shares; never the whole table (~7 million rows at 50,000 images x 144 heads)
    means = ["partial_spearman_sift", "s_cls_null", "s_pp_null"] + [f"{s}__{m}" for s in ("s_cls", "s_pp")
                                                                    for m in map_names]

    def read(path: Path) -> PerImage:
        return read_per_image_summary(path, means, grid_columns=["s_cls__sift", "s_pp__sift", "partial_spearman_sift"],
                                      p_columns=["s_cls_p", "s_pp_p"])

    per_image = read(out / "per_image.parquet")
    twin_info = manifest.get("twin", {})
    twin_rows = out / twin_info.get("dir", "twin") / "per_image.parquet"
    twin = read(twin_rows) if twin_info.get("mode", "none") != "none" and twin_rows.is_file() else None
    null = manifest.get("null", {"mode": manifest["options"].get("null_mode", "permute"),
                                 "K": manifest["options"].get("null_permutations", 0)})
    has_cls = has_values(per_image, "s_cls__sift")
    curves = {s: {m: layer_curve(per_image, f"{s}__{m}") for m in map_names}
              for s in (("s_cls", "s_pp") if has_cls else ("s_pp",))}
    lift_npz = np.load(out / "lift.npz")
    lift = lift_matrices(lift_npz["obs"], lift_npz["exp"])
    ex_path = out / "examples.npz"
    ex = dict(np.load(ex_path)) if ex_path.exists() else {}

    parts = [f"<h1>siftlens report: {html.escape(manifest['model']['name'])}</h1>"]
    c = manifest["counts"]
    lay = manifest["layout"]
    parts.append(
        f"<p>{c['analysed']} images analysed, {c['skipped']} skipped, {c['no_keypoints']} without SIFT keypoints "
        f"(excluded from SIFT ratios). Input {lay['grid'][0] * lay['patch_size']}×{lay['grid'][1] * lay['patch_size']}"
        f" px, patch {lay['patch_size']}, grid {lay['grid'][0]}×{lay['grid'][1]}, prefix tokens "
        f"{', '.join(lay['prefix_tokens']) or 'none'}; map mode <code>{manifest['options']['map_mode']}</code>, "
        f"weights <code>{manifest['options']['weight']}</code>, G={manifest['options']['groups']}.</p>")
    null_words = {"swap": "pairs each image's attention with K other images' SIFT maps at the same input size "
                          "(keeps centre bias, smoothness and keypoint density)",
                  "shift": "compares each image's SIFT map with K cyclic shifts (and flips) of itself",
                  "permute": "shuffles each image's SIFT map over its patches"}.get(null["mode"], "")
    k = int(null.get("K") or 0)
    parts.append("<p class=note>"
                 "S = n·Σ a_j c_j: 1 means attention is blind to the map, &gt;1 means it goes where "
                 "the map's mass is. Every curve is shown with its 95% bootstrap CI over images and next to the same "
                 f"statistic for baseline maps (uniform = 1). The null {null_words} (K = {k}); "
                 "a conclusion needs the effect over the null to beat the same architecture with random weights "
                 f"(the twin) by at least {MIN_EFFECT}, with one-sided tests Holm-adjusted over layers. "
                 "Per-map p-values are context: their share significant after Benjamini–Hochberg within each layer "
                 + (f"cannot resolve shares below {bh_detectable_share(k):.0%} (smallest p = 1/{k + 1}). " if k else
                    "is not available (no null maps). ")
                 + "See METHOD.md for definitions.</p>")
    if null.get("mode") == "permute":
        parts.append("<p><b>Warning: the permutation null (--null-mode permute) is anti-conservative: on smooth "
                     "maps it calls about 39% of null cases significant at α = 0.05 (benchmarks/RESULTS.md). "
                     "Its z, p and BH shares are not evidence.</b></p>")
    if twin is None:
        reason = manifest.get("twin", {}).get("reason", "--twin none")
        parts.append(f"<p><b>No random-weights twin in this run ({html.escape(reason)}): the sanity check of "
                     "METHOD.md §3 was not done, so no finding below has been checked against it.</b></p>")
    fig = fig_examples(ex, manifest)
    if fig:
        parts.append(f"<h2>Examples</h2><img src='{fig}'>")
    parts.append(f"<h2>Semantic attention ratio per layer</h2><img src='{fig_layer_curves(curves)}'>")
    parts.append(f"<h2>Effect over the null, model and random-weights twin</h2>"
                 f"<img src='{fig_effects(per_image, twin, list(curves))}'>")
    for stat in curves:
        table, words = verdict_table(per_image, map_names, stat, twin, null["mode"])
        parts.append(f"<h3>{stat}: SIFT against baselines (mean over heads, 95% CI)</h3>")
        parts.append("<p><b>" + "</b></p><p><b>".join(html.escape(w) for w in words) + "</b></p>")
        parts.append(table_html(table, decimals=None))
    if np.isfinite(lift).any():
        parts.append("<h2>Group interrelation lift (none / low / mid / high SIFT concentration)</h2>"
                     f"<img src='{fig_lift(lift)}'>")
    col = "s_cls__sift" if has_cls else "s_pp__sift"
    parts.append(f"<h2>Layer × head</h2><img src='{fig_layer_head_grid(per_image, col, col + ' (mean over images)')}'>")
    if has_cls:
        parts.append(f"<img src='{fig_layer_head_grid(per_image, 'partial_spearman_sift', 'partial Spearman')}'>")
    parts.append(skipped_html(manifest["skipped"], "Skipped inputs", limit=50))
    parts.append("<h2>Run</h2><pre>" + html.escape(json.dumps(
        {k: manifest[k] for k in ("model", "preprocess", "options", "versions", "git_revision", "seconds")},
        indent=1, default=str)) + "</pre>")
    atomic_write_text(out / "report.html", html_page("siftlens report", parts))
    return out / "report.html"
