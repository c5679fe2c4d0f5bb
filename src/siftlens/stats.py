"""Weighted patch interrelation analysis (METHOD.md §2), batched over images, heads and maps.

Shapes: B images, H heads, T = P + n tokens (P prefix, n patches), M maps, G groups.
Undefined maps (an image without keypoints) are rows of NaN in ``C``; NaN propagates, so those
statistics come out NaN and are skipped by the aggregates, never divided by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

EPS = 1e-12
# Smallest effect (in units of S, where 1 = attention blind to the map) that counts as a finding, per map and
# per layer (verdict.py). Random-weights ViTs prefer their own image's SIFT map over other images' maps by
# ~0.001-0.01 (a real but trivial effect of attention following image contrast); a pretrained DINOv2-S/14 by 1-2.
MIN_EFFECT = 0.05


@dataclass
class BatchMaps:
    """Everything about the maps that does not depend on attention, prepared once per batch."""

    C: torch.Tensor  # [B, M, n] concentrations (NaN rows where undefined)
    groups_onehot: torch.Tensor  # [B, n, G] SIFT concentration groups
    sift_valid: torch.Tensor  # [B] bool: image has a SIFT map
    rankC: torch.Tensor  # [B, M, n] centred, unit-norm average ranks of each map
    partial_basis: torch.Tensor  # [B, n, k] orthonormal basis of (1, rank edges, rank centre)
    rank_sift_resid: torch.Tensor  # [B, n] SIFT ranks with the controls removed, unit norm
    dist: torch.Tensor  # [n, n] patch-centre distances in input pixels
    C_null: torch.Tensor | None = None  # [B, K, n] K null SIFT maps per image (other images' maps, or rearranged)
    # the maps above the group indicators, so that one matmul per layer weighs Ã's keys by all of them
    key_weights: torch.Tensor | None = None  # [B, M + G, n] = [C; groups_onehot^T]
    # the image-swap null without a [B, K, n] copy: the bank's maps [K + 1, n], shared by the batch, and the K of
    # them each image is tested against [B, K] (``swap_columns``); used instead of C_null when given
    null_bank: torch.Tensor | None = None
    null_keep: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key_weights is None:
            self.key_weights = torch.cat([self.C, self.groups_onehot.transpose(1, 2)], 1).contiguous()

    @property
    def has_null(self) -> bool:
        return self.C_null is not None or self.null_bank is not None

    def null_dots(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, K]: Σ_j x_bhj c_kj for each image's K null maps; x: [B, H, n]. NaN for an image without a SIFT
        map (no test). With a shared bank this is one [B·H, n] x [n, K + 1] matmul for the whole batch (then each
        image's own column is dropped), not B small products against a gathered [B, K, n] copy."""
        if self.C_null is not None:
            return einsum(x, self.C_null.to(x.device), "b h j, b k j -> b h k")
        B, H, n = x.shape
        every = (x.reshape(B * H, n) @ self.null_bank.to(x.device).T).view(B, H, -1)  # [B, H, K + 1]
        keep = self.null_keep.to(x.device)[:, None, :].expand(B, H, -1)
        return torch.where(self.sift_valid.to(x.device)[:, None, None], every.gather(-1, keep), torch.nan)

    def narrow(self, start: int, end: int) -> BatchMaps:
        """The same maps for images start..end-1 of the batch."""
        def cut(t):
            return None if t is None else t[start:end]

        return BatchMaps(cut(self.C), cut(self.groups_onehot), cut(self.sift_valid), cut(self.rankC),
                         cut(self.partial_basis), cut(self.rank_sift_resid), self.dist, cut(self.C_null),
                         cut(self.key_weights), self.null_bank, cut(self.null_keep))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, ties get their average rank (as scipy.stats.rankdata)."""
    shape, n = x.shape, x.shape[-1]
    flat = x.reshape(-1, n)
    sorted_x, order = flat.sort(dim=-1, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    gid = new_group.long().cumsum(-1) - 1 + torch.arange(len(flat), device=x.device)[:, None] * n
    pos = torch.arange(n, device=x.device, dtype=x.dtype).expand_as(flat).reshape(-1)
    sums = torch.zeros(len(flat) * n, device=x.device, dtype=x.dtype).index_add_(0, gid.reshape(-1), pos)
    cnts = torch.zeros_like(sums).index_add_(0, gid.reshape(-1), torch.ones_like(pos))
    avg_sorted = (sums / cnts.clamp_min(1))[gid] + 1
    ranks = torch.empty_like(flat).scatter_(-1, order, avg_sorted)
    return ranks.reshape(shape)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Centre and scale the last dim to unit norm (constant vectors -> NaN: correlation undefined)."""
    v = v - v.mean(-1, keepdim=True)
    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 1e-9, v / norm.clamp_min(1e-12), torch.full_like(v, float("nan")))


