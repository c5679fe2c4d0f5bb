"""`siftlens compare RUN_A RUN_B`: two analyze runs side by side, with CIs and a test of the difference.

Runs on the same images (matched by path) are compared per image (paired bootstrap); otherwise the
two image samples are resampled independently. Models of different depth are drawn against relative
depth and compared at layers of equal relative depth only when the layer counts match.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .dataset_stats import bootstrap_mean_ci, layer_curve, lift_matrices, per_image_layer_means  # noqa: E402
from .html_page import html_page, png_data_uri, table_html  # noqa: E402
from .io import atomic_path, atomic_write_text, ensure_writable_dir  # noqa: E402
from .report import overview_layers  # noqa: E402
from .runguard import holds_out_lock, retire_outputs  # noqa: E402
from .validation import UserValueError  # noqa: E402


def _load(run: Path, column: str) -> tuple[pd.DataFrame, dict]:
    try:
        return _read_run(run, column)
    except (UserValueError, OSError):
        raise
    except Exception as e:  # a corrupt Parquet or JSON file of that run
        raise UserValueError(f"{run}: not a readable `siftlens analyze` output ({type(e).__name__}: {e})") from None


def _read_run(run: Path, column: str) -> tuple[pd.DataFrame, dict]:
    if not (run / "manifest.json").is_file() or not (run / "per_image.parquet").is_file():
        raise FileNotFoundError(f"{run}: not a finished `siftlens analyze` output (no manifest.json/per_image.parquet)")
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except ValueError as e:
        raise UserValueError(f"{run}/manifest.json: not readable JSON ({e})") from None
    try:
        per_image = pd.read_parquet(run / "per_image.parquet", columns=["image_id", "layer", "head", column])
    except Exception as e:
        raise UserValueError(f"{run}: per_image.parquet has no column {column!r} ({e})") from None
    images = pd.read_parquet(run / "images.parquet", columns=["image_id", "path"])
    return per_image.merge(images, on="image_id"), manifest


def difference_by_layer(a: pd.DataFrame, b: pd.DataFrame, column: str, n_boot: int = 2000,
                        seed: int = 0) -> tuple[pd.DataFrame, bool]:
    """Per layer: mean(B) - mean(A) with 95% bootstrap CI and a two-sided bootstrap p-value."""
    wa = per_image_layer_means(a.assign(image_id=a["path"]), column)
    wb = per_image_layer_means(b.assign(image_id=b["path"]), column)
    common = wa.index.intersection(wb.index)
    paired = len(common) == len(wa) == len(wb)
    rng = np.random.default_rng(seed)
    if paired:
        d = (wb.loc[common] - wa.loc[common]).to_numpy()
        mean, lo, hi = bootstrap_mean_ci(d, n_boot, seed=seed)
        boots = _boot_means(d, n_boot, rng)
    else:
        ma, _, _ = bootstrap_mean_ci(wa.to_numpy(), 1)
        mb, _, _ = bootstrap_mean_ci(wb.to_numpy(), 1)
        mean = mb - ma
        boots = _boot_means(wb.to_numpy(), n_boot, rng) - _boot_means(wa.to_numpy(), n_boot, rng)
        lo, hi = np.nanquantile(boots, [0.025, 0.975], axis=0)
    # two-sided bootstrap p-value: how often the resampled difference crosses zero
    p = np.minimum(1.0, 2 * np.minimum((boots <= 0).mean(0), (boots >= 0).mean(0)) + 1.0 / n_boot)
    return pd.DataFrame({"layer": wa.columns, "diff": mean, "lo": lo, "hi": hi, "p": p}), paired


def _boot_means(v: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    valid = ~np.isnan(v)
    x = np.where(valid, v, 0.0)
    counts = rng.multinomial(len(v), np.full(len(v), 1.0 / len(v)), size=n_boot).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ x) / (counts @ valid)


@holds_out_lock("compare")
def compare(run_a: str | Path, run_b: str | Path, out: str | Path, stat: str = "s_cls",
            map_name: str = "sift") -> pd.DataFrame:
    """Write ``out/compare.html`` and ``out/compare.csv``; return the per-layer table."""
    run_a, run_b, out = Path(run_a), Path(run_b), ensure_writable_dir(out)
    column = f"{stat}__{map_name}" if stat in ("s_cls", "s_pp", "s_ppw", "spearman") else stat
    a, ma = _load(run_a, column)
    b, mb = _load(run_b, column)
    ca, cb = layer_curve(a, column), layer_curve(b, column)
    name_a, name_b = f"A: {ma['model']['name']} ({run_a.name})", f"B: {mb['model']['name']} ({run_b.name})"

    same_depth = len(ca) == len(cb)
    table = pd.DataFrame({"layer": ca["layer"]}) if same_depth else None
    parts = [f"<h1>siftlens compare: {html.escape(column)}</h1>",
             f"<p>{html.escape(name_a)}: {ma['counts']['analysed']} images; {html.escape(name_b)}: "
             f"{mb['counts']['analysed']} images.</p>"]
    fig, axes = plt.subplots(1, 2 if same_depth else 1, figsize=(12 if same_depth else 6, 3.8), squeeze=False)
    ax = axes[0, 0]
    for c, name, color in ((ca, name_a, "C0"), (cb, name_b, "C3")):
        x = c["layer"] / max(1, len(c) - 1) if not same_depth else c["layer"]
        ax.plot(x, c["mean"], color=color, label=name)
        ax.fill_between(x, c["lo"], c["hi"], color=color, alpha=0.2)
    ax.axhline(1.0 if stat.startswith("s_") else 0.0, color="k", lw=0.6)
    ax.set_xlabel("layer" if same_depth else "relative depth")
    ax.set_ylabel(column)
    ax.legend(fontsize=7)
    ax.set_title("mean over heads and images, 95% bootstrap CI", fontsize=9)
    if same_depth:
        diff, paired = difference_by_layer(a, b, column)
        ax = axes[0, 1]
        ax.plot(diff["layer"], diff["diff"], color="k")
        ax.fill_between(diff["layer"], diff["lo"], diff["hi"], color="k", alpha=0.2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("layer")
        ax.set_title(f"B − A ({'paired by image' if paired else 'independent samples'}), 95% CI", fontsize=9)
        table = diff.assign(A=ca["mean"].to_numpy(), B=cb["mean"].to_numpy())
        sig = diff.loc[diff["p"] < 0.05, "layer"].tolist()
        parts.append(f"<p><b>{'Paired by image' if paired else 'Different image sets: independent bootstrap'}. "
                     f"Layers where B differs from A (two-sided bootstrap p &lt; 0.05, not corrected): "
                     f"{', '.join(map(str, sig)) if sig else 'none'}.</b></p>")
    else:
        parts.append("<p><b>The models have different depths: curves are drawn against relative depth and no "
                     "per-layer difference test is made.</b></p>")
    parts.append(f"<img src='{png_data_uri(fig)}'>")
    lifts = []
    for run in (run_a, run_b):
        try:
            z = np.load(run / "lift.npz")
            obs, exp = z["obs"], z["exp"]
        except OSError:
            raise
        except Exception as e:
            raise UserValueError(f"{run}/lift.npz: not readable ({type(e).__name__}: {e})") from None
        lifts.append(np.nanmean(lift_matrices(obs, exp), axis=1))  # [L, G, G]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.4), squeeze=False)
    for r, (lift, name) in enumerate(zip(lifts, (name_a, name_b))):
        for c, layer in enumerate(overview_layers(len(lift))):
            im = axes[r, c].imshow(lift[layer], cmap="RdBu_r", vmin=0, vmax=2)
            axes[r, c].set_title(f"{name[:1]} layer {layer}", fontsize=8)
            axes[r, c].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="group lift")
    parts.append("<h2>Group lift (none / low / mid / high), early / middle / late</h2>"
                 f"<img src='{png_data_uri(fig)}'>")
    retire_outputs(out, "compare")  # the previous comparison's files go first (docs/CHOICES.md)
    if table is not None:
        parts.append(table_html(table, decimals=4))
        with atomic_path(out / "compare.csv") as tmp:  # a unique temporary name
            table.to_csv(tmp, index=False)
    atomic_write_text(out / "compare.html", html_page("siftlens compare", parts))
    return table if table is not None else pd.concat({"A": ca, "B": cb}, axis=1)
