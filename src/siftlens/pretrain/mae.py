"""Masked autoencoder (He et al. 2022) around a timm ViT encoder.

The encoder *is* a ``timm`` VisionTransformer (global_pool="avg", final norm before pooling), so
its state dict exports as-is and loads with ``timm.create_model(ENCODER_ARCH, **encoder_kwargs)``
and in ``siftlens analyze``. Which patches are masked is decided outside, by the noise passed in
(see ``masking.py``): the model only knows MAE's keep-the-smallest-noise rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import timm
import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from ..validation import UserValueError
from .masking import mask_from_noise

ENCODER_ARCH = "vit_tiny_patch16_224"  # timm name; every size field below overrides it


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True

    def encoder_kwargs(self) -> dict:
        """kwargs for timm.create_model(ENCODER_ARCH, ...) that rebuild the encoder."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, num_classes=0, global_pool="avg",
                    fc_norm=False)

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1, (1+) grid*grid, dim], as in MAE."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.ravel(), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig = MAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise UserValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.grid = cfg.img_size // cfg.patch_size
        self.encoder = timm.create_model(ENCODER_ARCH, pretrained=False, **cfg.encoder_kwargs())
        # MAE keeps positions fixed (sin-cos); the buffer-like parameter still exports with timm's name
        self.encoder.pos_embed.data.copy_(sincos_pos_embed(cfg.embed_dim, self.grid, cls_token=True))
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(cfg.decoder_dim, self.grid, cls_token=True))
        self.decoder_blocks = nn.Sequential(*[Block(cfg.decoder_dim, cfg.decoder_heads, qkv_bias=True)
                                              for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.patch_size ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=self.cfg.patch_size, q=self.cfg.patch_size)

    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [B, N, D]
        x = x + enc.pos_embed[:, 1:]
        x, mask, ids_restore = mask_from_noise(x, noise, mask_ratio)  # [B, N_keep, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [B, 1 + N_keep, Dd]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [B, N, Dd] in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])  # [B, N, p*p*3]

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
             patch_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error on masked patches (per-patch normalised pixels by default).

        Averaged per image first, then over the batch, so that equal shards of a batch on several
        processes average to exactly the single-process loss.
        """
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(-1)  # [B, N]
        w = mask if patch_weights is None else mask * patch_weights
        return ((per_patch * w).sum(1) / w.sum(1)).mean()

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float = 0.75,
                patch_weights: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(imgs, pred, mask, patch_weights), pred, mask

    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Frozen-feature view for kNN / linear probes: the exported timm model's pooled output."""
        return self.encoder(imgs)
