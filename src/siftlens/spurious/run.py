"""`siftlens spurious`: discovery + reliance on a user's model and labelled images, with an HTML report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..io import atomic_write_json, atomic_write_parquet, atomic_write_text, ensure_writable_dir  # noqa: E402
from ..models import LoadedModel, load_model  # noqa: E402
from ..preprocess import BadImageError, find_images, load_rgb  # noqa: E402
from ..report import CSS  # noqa: E402
from ..runguard import COMMAND_OUTPUTS, holds_out_lock, retire_outputs  # noqa: E402
from ..validation import UserValueError, check_finite_output, check_finite_parameters  # noqa: E402
from .discover import (  # noqa: E402
    DiscoveryConfig,
    DiscoveryResult,
    counterfactual_scores,
    discover_shortcuts,
    exemplar_crops,
)


def read_labels(images: list[Path], labels: str | None, root: Path | None) -> tuple[np.ndarray, list[str]]:
    """Labels from a CSV (columns path,label) or, with labels=None, from ImageFolder directory names."""
    if labels is None:
        if root is None or not root.is_dir():
            raise UserValueError("--labels is required unless --images is an ImageFolder directory (class/*.jpg)")
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in images]
        if any(n is None for n in names):
            raise UserValueError(f"--images {root}: files directly in the root have no class folder; pass --labels CSV")
    else:
        try:
            df = pd.read_csv(labels)
        except (ValueError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
            raise UserValueError(f"--labels {labels}: not a readable CSV ({type(e).__name__}: {e})") from None
        if not {"path", "label"} <= set(df.columns):
            raise UserValueError(f"--labels {labels}: needs columns 'path' and 'label' (has {list(df.columns)})")
        by_path = {str(Path(p)): str(lab) for p, lab in zip(df["path"], df["label"])}
        by_name = {Path(p).name: str(lab) for p, lab in zip(df["path"], df["label"])}
        names = [by_path.get(str(p), by_name.get(p.name)) for p in images]
        missing = [str(p) for p, n in zip(images, names) if n is None]
        if missing:
            raise UserValueError(f"--labels {labels}: no label for {len(missing)} of {len(images)} images "
                             f"(first: {missing[0]})")
    classes = sorted(set(names))
    return np.array([classes.index(n) for n in names]), classes


def load_inputs(lm: LoadedModel, paths: list[Path], source) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Model inputs of the readable images, their indices, and the skipped ones with reasons."""
    xs, keep, skipped = [], [], []
    for i, p in enumerate(paths):
        try:
            xs.append(lm.preprocess(load_rgb(p, min_side=lm.patch_size)))
            keep.append(i)
        except BadImageError as e:
            skipped.append({"path": str(p), "reason": str(e)})
    if not xs:
        raise UserValueError(f"--images {source}: no readable image")
    return torch.stack(xs), keep, skipped


@holds_out_lock("spurious")
def run_spurious(model: str | LoadedModel, images: str | Path, out: str | Path, labels: str | None = None,
                 min_per_class: int = 5, cfg: DiscoveryConfig | None = None, checkpoint: str | None = None,
                 random_init: bool = False, device: str = "cpu") -> DiscoveryResult:
    cfg = cfg or DiscoveryConfig()
    out = ensure_writable_dir(out)
    lm = model if isinstance(model, LoadedModel) else load_model(model, checkpoint=checkpoint,
                                                                 random_init=random_init, device=device)
    check_finite_parameters(lm.module, lm.name)
    paths = find_images(images)
    root = Path(images) if Path(images).is_dir() else None
    y, class_names = read_labels(paths, labels, root)
    x, keep, skipped = load_inputs(lm, paths, images)
    y = y[keep]
    counts = np.bincount(y, minlength=len(class_names))
    small = [f"{class_names[k]} ({c})" for k, c in enumerate(counts) if c < min_per_class]
    if small:
        raise UserValueError(f"classes with fewer than {min_per_class} images: {', '.join(small)}")
    with torch.no_grad():
        logits = lm.forward(x[:1])
    check_finite_output(logits, lm.name)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise UserValueError(f"--model {lm.name}: has no classifier head (output shape {tuple(logits.shape)}); "
                         "discovery needs class logits")
    res = discover_shortcuts(lm, x, y, class_names, cfg)
    try:
        cf = counterfactual_scores(lm, x, res.masker(lm), cfg.batch_size, seed=cfg.seed)
        res.per_image = pd.concat([res.per_image, cf.drop(columns=["p_pred"])], axis=1)
    except NotImplementedError as e:  # attention modules that take no mask: discovery stands, no counterfactual
        print(f"warning: no counterfactual scores for {lm.name}: {e}")
    res.per_image.insert(0, "path", [str(paths[i]) for i in keep])
    _write_outputs(out, res, x, lm, skipped)
    return res


