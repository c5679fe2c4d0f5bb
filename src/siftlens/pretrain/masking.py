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

MASKINGS = ("random", "sift", "sift-curriculum", "edge", "edge-matched", "attmask-high")


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


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy [B] of each row's weights normalised to sum 1 (log N for uniform weights): how far a sampler
    departs from random masking."""
    q = weights / weights.sum(dim=1, keepdim=True)
    return -(q * q.clamp_min(1e-30).log()).sum(dim=1)


def matched_alpha(concentration: torch.Tensor, target_entropy: torch.Tensor, sign: float, eps: float = 1e-3,
                  iters: int = 50, max_abs: float = 64.0) -> torch.Tensor:
    """Per image [B], the alpha (with the given sign) whose weights on ``concentration`` have the target
    entropy: the entropy of normalised (c + eps/N) ** alpha falls as |alpha| grows, so bisect on |alpha|
    (in float64 and log space: large |alpha| would overflow the weights). A target below what ``max_abs``
    reaches gets ``max_abs``."""
    log_base = (concentration.double() + eps / concentration.shape[1]).log()
    target = target_entropy.double()
    lo = torch.zeros(len(concentration), dtype=torch.float64)
    hi = torch.full_like(lo, max_abs)
    for _ in range(iters):
        mid = (lo + hi) / 2
        logq = torch.log_softmax(sign * mid[:, None] * log_base, dim=1)
        too_flat = -(logq.exp() * logq).sum(dim=1) > target
        lo, hi = torch.where(too_flat, mid, lo), torch.where(too_flat, hi, mid)
    return (sign * (lo + hi) / 2).to(concentration.dtype)


def powered_weights(concentration: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(c + eps/N) ** alpha with a per-image alpha [B], scaled so each row's largest weight is 1 (no overflow
    at large |alpha|; the sampler only needs ratios)."""
    logw = alpha[:, None].double() * (concentration.double() + eps / concentration.shape[1]).log()
    return (logw - logw.max(dim=1, keepdim=True).values).exp().to(concentration.dtype)


def masking_noise(strategy: str, uniform: torch.Tensor, sift_concentration: torch.Tensor | None = None,
                  edge_concentration: torch.Tensor | None = None, alpha: float = 1.0,
                  eps: float = 1e-3, attention: torch.Tensor | None = None) -> torch.Tensor:
    """Noise for ``mask_from_noise`` under a masking strategy (see MASKINGS).

    ``uniform`` [B, N] ~ U(0, 1) is the only randomness, drawn by the caller: the same draws give
    random masking's masks under "random" and under any guided strategy with alpha = 0.
    "sift-curriculum" takes the already-scheduled ``alpha`` (see ``alpha_schedule``).
    "edge" is the control: the same sampler on Sobel edge density instead of SIFT concentration.
    "edge-matched" is the control matched to SIFT's departure from random masking: per image, the edge
    sampler's alpha is chosen so that its weights have the same entropy as the SIFT sampler's (SIFT's
    zero-mass patches make its weights far more peaked than the edge weights at the same alpha).
    "attmask-high" is the published anchor (AttMask-High, Kakogeorgiou et al. 2022): the patches the
    encoder's own CLS attention (``attention`` [B, N], see ``guidance.cls_attention``) ranks highest are
    masked, deterministically given the crop; ``uniform`` only breaks exact ties.
    """
    if strategy == "random":
        return uniform
    if strategy == "attmask-high":
        if attention is None:
            raise ValueError("masking 'attmask-high' needs the encoder's CLS attention")
        scale = attention.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        return attention / scale + 1e-6 * uniform  # largest noise = masked: the most attended patches
    if strategy == "edge-matched":
        if sift_concentration is None or edge_concentration is None:
            raise ValueError("masking 'edge-matched' needs the SIFT and the edge concentration maps")
        target = weight_entropy(guidance_weights(sift_concentration, alpha, eps))
        a = matched_alpha(edge_concentration, target, 1.0 if alpha >= 0 else -1.0, eps)
        return guided_noise(uniform, powered_weights(edge_concentration, a, eps))
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