def patch_distances(grid: tuple[int, int], patch: int, device=None) -> torch.Tensor:
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pts = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1).float() * patch
    return torch.cdist(pts, pts)


# swap: each image's attention against other images' SIFT maps at the same input size (the default: it keeps
# what all maps share — spatial autocorrelation, centre bias, keypoint density — and is calibrated, see
# benchmarks/bench_calibration.py); shift: cyclic shifts + flips of the image's own map; permute: shuffles
# over patches (anti-conservative: smooth attention and smooth maps look significant just for being smooth).
NULL_MODES = ("swap", "shift", "permute")
ANTI_CONSERVATIVE_NULLS = ("permute",)


def null_indices(n_perm: int, grid: tuple[int, int], seed: int, mode: str = "permute") -> torch.Tensor:
    """[K, n] patch indices of K null maps for one image (the within-image nulls, shift and permute).

    permute: uniform shuffles over patches (anti-conservative on smooth maps). shift: random cyclic shifts
    of the grid (with random flips), which keep the map's spatial autocorrelation.
    """
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    if mode == "permute":
        return torch.rand(n_perm, h * w, generator=g).argsort(-1)
    if mode != "shift":
        raise ValueError(f"null mode {mode!r} has no within-image rearrangement (use shift or permute)")
    dy = torch.randint(0, h, (n_perm,), generator=g)
    dx = torch.randint(0, w, (n_perm,), generator=g)
    flip = torch.randint(0, 4, (n_perm,), generator=g)
    # out[k, i, j] = the patch index torch.roll(grid, (dy, dx)) puts at (i, j), after the optional flips
    i = torch.arange(h)[None, :, None].expand(n_perm, h, w)
    j = torch.arange(w)[None, None, :].expand(n_perm, h, w)
    i = torch.where((flip & 1).bool()[:, None, None], h - 1 - i, i)
    j = torch.where((flip & 2).bool()[:, None, None], w - 1 - j, j)
    rows = (i - dy[:, None, None]) % h
    cols = (j - dx[:, None, None]) % w
    return (rows * w + cols).reshape(n_perm, h * w)


def permuted_maps(c: torch.Tensor, seeds: list[int], n_perm: int, grid: tuple[int, int] | None = None,
                  mode: str = "permute") -> torch.Tensor:
    """[B, n] -> [B, K, n]: each image's map rearranged over patches K times, seeded per image."""
    grid = grid or (1, c.shape[-1])
    perms = torch.stack([null_indices(n_perm, grid, s, mode) for s in seeds]).to(c.device)
    return torch.gather(c[:, None].expand(-1, n_perm, -1), 2, perms)