def reliance_summary_html(per_image: pd.DataFrame, seed: int = 0) -> str:
    """Mean reliance with its 95% bootstrap CI next to its uniform-attention baseline and their paired
    difference; the flagged share (reliance > 0.5) with its Wilson CI next to the share that uniform
    attention would flag."""
    from scipy.stats import binomtest

    from ..dataset_stats import bootstrap_mean_ci

    r, u = per_image["reliance"].to_numpy(), per_image["reliance_uniform"].to_numpy()
    (m_r, m_u, m_d), (lo_r, lo_u, lo_d), (hi_r, hi_u, hi_d) = bootstrap_mean_ci(np.stack([r, u, r - u], 1), seed=seed)
    n, flagged, flagged_u = len(r), int((r > 0.5).sum()), int((u > 0.5).sum())
    ci = binomtest(flagged, n).proportion_ci(method="wilson") if n else None
    verdict = ("more than" if lo_d > 0 else "less than" if hi_d < 0 else "no different from (CI includes 0)")
    return ("<h2>Reliance</h2><p>Share of decisive attention on shortcut-motif or background patches (vs the "
            f"image's semantic patches): mean {m_r:.3f} [{lo_r:.3f}, {hi_r:.3f}] over {n} images; if attention "
            f"were uniform: {m_u:.3f} [{lo_u:.3f}, {hi_u:.3f}]; difference {m_d:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}]: "
            f"the model puts {verdict} the uniform share there. Flagged (reliance &gt; 0.5): {flagged / max(n, 1):.1%}"
            + (f" [{ci.low:.1%}, {ci.high:.1%}]" if ci else "") +
            f" (uniform attention would flag {flagged_u / max(n, 1):.1%}).</p>")


def counterfactual_summary_html(per_image: pd.DataFrame, seed: int = 0) -> str:
    """Shortcut KL (belief shift when the shortcut tokens are masked) with its CI next to the same shift
    when as many random tokens are masked, and the share of images whose prediction flips."""
    from ..dataset_stats import bootstrap_mean_ci

    sk, rk = per_image["shortcut_kl"].to_numpy(), per_image["random_kl"].to_numpy()
    (m_s, m_r, m_d), (lo_s, lo_r, lo_d), (hi_s, hi_r, hi_d) = bootstrap_mean_ci(np.stack([sk, rk, sk - rk], 1),
                                                                               seed=seed)
    flips = (per_image["pred_masked"] != per_image["pred"]).mean()
    return ("<h2>Which predictions rest on the shortcuts</h2><p>Masking the keys of the shortcut-motif tokens "
            f"(all layers; {per_image['n_masked'].mean():.1f} tokens per image on average) moves the model's belief "
            f"by KL {m_s:.3f} [{lo_s:.3f}, {hi_s:.3f}] per image; masking as many random tokens: {m_r:.3f} "
            f"[{lo_r:.3f}, {hi_r:.3f}]; difference {m_d:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}]. {flips:.1%} of predictions "
            "change. The table lists the images with the largest shift (<code>shortcut_kl</code>): right or wrong, "
            "their prediction depends on the shortcut.</p>")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write_outputs(out: Path, res: DiscoveryResult, x: torch.Tensor, lm: LoadedModel, skipped: list) -> None:
    retire_outputs(out, "spurious")  # the previous run's files go first (docs/CHOICES.md, runs and outputs)
    atomic_write_parquet(res.per_image, out / "reliance.parquet")
    atomic_write_text(out / "motifs.csv", res.motifs.to_csv(index=False))
    res.save_words(out / "shortcut_words.npz")  # for `siftlens prompt --method mask_tokens --motifs DIR`
    rgb = np.stack([lm.preprocess.to_uint8_rgb(xi) for xi in x])
    parts = [f"<h1>siftlens spurious: {html.escape(lm.name)}</h1>",
             "<p class=note>Per class, keypoint motifs (SIFT visual words) under the decisive (late-layer CLS) "
             "attention, ranked by attention lift × class specificity × (0.5 + 0.5·position stability). "
             "Lift 1 = uniform attention (lift_lo–lift_hi: 95% bootstrap CI over the class's images); "
             "specificity = f_in²/(f_in+f_out), f_out = the same word's frequency in other classes (its baseline); "
             "p_label_null: share of class-label permutations whose best motif for this class scores as high "
             "(small = the motif is tied to the class beyond chance).</p>"]
    for k, name in enumerate(res.class_names):
        top = res.motifs[res.motifs["cls"] == k].head(3)
        if top.empty:
            continue
        parts.append(f"<h2>{html.escape(name)}</h2>")
        cols = [c for c in ("rank", "word", "score", "p_label_null", "lift", "lift_lo", "lift_hi", "f_in", "f_out",
                            "stability", "mean_x", "mean_y", "n_keypoints") if c in top.columns]
        parts.append(top[cols].to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
        crops = [exemplar_crops(rgb, res.keypoints, k, int(w)) for w in top["word"]]
        if any(crops):
            fig, axes = plt.subplots(len(crops), 6, figsize=(6, 1.1 * len(crops)), squeeze=False)
            for r, row in enumerate(crops):
                for c in range(6):
                    axes[r, c].axis("off")
                    if c < len(row):
                        axes[r, c].imshow(row[c])
                axes[r, 0].set_title(f"motif #{r + 1}", fontsize=7, loc="left")
            parts.append(f"<img src='{_png(fig)}'>")
    parts.append(reliance_summary_html(res.per_image))
    has_cf = "shortcut_kl" in res.per_image
    if has_cf:
        parts.append(counterfactual_summary_html(res.per_image))
    top = res.per_image.sort_values("shortcut_kl" if has_cf else "reliance", ascending=False).head(20)
    parts.append(top.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
    if skipped:
        parts.append(f"<h2>Skipped ({len(skipped)})</h2><ul>" +
                     "".join(f"<li>{html.escape(s['reason'])}</li>" for s in skipped) + "</ul>")
    atomic_write_text(out / "spurious.html", f"<!doctype html><html><head><meta charset=utf-8><style>{CSS}</style>"
                                             f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_json(out / "manifest.json", {"model": lm.name, "classes": res.class_names,
                                              "n_images": len(res.per_image), "skipped": skipped,
                                              "shortcut_words": res.shortcut_words,
                                              "command": "spurious", "outputs": list(COMMAND_OUTPUTS["spurious"])})
