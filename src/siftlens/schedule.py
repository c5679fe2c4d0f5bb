"""The learning-rate schedule shared by supervised training (train.py) and MAE pre-training (pretrain/)."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps (step 0 gets lr / warmup), then cosine decay to ``min_lr`` at
    ``total`` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
