"""Which patches MAE hides: swappable masking functions (METHOD.md §5).

All share MAE's contract (facebookresearch/mae ``random_masking``): given per-patch *noise*, the
patches with the smallest noise stay visible and the rest are masked. Guided masking only changes
the noise: ``u ** (1 / w)`` with u ~ U(0, 1) and w = (c + eps) ** alpha is the Efraimidis–Spirakis
key, so taking the largest keys masks a set drawn without replacement with draw probabilities
∝ w. With alpha = 0 (or uniform c) the keys are monotone in u, so guided masking with the same
generator gives exactly random masking's masks.
"""

from __future__ import annotations

import math

import torch

MASKINGS = ("random", "sift", "sift-curriculum", "edge")


def mask_from_noise(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's masking step. x: [B, N, D] tokens, noise: [B, N] (small = kept visible).

    Returns x_visible [B, n_keep, D], mask [B, N] (1 = masked, in the original order) and
    ids_restore [B, N] (unshuffles [visible, masked] back to patch order).
    """
    b, n, d = x.shape
    n_keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first n_keep stay visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def guidance_weights(concentration: torch.Tensor, alpha: float, eps: float = 1e-3) -> torch.Tensor:
    """w_j = (c_j + eps/N) ** alpha: alpha > 0 masks high-concentration patches more often,
    alpha < 0 keeps them visible. concentration: [B, N], rows sum to 1 (or all zero: no keypoints,
    which gives uniform weights, i.e. random masking for that image)."""
    n = concentration.shape[1]
    # eps is relative to the uniform share 1/N so that its meaning does not change with the grid
    return (concentration + eps / n).pow(alpha)


def guided_noise(uniform: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Noise whose *largest* entries form a weighted sample without replacement (∝ weights).

    mask_from_noise keeps the smallest noise visible, i.e. masks the largest keys u ** (1 / w).
    Computed in log space (log u / w) for stability; only the order matters.
    """
    return uniform.clamp_min(1e-12).log() / weights.clamp_min(1e-30)


def alpha_schedule(start: float, end: float, progress: float, shape: str = "linear") -> float:
    """alpha for the curriculum at training progress in [0, 1] (linear or cosine from start to end)."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    elif shape != "linear":
        raise ValueError(f"alpha schedule {shape!r} is not 'linear' or 'cosine'")
    return start + (end - start) * progress


def masking_noise(strategy: str, uniform: torch.Tensor, sift_concentration: torch.Tensor | None = None,
                  edge_concentration: torch.Tensor | None = None, alpha: float = 1.0,
                  eps: float = 1e-3) -> torch.Tensor:
    """Noise for ``mask_from_noise`` under a masking strategy (see MASKINGS).

    ``uniform`` [B, N] ~ U(0, 1) is the only randomness, drawn by the caller: the same draws give
    random masking's masks under "random" and under any guided strategy with alpha = 0.
    "sift-curriculum" takes the already-scheduled ``alpha`` (see ``alpha_schedule``).
    "edge" is the control: the same sampler on Sobel edge density instead of SIFT concentration.
    """
    if strategy == "random":
        return uniform
    if strategy in ("sift", "sift-curriculum"):
        c = sift_concentration
    elif strategy == "edge":
        c = edge_concentration
    else:
        raise ValueError(f"masking {strategy!r} is not one of {MASKINGS}")
    if c is None:
        raise ValueError(f"masking {strategy!r} needs its concentration map")
    return guided_noise(uniform, guidance_weights(c, alpha, eps))


def loss_weights(concentration: torch.Tensor, gamma: float, eps: float = 1e-3) -> torch.Tensor:
    """KAMIM-style reconstruction weights per patch, (c_j + eps/N) ** gamma scaled to mean 1 per
    image (so the loss scale does not depend on gamma). gamma = 0 gives MAE's plain loss."""
    w = guidance_weights(concentration, gamma, eps)
    return w / w.mean(dim=1, keepdim=True)

