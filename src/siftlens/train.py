"""Supervised training of small ViTs on in-memory image tensors.

Used to build the bundled model (``scripts/train_bundled_model.py``, images decoded by
``image_source.load_image_folder``) and the planted-cue benchmarks (``benchmarks/planted``).
Deliberately plain: decoded uint8 tensors in memory, on-the-fly crop/flip on the batch, AdamW with
warm-up + cosine, label smoothing. Everything is seeded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedule import warmup_cosine_lr

AUGMENTATIONS = ("crop_flip", "none")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    seed: int = 0
    # "crop_flip": random resized crop + horizontal flip (the default); "none": centre crop to
    # ``size`` only, so that content at a fixed pixel position (a planted cue) stays in place.
    augment: str = "crop_flip"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment {self.augment!r} is not one of {AUGMENTATIONS}")


def random_resized_crop_flip(x: torch.Tensor, size: int, scale: tuple[float, float],
                             generator: torch.Generator) -> torch.Tensor:
    """Batch RandomResizedCrop + horizontal flip via affine grids. x: [B, C, H, W] float."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    sh = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of ``size`` from a batch [B, C, H, W] (no-op when H == W == size)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def normalize(x_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = x_uint8.float() / 255.0
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int,
             mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 256) -> float:
    """Top-1 accuracy on centre crops of ``size`` from uint8 images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], mean, std)
        off = (x.shape[-1] - size) // 2
        x = x[..., off:off + size, off:off + size]
        correct += (model(x).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int,
                     mean: tuple[float, ...], std: tuple[float, ...], cfg: TrainConfig,
                     eval_fn=None, log=print) -> list[dict]:
    """Train ``model`` on uint8 images [N,3,S,S] with random crops to ``size`` (or centre crops when
    ``cfg.augment == "none"``). Returns a log."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, total, warmup, cfg.lr)

    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        t0, loss_sum = time.time(), 0.0
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = normalize(images[idx], mean, std)
            if cfg.augment == "crop_flip":
                x = random_resized_crop_flip(x, size, cfg.crop_scale, g)
            else:
                x = center_crop(x, size)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(images), "seconds": time.time() - t0}
        if eval_fn is not None:
            row["val_acc"] = eval_fn(model)
        history.append(row)
        log(row)
    return history
