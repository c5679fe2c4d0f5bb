"""Per-step guidance maps for pre-training, computed on the batch in torch for almost nothing.

SIFT runs once per stored image (``detect_keypoint_table``); every step the keypoints are mapped
through that sample's crop/flip (``transform_keypoints``) and splatted onto the patch grid
(``box_footprint_mass``). The edge control is Sobel density of the augmented batch itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from ..io import atomic_write_npz
from ..preprocess import rgb01_to_gray_u8
from ..semantic_maps import SiftParams, detect_sift


@dataclass
class CropParams:
    """Per-sample RandomResizedCrop box in source pixels + flip, for a batch: all [B]."""

    x0: torch.Tensor
    y0: torch.Tensor
    w: torch.Tensor
    h: torch.Tensor
    flip: torch.Tensor  # bool


def sample_crop_params(batch: int, src_hw: tuple[int, int], scale: tuple[float, float],
                       generator: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       flip: bool = True) -> CropParams:
    """torchvision RandomResizedCrop's distribution (area fraction ~ U(scale), log aspect ~ U),
    clamped to the image instead of retried, vectorised over the batch."""
    H, W = src_hw
    area = torch.empty(batch).uniform_(*scale, generator=generator)
    log_r = torch.empty(batch).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator)
    w = ((area * log_r.exp()).sqrt() * W).clamp(max=W)
    h = ((area / log_r.exp()).sqrt() * H).clamp(max=H)
    x0 = torch.rand(batch, generator=generator) * (W - w)
    y0 = torch.rand(batch, generator=generator) * (H - h)
    f = torch.rand(batch, generator=generator) < 0.5
    return CropParams(x0, y0, w, h, f & flip)


def apply_crop(x: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
    """Resample each image's box to size x size (bilinear), flipped where p.flip. x: [B, C, H, W]."""
    b, c, H, W = x.shape
    sign = torch.where(p.flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype)
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False)
    theta[:, 0, 0] = p.w / W * sign
    theta[:, 0, 2] = (p.x0 + p.w / 2) / W * 2 - 1
    theta[:, 1, 1] = p.h / H
    theta[:, 1, 2] = (p.y0 + p.h / 2) / H * 2 - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def transform_keypoints(kp: torch.Tensor, valid: torch.Tensor, p: CropParams, size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Map keypoints [B, K, 4] (x, y, diameter, response; source pixels, 0 = left edge) through
    the crop/flip to a size x size output. Keypoints whose centre leaves the crop are dropped."""
    sx, sy = size / p.w, size / p.h  # [B]
    x = (kp[..., 0] - p.x0[:, None]) * sx[:, None]
    x = torch.where(p.flip[:, None], size - x, x)
    y = (kp[..., 1] - p.y0[:, None]) * sy[:, None]
    d = kp[..., 2] * (sx * sy).sqrt()[:, None]  # aspect changes: geometric mean of the two scales
    out = torch.stack([x, y, d, kp[..., 3]], dim=-1)
    inside = valid & (x >= 0) & (x < size) & (y >= 0) & (y < size)
    return out, inside


def _overlap_1d(center: torch.Tensor, half: torch.Tensor, n: int, patch: int) -> torch.Tensor:
    """Length of [center - half, center + half] inside each of n cells of width patch: [..., n]."""
    edges = torch.arange(n, dtype=center.dtype) * patch
    lo = torch.maximum((center - half)[..., None], edges)
    hi = torch.minimum((center + half)[..., None], edges + patch)
    return (hi - lo).clamp_min(0)


def box_footprint_mass(kp: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], patch: int,
                       weight: str = "response") -> torch.Tensor:
    """Semantic mass per patch [B, h*w] for a batch of keypoints [B, K, 4].

    Each keypoint's disc is replaced by the square of equal area (half-side r·√π/2), whose patch
    overlaps factorise into x and y overlaps: exact for the square, within a few % of the disc
    footprint in ``semantic_maps.keypoint_mass`` (exact disc areas) and cheaper on a batch. As there, area
    outside the image is dropped and the keypoint's weight renormalised over what remains.
    """
    h, w = grid
    half = (kp[..., 2] / 2).clamp_min(1e-3) * (np.pi ** 0.5 / 2)
    ox = _overlap_1d(kp[..., 0], half, w, patch)  # [B, K, w]
    oy = _overlap_1d(kp[..., 1], half, h, patch)  # [B, K, h]
    inside = ox.sum(-1) * oy.sum(-1)  # [B, K] area inside the image
    wk = kp[..., 3] if weight == "response" else torch.ones_like(kp[..., 3])
    scale = torch.where(valid & (inside > 0), wk / inside.clamp_min(1e-12), torch.zeros_like(wk))
    mass = torch.einsum("bk,bkh,bkw->bhw", scale, oy, ox)
    return mass.reshape(mass.shape[0], h * w)


def to_concentration(mass: torch.Tensor) -> torch.Tensor:
    """Rows normalised to sum 1; rows with no mass stay all zero (guidance then equals random)."""
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_mass(rgb01: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean Sobel gradient magnitude per patch [B, h*w] of images [B, 3, H, W] in [0, 1]
    (as ``semantic_maps.edge_density``: 8-bit-scale grey, 3x3 Sobel, reflect-101 borders)."""
    gray = (0.299 * rgb01[:, 0] + 0.587 * rgb01[:, 1] + 0.114 * rgb01[:, 2]).unsqueeze(1) * 255.0
    padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(gray)
    g = F.conv2d(padded, kernels)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    return F.avg_pool2d(mag, patch).flatten(1)


# ---------------------------------------------------------------- keypoints, once per stored image

def _detect_chunk(gray: np.ndarray, max_keypoints: int, params: SiftParams) -> tuple[np.ndarray, np.ndarray]:
    cv2.setNumThreads(1)
    table = np.zeros((len(gray), max_keypoints, 4), np.float32)
    valid = np.zeros((len(gray), max_keypoints), bool)
    for i, g in enumerate(gray):
        kp = detect_sift(g, params)
        order = np.argsort(-kp.response, kind="stable")[:max_keypoints]
        k = len(order)
        table[i, :k] = np.stack([kp.xy[order, 0], kp.xy[order, 1], kp.size[order], kp.response[order]], 1)
        valid[i, :k] = True
    return table, valid


def detect_keypoint_table(images_u8: torch.Tensor, max_keypoints: int = 64, params: SiftParams = SiftParams(),
                          workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SIFT on every stored image [N, 3, H, W] uint8 -> keypoints [N, K, 4] (x, y, diameter,
    response; the K strongest by response, zero-padded) and valid [N, K]. ``workers`` > 0 spreads
    the images over that many processes (same result: each image is detected independently)."""
    gray = rgb01_to_gray_u8(images_u8.numpy().astype(np.float32) / 255.0)
    if workers > 0 and len(gray) > 256:
        from concurrent.futures import ProcessPoolExecutor

        chunks = np.array_split(gray, workers * 8)
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_detect_chunk, chunks, [max_keypoints] * len(chunks), [params] * len(chunks)))
        table, valid = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        table, valid = _detect_chunk(gray, max_keypoints, params)
    return torch.from_numpy(table), torch.from_numpy(valid)


def cached_keypoint_table(images_u8: torch.Tensor, cache_dir: str | Path | None, max_keypoints: int = 64,
                          params: SiftParams = SiftParams(), workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``detect_keypoint_table`` with an on-disk cache keyed by the image bytes and parameters."""
    if cache_dir is None:
        return detect_keypoint_table(images_u8, max_keypoints, params, workers)
    h = hashlib.sha256(images_u8.numpy().tobytes())
    h.update(repr((max_keypoints, params, cv2.__version__)).encode())
    path = Path(cache_dir) / f"keypoints-{h.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["table"]), torch.from_numpy(z["valid"])
    table, valid = detect_keypoint_table(images_u8, max_keypoints, params, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(path, table=table.numpy(), valid=valid.numpy())
    return table, valid


@torch.no_grad()
def cls_attention(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, N] the last block's CLS-to-patch attention (mean over heads, rows sum to 1) of a timm
    VisionTransformer on the full, unmasked images [B, 3, H, W]: what AttMask ranks patches by.
    Computed by hand for the last block because fused attention never forms the weights."""
    was_training = encoder.training
    encoder.eval()
    x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in encoder.blocks[:-1]:
        x = blk(x)
    last = encoder.blocks[-1]
    attn = last.attn
    qkv = attn.qkv(last.norm1(x))  # [B, T, 3 * D]
    q, k, _ = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = (q[:, :, :1] * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, T]
    encoder.train(was_training)
    cls_to_patch = a[:, :, 0, 1:].mean(dim=1)  # [B, N]
    return cls_to_patch / cls_to_patch.sum(dim=1, keepdim=True)
