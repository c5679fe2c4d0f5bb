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
from .discover import DiscoveryConfig, DiscoveryResult, discover_shortcuts, exemplar_crops  # noqa: E402


def read_labels(images: list[Path], labels: str | None, root: Path | None) -> tuple[np.ndarray, list[str]]:
    """Labels from a CSV (columns path,label) or, with labels=None, from ImageFolder directory names."""
    if labels is None:
        if root is None or not root.is_dir():
            raise ValueError("--labels is required unless --images is an ImageFolder directory (class/*.jpg)")
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in images]
        if any(n is None for n in names):
            raise ValueError(f"--images {root}: files directly in the root have no class folder; pass --labels CSV")
    else:
        df = pd.read_csv(labels)
        if not {"path", "label"} <= set(df.columns):
            raise ValueError(f"--labels {labels}: needs columns 'path' and 'label' (has {list(df.columns)})")
        by_path = {str(Path(p)): str(lab) for p, lab in zip(df["path"], df["label"])}
        by_name = {Path(p).name: str(lab) for p, lab in zip(df["path"], df["label"])}
        names = [by_path.get(str(p), by_name.get(p.name)) for p in images]
        missing = [str(p) for p, n in zip(images, names) if n is None]
        if missing:
            raise ValueError(f"--labels {labels}: no label for {len(missing)} of {len(images)} images "
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
        raise ValueError(f"--images {source}: no readable image")
    return torch.stack(xs), keep, skipped


def run_spurious(model: str | LoadedModel, images: str | Path, out: str | Path, labels: str | None = None,
                 min_per_class: int = 5, cfg: DiscoveryConfig | None = None, checkpoint: str | None = None,
                 random_init: bool = False, device: str = "cpu") -> DiscoveryResult:
    cfg = cfg or DiscoveryConfig()
    out = ensure_writable_dir(out)
    lm = model if isinstance(model, LoadedModel) else load_model(model, checkpoint=checkpoint,
                                                                 random_init=random_init, device=device)
    paths = find_images(images)
    root = Path(images) if Path(images).is_dir() else None
    y, class_names = read_labels(paths, labels, root)
    x, keep, skipped = load_inputs(lm, paths, images)
    y = y[keep]
    counts = np.bincount(y, minlength=len(class_names))
    small = [f"{class_names[k]} ({c})" for k, c in enumerate(counts) if c < min_per_class]
    if small:
        raise ValueError(f"classes with fewer than {min_per_class} images: {', '.join(small)}")
    with torch.no_grad():
        logits = lm.forward(x[:1])
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"--model {lm.name}: has no classifier head (output shape {tuple(logits.shape)}); "
                         "discovery needs class logits")
    res = discover_shortcuts(lm, x, y, class_names, cfg)
    res.per_image.insert(0, "path", [str(paths[i]) for i in keep])
    _write_outputs(out, res, x, lm, skipped)
    return res


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write_outputs(out: Path, res: DiscoveryResult, x: torch.Tensor, lm: LoadedModel, skipped: list) -> None:
    atomic_write_parquet(res.per_image, out / "reliance.parquet")
    atomic_write_text(out / "motifs.csv", res.motifs.to_csv(index=False))
    res.save_words(out / "shortcut_words.npz")  # for `siftlens prompt --method mask_tokens --motifs DIR`
    rgb = np.stack([lm.preprocess.to_uint8_rgb(xi) for xi in x])
    parts = [f"<h1>siftlens spurious: {html.escape(lm.name)}</h1>",
             "<p class=note>Per class, keypoint motifs (SIFT visual words) under the decisive (late-layer CLS) "
             "attention, ranked by attention lift × class specificity × (0.5 + 0.5·position stability). "
             "Lift 1 = uniform attention; specificity = f_in²/(f_in+f_out).</p>"]
    for k, name in enumerate(res.class_names):
        top = res.motifs[res.motifs["cls"] == k].head(3)
        if top.empty:
            continue
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(top[["rank", "word", "score", "lift", "f_in", "f_out", "stability", "mean_x", "mean_y",
                          "n_keypoints"]].to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
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
    pi = res.per_image
    parts.append("<h2>Reliance</h2><p>Share of decisive attention on shortcut-motif or background patches "
                 f"(vs the image's semantic patches): median {pi['reliance'].median():.3f}; "
                 f"{(pi['reliance'] > 0.5).mean():.0%} of images above 0.5 (flagged).</p>")
    top = pi.sort_values("reliance", ascending=False).head(20)
    parts.append(top.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
    if skipped:
        parts.append(f"<h2>Skipped ({len(skipped)})</h2><ul>" +
                     "".join(f"<li>{html.escape(s['reason'])}</li>" for s in skipped) + "</ul>")
    atomic_write_text(out / "spurious.html", f"<!doctype html><html><head><meta charset=utf-8><style>{CSS}</style>"
                                             f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_json(out / "manifest.json", {"model": lm.name, "classes": res.class_names,
                                              "n_images": len(pi), "skipped": skipped,
                                              "shortcut_words": res.shortcut_words})
