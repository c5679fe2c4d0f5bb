"""Pictures of what the masking does: crops, their guidance maps, and the masks drawn from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes


def masks_figure(crops01: torch.Tensor, maps: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 grid: int, path: str | Path) -> None:
    """One row per image: the augmented crop, each guidance map, the crop under each mask.

    crops01: [B, 3, S, S] in [0, 1]; maps / masks: name -> [B, grid*grid] (mask 1 = hidden).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, cols = crops01.shape[0], 1 + len(maps) + len(masks)
    fig, axes = plt.subplots(b, cols, figsize=(1.8 * cols, 1.8 * b), squeeze=False)
    size = crops01.shape[-1]
    for i in range(b):
        img = crops01[i].permute(1, 2, 0).numpy()
        panels = [("crop", img, None)]
        panels += [(f"{name} map", m[i].reshape(grid, grid).numpy(), "magma") for name, m in maps.items()]
        for name, m in masks.items():
            keep = 1 - np.kron(m[i].reshape(grid, grid).numpy(), np.ones((size // grid, size // grid)))
            panels.append((f"mask: {name}", img * keep[..., None] + 0.5 * (1 - keep[..., None]), None))
        for ax, (title, data, cmap) in zip(axes[i], panels):
            ax.imshow(data, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