def swap_columns(bank_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The image-swap null's choice: [B, K] indices of the K bank maps each image is tested against.

    The bank holds the SIFT maps of K + 1 images of the run (ids ``bank_ids`` [K + 1]); each image gets the
    K bank maps that are not its own (an image outside the bank drops the bank's last map), so every
    image is tested against the same number of maps and p-values share one resolution, 1 / (K + 1).
    """
    K = len(bank_ids) - 1
    own = image_ids[:, None] == bank_ids[None, :]  # [B, K + 1]
    # drop the own map if present, else the last one: keep = the first K of the others
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(image_ids, K))
    keep = torch.arange(K + 1, device=bank_ids.device)[None, :].expand(len(image_ids), -1)
    return keep[keep != drop[:, None]].view(len(image_ids), K)


def swapped_maps(bank: torch.Tensor, bank_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The image-swap null as a [B, K, n] copy of each image's K other images' SIFT maps (``swap_columns``);
    ``prepare_maps(null_bank=, null_keep=)`` uses the bank without this copy."""
    return bank[swap_columns(bank_ids.to(bank.device), image_ids.to(bank.device))]


def prepare_maps(C: torch.Tensor, groups: torch.Tensor, map_names: tuple[str, ...], num_groups: int,
                 grid: tuple[int, int], patch: int, null_seeds: list[int] | None = None,
                 n_perm: int = 0, null_mode: str = "permute", C_null: torch.Tensor | None = None,
                 null_bank: torch.Tensor | None = None, null_keep: torch.Tensor | None = None) -> BatchMaps:
    """Ranks, residual bases, one-hot groups and the null maps for a batch of maps.

    C: [B, M, n] (map 0 is SIFT), groups: [B, n]. The null: the image-swap null as a shared bank of maps
    ``null_bank`` [K + 1, n] with each image's columns ``null_keep`` [B, K] (``swap_columns``), or ``C_null``
    [B, K, n] given by the caller (e.g. ``swapped_maps``), or ``n_perm`` > 0 rearrangements of each image's own
    map (``null_mode`` shift or permute) seeded by ``null_seeds``.
    """
    C = C.float()
    rankC = _unit(average_ranks(torch.nan_to_num(C, nan=0.0)))
    rankC = torch.where(torch.isnan(C).any(-1, keepdim=True), torch.nan, rankC)
    B, _, n = C.shape
    # partial rank correlation: remove (constant, rank of edge density, rank of centre prior)
    controls = [torch.ones(B, n, device=C.device)]
    for name in ("edges", "center"):
        if name in map_names:
            controls.append(average_ranks(torch.nan_to_num(C[:, map_names.index(name)], nan=0.0)))
    Z = torch.stack(controls, -1)  # [B, n, k]
    basis = torch.linalg.qr(Z).Q  # [B, n, k]
    rs = average_ranks(torch.nan_to_num(C[:, 0], nan=0.0))
    rs = rs - einsum(basis, einsum(basis, rs, "b n k, b n -> b k"), "b n k, b k -> b n")
    rs = _unit(rs)
    sift_valid = ~torch.isnan(C[:, 0]).any(-1)
    rs = torch.where(sift_valid[:, None], rs, torch.nan)
    onehot = torch.nn.functional.one_hot(groups.long(), num_groups).float()
    if C_null is None and n_perm and null_seeds is not None:
        C_null = permuted_maps(C[:, 0], null_seeds, n_perm, grid, null_mode)
    if C_null is not None:  # an image without its own SIFT map has no test
        C_null = torch.where(sift_valid[:, None, None], C_null.float(), torch.nan)
    if null_bank is not None:
        return BatchMaps(C, onehot, sift_valid, rankC, basis, rs, patch_distances(grid, patch, C.device),
                         null_bank=null_bank.float(), null_keep=null_keep)
    return BatchMaps(C, onehot, sift_valid, rankC, basis, rs, patch_distances(grid, patch, C.device), C_null)


def permutation_test(observed: torch.Tensor, null: torch.Tensor, min_effect: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z-score, one-sided p-value and null mean of ``observed`` [...] against ``null`` [..., K].

    p = (1 + #{null + min_effect >= observed}) / (K + 1): the test of "the own map beats the null maps by
    more than ``min_effect``" (a minimum-effect test; 0 gives the plain permutation p). A NaN observed value
    or null (non-finite attention, no map) gives NaN, never a p-value."""
    mean = null.mean(-1)
    # one null map has no spread: z is undefined (NaN), the p-value still is
    sd = null.std(-1) if null.shape[-1] > 1 else torch.full_like(mean, float("nan"))
    z = (observed - mean) / sd.clamp_min(1e-12)
    tol = 1e-5 * observed.abs()[..., None]  # float ties (e.g. uniform attention) count as >=
    p = ((1 + (null + min_effect >= observed[..., None] - tol).sum(-1)) / (null.shape[-1] + 1)).float()
    undefined = torch.isnan(observed) | torch.isnan(null).any(-1)
    nan = torch.tensor(float("nan"), device=observed.device)
    return torch.where(undefined, nan, z), torch.where(undefined, nan, p), torch.where(undefined, nan, mean)


class Workspace:
    """Scratch tensors reused from layer to layer. A fresh [B, H, n, n] CPU tensor is page-faulted in on
    every first touch, which costs several times the arithmetic done on it; reuse avoids that."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device (valid until the next get)."""
        numel = shape.numel()
        buf = self._bufs.get(name)
        if (buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device
                or buf.is_inference() != torch.is_inference_mode_enabled()):
            buf = self._bufs[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


CHUNK_ELEMENTS = 2**25  # images per statistics chunk are chosen so each [b, H, n, n] temporary stays ~128 MB


def layer_statistics(attn: torch.Tensor, num_prefix: int, cls_index: int | None,
                     maps: BatchMaps, workspace: Workspace | None = None, min_effect: float = MIN_EFFECT
                     ) -> dict[str, torch.Tensor]:
    """All per-image, per-head statistics of one layer. attn: [B, H, T, T] post-softmax.

    Per-map p-values test S_own > S_null + ``min_effect`` (see ``permutation_test``).

    Large batches of long sequences are reduced in chunks of images to bound the temporaries.
    ``workspace``: pass the same one for every layer to reuse the large temporaries.
    """
    B, H, T, _ = attn.shape
    ws = None if attn.requires_grad and torch.is_grad_enabled() else workspace  # out= has no autograd
    chunk = max(1, CHUNK_ELEMENTS // (H * T * T))
    if chunk >= B:
        return _layer_statistics(attn, num_prefix, cls_index, maps, ws, min_effect)
    parts = [_layer_statistics(attn[i:i + chunk], num_prefix, cls_index, maps.narrow(i, i + chunk), ws, min_effect)
             for i in range(0, B, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _layer_statistics(attn: torch.Tensor, num_prefix: int, cls_index: int | None,
                      maps: BatchMaps, ws: Workspace | None, min_effect: float) -> dict[str, torch.Tensor]:
    # Few, large operations on purpose: each [B, H, n, n] pass costs memory bandwidth, and each torch
    # op pays a thread synchronisation that is expensive when the cores are shared with the SIFT workers.
    A = attn.float()
    dev = A.device
    P, C = num_prefix, maps.C.to(dev)
    B, H = A.shape[:2]
    M = C.shape[1]
    pp = A[..., P:, P:]  # [B, H, n, n] patch queries -> patch keys
    n = pp.shape[-1]
    row = pp.sum(-1, keepdim=True)
    At = torch.div(pp, row.clamp_min(EPS), out=ws.get("At", pp.shape, pp) if ws else None)  # Ã: rows sum to 1
    out: dict[str, torch.Tensor] = {"prefix_mass": (1 - row.squeeze(-1)).mean(-1)}  # [B, H]

    # One pass over Ã for all maps and groups: key_mass[b, p, h, i] = Σ_j W_pj Ã_ij, W = [c_m; 1{j in g}].
    # Written as W @ Ã^T: with the thin side first the matmul runs about twice as fast on CPU.
    W = maps.key_weights.to(dev)  # [B, M + G, n]
    key_mass = (W @ At.reshape(B, H * n, n).transpose(1, 2)).view(B, -1, H, n)
    # ... and the same weights over the queries: Q[b, h, p, q] = Σ_i W_pi key_mass_qi holds both
    # Σ_i c_mi Σ_j Ã_ij c_mj (diagonal of the map block: S_pp^w) and Σ_{i in g} Σ_{j in f} Ã_ij (the lift)
    Q = einsum(W, key_mass, "b p i, b q h i -> b h p q")
    out["s_ppw"] = n * Q[..., :M, :M].diagonal(dim1=-2, dim2=-1)

    col_mean = At.mean(-2)  # [B, H, n]: mean over queries of Ã_ij
    out["s_pp"] = n * einsum(col_mean, C, "b h j, b m j -> b h m")
    if maps.has_null:
        null = n * maps.null_dots(col_mean)
        out["s_pp_z"], out["s_pp_p"], out["s_pp_null"] = permutation_test(out["s_pp"][..., 0], null, min_effect)
    if cls_index is not None:
        a = A[:, :, cls_index, P:]
        a = a / a.sum(-1, keepdim=True).clamp_min(EPS)  # [B, H, n]
        out["s_cls"] = n * einsum(a, C, "b h j, b m j -> b h m")
        if maps.has_null:
            null = n * maps.null_dots(a)
            out["s_cls_z"], out["s_cls_p"], out["s_cls_null"] = permutation_test(out["s_cls"][..., 0], null, min_effect)

    # Σ_j -Ã_ij log Ã_ij (entr's value, 0 log 0 = 0, with a vectorised log; entr itself is scalar code)
    plogp = torch.clamp_min(At, torch.finfo(At.dtype).tiny, out=ws.get("plogp", At.shape, At) if ws else None)
    plogp.log_().mul_(At)
    out["entropy_pp"] = -plogp.sum(-1).mean(-1)
    out["mean_dist_px"] = einsum(At, maps.dist.to(dev), "b h i j, i j -> b h") / n

    if cls_index is not None:
        ra = _unit(average_ranks(a))
        out["spearman"] = einsum(ra, maps.rankC.to(dev), "b h n, b m n -> b h m")
        basis = maps.partial_basis.to(dev)
        ra_res = ra - einsum(basis, einsum(basis, ra, "b n k, b h n -> b h k"), "b n k, b h k -> b h n")
        out["partial_spearman_sift"] = einsum(_unit(ra_res), maps.rank_sift_resid.to(dev), "b h n, b n -> b h")
        out["entropy_cls"] = torch.special.entr(a).sum(-1)
        out["cls_attn"] = a  # kept by the caller only for example images

    # group interrelation lift: observed mass between groups over the mass uniform attention gives
    obs = Q[..., M:, M:]  # Σ_{i∈g} Σ_{j∈f} Ã_ij
    size = maps.groups_onehot.to(dev).sum(1)  # [B, G]
    exp = einsum(size, size, "b g, b f -> b g f") / n  # |g| |f| / n
    valid = maps.sift_valid.to(dev)[:, None, None, None]
    out["lift_obs"] = torch.where(valid, obs, 0.0)
    out["lift_exp"] = torch.where(valid, exp[:, None].expand_as(obs), 0.0)
    out["lift"] = torch.where(valid & (exp[:, None] > 0), obs / exp[:, None].clamp_min(EPS), torch.nan)
    return out


class RolloutState:
    """Attention rollout (Abnar & Zuidema): R = M_L ··· M_1, M_l = (A_l mean over heads + I)/2, rows renormalised.

    Each layer's M_l is kept ([B, T, T] per layer, for one batch) and multiplied out only when asked: the CLS
    row of R is e_cls^T M_L ··· M_1, L vector-matrix products (B·T² each) from the last layer down, instead of
    the L matrix products (B·T³ each) of accumulating R layer by layer (ViT-S/16: ~4.6 ms of CPU per image)."""

    def __init__(self) -> None:
        self.layers: list[torch.Tensor] = []

    def update(self, attn: torch.Tensor) -> None:
        A = attn.float().mean(1).mul_(0.5)  # [B, T, T]
        A.diagonal(dim1=-2, dim2=-1).add_(0.5)  # 0.5 A + 0.5 I, in place (the same floats)
        A /= A.sum(-1, keepdim=True)
        self.layers.append(A)

    @property
    def R(self) -> torch.Tensor | None:
        """The whole rollout matrix [B, T, T] (for models that pool their patch rows; B·T³ per layer)."""
        R = None
        for M in self.layers:
            R = M if R is None else M @ R
        return R

    def cls_map(self, num_prefix: int, cls_index: int | None) -> torch.Tensor | None:
        """Rollout from the CLS token to the patches, renormalised: [B, n]."""
        if not self.layers or cls_index is None:
            return None
        r = self.layers[-1][:, cls_index, :]  # [B, T]: e_cls^T M_L
        for M in reversed(self.layers[:-1]):
            r = (r.unsqueeze(1) @ M).squeeze(1)  # [B, 1, T] @ [B, T, T] -> [B, T]
        r = r[:, num_prefix:]
        return r / r.sum(-1, keepdim=True).clamp_min(EPS)
