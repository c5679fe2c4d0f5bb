"""`siftlens prompt`: predictions with and without attention steering, on a user's images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..io import atomic_write_json, atomic_write_parquet, ensure_writable_dir
from ..models import load_model
from ..preprocess import find_images
from ..prompting import TOKEN_MASK_METHODS, SteeredViT
from ..runguard import COMMAND_OUTPUTS, holds_out_lock, retire_outputs
from ..validation import UserValueError, check_finite_output, check_finite_parameters
from .discover import ShortcutMasker
from .run import load_inputs, read_labels


@holds_out_lock("prompt")
def run_prompt(model: str, images: str | Path, out: str | Path, method: str = "sift_bias",
               layers: str | list[int] = "late", beta: float = 1.0, motifs: str | None = None,
               labels: str | None = None, batch_size: int = 32, seed: int = 0, checkpoint: str | None = None,
               random_init: bool = False) -> dict:
    """Write predictions.parquet (before/after) and summary.json; return the summary."""
    out = ensure_writable_dir(out)
    if batch_size < 1:
        raise UserValueError(f"--batch-size must be >= 1 (got {batch_size})")
    lm = load_model(model, checkpoint=checkpoint, random_init=random_init)
    check_finite_parameters(lm.module, lm.name)
    token_mask_fn = None
    if method in TOKEN_MASK_METHODS:
        if motifs is None:
            raise UserValueError(f"--method {method} needs --motifs DIR (the output of `siftlens spurious`)")
        words = Path(motifs) / "shortcut_words.npz"
        if not words.is_file():
            raise FileNotFoundError(f"--motifs {motifs}: no shortcut_words.npz (run `siftlens spurious` first)")
        token_mask_fn = ShortcutMasker.load(lm, words)
    paths = find_images(images)
    y = None
    if labels != "none":
        root = Path(images) if Path(images).is_dir() else None
        try:
            y, _ = read_labels(paths, labels, root)
        except ValueError:
            if labels is not None:
                raise
    x, keep, skipped = load_inputs(lm, paths, images)
    steered = SteeredViT(lm, method, layers=layers, beta=beta, token_mask_fn=token_mask_fn, seed=seed)
    before, after = [], []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            before.append(lm.forward(x[s:s + batch_size]).float().softmax(-1))
            after.append(steered(x[s:s + batch_size]).float().softmax(-1))
    steered.remove()
    for p in (*before, *after):
        check_finite_output(p, lm.name)
    pb, pa = torch.cat(before).numpy(), torch.cat(after).numpy()
    df = pd.DataFrame({"path": [str(paths[i]) for i in keep], "pred_before": pb.argmax(1),
                       "conf_before": pb.max(1), "pred_after": pa.argmax(1), "conf_after": pa.max(1)})
    summary = {"model": lm.name, "method": method, "layers": layers, "beta": beta, "n_images": len(df),
               "skipped": skipped, "changed_predictions": float((df.pred_before != df.pred_after).mean())}
    if y is not None and lm.label_names is None:
        summary["note"] = "model has no label names: accuracy assumes label index order = class folder order"
    if y is not None:
        df["label"] = y[keep]
        summary["accuracy_before"] = float((df.pred_before == df.label).mean())
        summary["accuracy_after"] = float((df.pred_after == df.label).mean())
    summary["command"], summary["outputs"] = "prompt", list(COMMAND_OUTPUTS["prompt"])
    retire_outputs(out, "prompt")
    atomic_write_parquet(df, out / "predictions.parquet")
    atomic_write_json(out / "summary.json", summary)
    return summary
