"""Inference-time attention steering ("prompting", METHOD.md §4) for timm, Hugging Face and torchvision ViTs.

``SteeredViT(lm, method, layers=..., beta=...)`` wraps a loaded ViT without retraining it. It is a plain
``nn.Module``: ``steered(x) -> logits`` for a batch of model inputs ``x`` [B, 3, H, W] (the exact tensor the
model sees, i.e. after its own preprocessing), with or without ``torch.no_grad``.

How the steering reaches the model: for each chosen attention layer, an additive bias b [B, T] over KEY
tokens is added to the attention logits before the softmax, for every query and every head:

    A_ij = softmax_j(q_i . k_j * scale + b_j)

Prefix tokens (CLS, distillation, registers) always get b = 0; only patch keys are steered. The bias is
passed through the attention module's own mask argument, so the model's fused (SDPA) and eager paths both
see it: timm ``Attention.forward(x, attn_mask=...)`` (float mask [B, 1, 1, T], added to any mask the
module already receives), HF ``*Attention.forward(hidden_states, attention_mask=...)`` (eager and sdpa
implementations; same [B, 1, 1, T] float mask) and torchvision ``nn.MultiheadAttention(attn_mask=...)``
([B*heads, T, T] float mask). The hooks exist only while ``SteeredViT.forward`` runs: outside a steered
call the wrapped model is never modified, and ``remove()`` (or leaving the ``with`` block) retires the
wrapper for good.

Methods (each is also a module-level function returning the patch-key bias [B, n], n = h*w, row-major):

- ``sift_bias``: b_j = beta * log(c_j + eps), c = SIFT concentration (METHOD.md §1, ``MapConfig.mode``,
  footprint by default): pulls attention toward keypoint-rich (semantic) patches. With
  ``preserve_patch_mass=True`` (default) a per-image constant is subtracted so that mean_j exp(b_j) = 1:
  a constant over patch keys does not change how attention is shared among patches, only the
  patch-vs-prefix split, and without the shift every patch key is pushed down (log c < 0) and attention
  drains into CLS/registers. The shift keeps that split as it was for uniform logits. Images without
  keypoints get b = 0 (recorded in ``last_info["no_map"]``).
- ``edge_bias``: the same with c = Sobel edge-density concentration: the control that says whether SIFT
  matters, or any edge map would do.
- ``mask_tokens``: b_j = -beta * mask_value (1e4, finite so that a row can never become all -inf / NaN)
  on the patch tokens that ``token_mask_fn(x) -> bool [B, n]`` flags (e.g. patches under shortcut motifs).
  In a model that pools its final patch tokens (timm ``global_pool`` avg / max, HF DINOv2 / BEiT classifiers),
  the masked tokens are also left out of the pool (``patch_pool_input``), as for ``random_mask`` and
  ``edge_mask``: a removed token's own output would otherwise still reach the prediction.
- ``random_mask``: the control for ``mask_tokens``: per image the same number of patch tokens as
  ``token_mask_fn`` flags, drawn uniformly without replacement from all n patches by a
  ``torch.Generator`` seeded with ``seed`` (deterministic for a given seed and sequence of calls;
  ``reset_rng()`` restarts the sequence).
- ``edge_mask``: the edge-density twin of ``mask_tokens``: per image the same number of patch tokens as
  ``token_mask_fn`` flags, the ones with the highest Sobel edge density (a high-contrast shortcut is
  also edge-dense; if this does as well, locating it with SIFT motifs did not matter).
- ``sift_suppress_lowconc`` (our addition): mask (as ``mask_tokens``) the keys of patches with zero SIFT
  mass, i.e. patches no keypoint footprint touches (concentration group 0, "background"). Unlike
  ``sift_bias`` it leaves the relative weighting of the semantic patches untouched and removes only
  background evidence. Images without keypoints are left alone.
- ``edge_suppress_lowconc``: its sparsity-matched control: per image, mask as many patches as
  ``sift_suppress_lowconc`` does, but those with the lowest Sobel edge density (METHOD.md §3 (f): SIFT maps
  are sparse, so a SIFT-vs-edges comparison must hold the number of affected patches fixed).

New methods go into ``STEERING_METHODS`` (name -> function of one signature); ``METHODS`` and
``TOKEN_MASK_METHODS`` are read from it. The module is long (~500 lines) because the methods, their
registry and the hooks that inject the bias into three attention backends share one contract (the key
bias [B, T]); the maps themselves are computed in semantic_maps.py.

``beta`` is the strength of every method, and ``beta = 0`` (or an empty layer list) reproduces the
unwrapped model exactly (no mask is passed at all). Maps are computed per image on the CPU with OpenCV
inside ``forward``; a small in-memory cache keyed by the grey image's bytes avoids recomputing them when
the same images are evaluated repeatedly (e.g. a beta sweep).
"""

from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .capture import ATTENTION_FINDERS, TokenLayout
from .layers import LAYER_PRESETS, resolve_layers  # noqa: F401  (re-exported: one rule for every command)
from .models import LoadedModel
from .semantic_maps import MapConfig, compute_maps, concentration, edge_density

MASK_VALUE = 1e4  # large finite negative logit: exp(-1e4) == 0 in float32/bf16, representable in fp16

TokenMaskFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


# --- maps ----------------------------------------------------------------------------------------

class MapCache:
    """LRU cache of per-image maps keyed by (kind, grey bytes, grid, patch, MapConfig)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = int(size)
        self._d: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key, compute: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        if self.size <= 0:
            return compute()
        if key in self._d:
            self._d.move_to_end(key)
            self.hits += 1
            return self._d[key]
        self.misses += 1
        val = compute()
        self._d[key] = val
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return val

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0


def image_maps(x: torch.Tensor, lm: LoadedModel, kind: str, map_config: MapConfig = MapConfig(),
               layout: TokenLayout | None = None, cache: MapCache | None = None) -> list[np.ndarray | None]:
    """Per-image patch maps [n] for a batch of model inputs: ``kind`` = ``sift`` (concentration c, or None
    without keypoints), ``edges`` (Sobel edge-density concentration, None on a flat image)."""
    if kind not in ("sift", "edges"):
        raise ValueError(f"map kind {kind!r} is not 'sift' or 'edges'")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected model inputs [B, 3, H, W], got {tuple(x.shape)}")
    layout = layout or lm.layout(tuple(x.shape[-2:]))
    grid, p = layout.grid, layout.patch_size
    cfg = replace(map_config, baselines=())
    xc = x.detach().float().cpu()
    out: list[np.ndarray | None] = []
    for img in xc:
        gray = lm.preprocess.to_uint8_gray(img)

        def compute(gray=gray):
            if kind == "sift":
                return compute_maps(gray, grid, p, cfg).maps["sift"]
            return concentration(edge_density(gray, grid, p))

        key = (kind, hashlib.sha1(gray.tobytes()).hexdigest(), gray.shape, grid, p,
               cfg if kind == "sift" else None)
        out.append(cache.get(key, compute) if cache is not None else compute())
    return out


def _log_bias(maps: list[np.ndarray | None], n: int, beta: float, eps: float,
              preserve_patch_mass: bool) -> tuple[torch.Tensor, list[int]]:
    bias = torch.zeros(len(maps), n)
    no_map = []
    for i, c in enumerate(maps):
        if c is None:
            no_map.append(i)
            continue
        b = beta * np.log(np.asarray(c, dtype=np.float64) + eps)
        if preserve_patch_mass:
            m = b.max()  # b - logmeanexp(b): mean_j exp(b_j) = 1
            b = b - (m + np.log(np.mean(np.exp(b - m))))
        bias[i] = torch.from_numpy(b).float()
    return bias, no_map


def _map_log_bias(map_name: str, x: torch.Tensor, lm: LoadedModel, beta: float, eps: float, map_config: MapConfig,
                  layout: TokenLayout | None, preserve_patch_mass: bool, cache: MapCache | None,
                  info: dict | None) -> torch.Tensor:
    layout = layout or lm.layout(tuple(x.shape[-2:]))
    maps = image_maps(x, lm, map_name, map_config, layout, cache)
    bias, no_map = _log_bias(maps, layout.num_patches, beta, eps, preserve_patch_mass)
    if info is not None:
        info["no_map"] = no_map
    return bias


def sift_bias(x: torch.Tensor, lm: LoadedModel, beta: float = 1.0, eps: float = 1e-3,
              map_config: MapConfig = MapConfig(), layout: TokenLayout | None = None,
              preserve_patch_mass: bool = True, cache: MapCache | None = None,
              info: dict | None = None) -> torch.Tensor:
    """beta * log(c_j + eps) from the SIFT concentration, [B, n] (zero rows for images without keypoints)."""
    return _map_log_bias("sift", x, lm, beta, eps, map_config, layout, preserve_patch_mass, cache, info)


def edge_bias(x: torch.Tensor, lm: LoadedModel, beta: float = 1.0, eps: float = 1e-3,
              map_config: MapConfig = MapConfig(), layout: TokenLayout | None = None,
              preserve_patch_mass: bool = True, cache: MapCache | None = None,
              info: dict | None = None) -> torch.Tensor:
    """The ``sift_bias`` formula on the Sobel edge-density concentration (the control), [B, n]."""
    return _map_log_bias("edges", x, lm, beta, eps, map_config, layout, preserve_patch_mass, cache, info)


def token_mask(token_mask_fn: TokenMaskFn | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """``token_mask_fn(x)`` as a bool CPU tensor [B, n] (accepts [B, n] or [B, h, w], torch or numpy)."""
    if token_mask_fn is None:
        raise ValueError("this steering method needs token_mask_fn(x) -> bool [B, n] (the patches to mask)")
    m = token_mask_fn(x)
    m = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m).detach().cpu()
    if m.dtype != torch.bool:
        if m.is_floating_point() or not ((m == 0) | (m == 1)).all():
            raise ValueError(f"token_mask_fn must return a boolean mask, got dtype {m.dtype}")
        m = m.bool()
    m = m.reshape(m.shape[0], -1) if m.dim() > 1 else m
    if m.dim() != 2 or tuple(m.shape) != (x.shape[0], n):
        raise ValueError(f"token_mask_fn returned shape {tuple(m.shape)}; expected [B, n] = [{x.shape[0]}, {n}] "
                         "(one flag per patch token, row-major grid, prefix tokens excluded)")
    return m


def mask_tokens(x: torch.Tensor, token_mask_fn: TokenMaskFn, n: int, beta: float = 1.0,
                mask_value: float = MASK_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """-beta * mask_value on the flagged patch keys; returns (bias [B, n], mask [B, n])."""
    m = token_mask(token_mask_fn, x, n)
    return m.float() * (-beta * mask_value), m


def random_mask(x: torch.Tensor, token_mask_fn: TokenMaskFn, n: int, generator: torch.Generator,
                beta: float = 1.0, mask_value: float = MASK_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image as many uniformly random patch keys as ``token_mask_fn`` flags; (bias, mask)."""
    counts = token_mask(token_mask_fn, x, n).sum(1)
    m = torch.zeros(x.shape[0], n, dtype=torch.bool)
    for i, k in enumerate(counts.tolist()):
        m[i, torch.randperm(n, generator=generator)[:k]] = True
    return m.float() * (-beta * mask_value), m


def _edge_ranked_mask(edges: list[np.ndarray | None], counts: list[int], n: int, highest: bool) -> torch.Tensor:
    """bool [B, n]: per image the ``counts[i]`` patches with the highest (or lowest) edge density; a flat
    image (no edge map) counts as all zeros, so the stable sort takes its first patches."""
    m = torch.zeros(len(counts), n, dtype=torch.bool)
    for i, k in enumerate(counts):
        if k:
            e = np.asarray(edges[i]) if edges[i] is not None else np.zeros(n)
            m[i, torch.from_numpy(np.argsort(-e if highest else e, kind="stable")[:k].copy())] = True
    return m


def edge_mask(x: torch.Tensor, lm: LoadedModel, token_mask_fn: TokenMaskFn, beta: float = 1.0,
              map_config: MapConfig = MapConfig(), layout: TokenLayout | None = None,
              mask_value: float = MASK_VALUE, cache: MapCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image as many highest-edge-density patch keys as ``token_mask_fn`` flags; (bias, mask)."""
    layout = layout or lm.layout(tuple(x.shape[-2:]))
    counts = token_mask(token_mask_fn, x, layout.num_patches).sum(1).tolist()
    edges = image_maps(x, lm, "edges", map_config, layout, cache)
    m = _edge_ranked_mask(edges, counts, layout.num_patches, highest=True)
    return m.float() * (-beta * mask_value), m


def sift_suppress_lowconc(x: torch.Tensor, lm: LoadedModel, beta: float = 1.0,
                          map_config: MapConfig = MapConfig(), layout: TokenLayout | None = None,
                          mask_value: float = MASK_VALUE, cache: MapCache | None = None,
                          info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the keys of zero-SIFT-mass patches (none where an image has no keypoints); (bias, mask)."""
    layout = layout or lm.layout(tuple(x.shape[-2:]))
    maps = image_maps(x, lm, "sift", map_config, layout, cache)
    m = torch.zeros(x.shape[0], layout.num_patches, dtype=torch.bool)
    no_map = []
    for i, c in enumerate(maps):
        if c is None:
            no_map.append(i)
        else:
            m[i] = torch.from_numpy(np.asarray(c) <= 0)
    if info is not None:
        info["no_map"] = no_map
    return m.float() * (-beta * mask_value), m


def edge_suppress_lowconc(x: torch.Tensor, lm: LoadedModel, beta: float = 1.0,
                          map_config: MapConfig = MapConfig(), layout: TokenLayout | None = None,
                          mask_value: float = MASK_VALUE, cache: MapCache | None = None,
                          info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsity-matched control: mask as many lowest-edge-density patches as ``sift_suppress_lowconc``."""
    layout = layout or lm.layout(tuple(x.shape[-2:]))
    _, sift_m = sift_suppress_lowconc(x, lm, 1.0, map_config, layout, mask_value, cache, info)
    edges = image_maps(x, lm, "edges", map_config, layout, cache)
    m = _edge_ranked_mask(edges, sift_m.sum(1).tolist(), layout.num_patches, highest=False)
    return m.float() * (-beta * mask_value), m


# --- injecting the bias into attention modules ---------------------------------------------------

def _mask_param(module: nn.Module, name: str) -> int | None:
    """Positional index (self excluded) of ``name`` in the module class's forward, or None if absent."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name:
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else -1
    return None


def _as_additive(mask: torch.Tensor, dtype: torch.dtype, true_means_masked: bool) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    blocked = mask if true_means_masked else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))


def _inject(args: tuple, kwargs: dict, name: str, pos: int, add: torch.Tensor,
            true_means_masked: bool = False) -> tuple[tuple, dict]:
    """Add ``add`` to the mask argument ``name`` (position ``pos``), wherever the caller put it."""
    args = list(args)
    if name in kwargs or pos < 0 or len(args) <= pos:
        cur = kwargs.get(name)
        kwargs[name] = add if cur is None else _as_additive(cur, add.dtype, true_means_masked) + add
    else:
        cur = args[pos]
        args[pos] = add if cur is None else _as_additive(cur, add.dtype, true_means_masked) + add
    return tuple(args), kwargs


# --- the registry of steering methods ------------------------------------------------------------

# Every method has one signature (timm's ATTN_LAYERS style: a name -> callable table instead of an if/elif
# chain): ``method(steered, x, layout, info) -> (bias [B, n], mask [B, n] | None)``, reading its options
# (beta, eps, map config, token_mask_fn, generator, ...) from the ``SteeredViT`` that calls it.
SteeringFn = Callable[["SteeredViT", torch.Tensor, TokenLayout, dict], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class SteeringMethod:
    fn: SteeringFn
    needs_token_mask: bool = False  # the method masks the patches token_mask_fn(x) flags, or as many


STEERING_METHODS: dict[str, SteeringMethod] = {
    "sift_bias": SteeringMethod(lambda s, x, layout, info: (sift_bias(
        x, s.lm, s.beta, s.eps, s.map_config, layout, s.preserve_patch_mass, s.cache, info), None)),
    "edge_bias": SteeringMethod(lambda s, x, layout, info: (edge_bias(
        x, s.lm, s.beta, s.eps, s.map_config, layout, s.preserve_patch_mass, s.cache, info), None)),
    "mask_tokens": SteeringMethod(lambda s, x, layout, info: mask_tokens(
        x, s.token_mask_fn, layout.num_patches, s.beta, s.mask_value), needs_token_mask=True),
    "random_mask": SteeringMethod(lambda s, x, layout, info: random_mask(
        x, s.token_mask_fn, layout.num_patches, s.generator, s.beta, s.mask_value), needs_token_mask=True),
    "edge_mask": SteeringMethod(lambda s, x, layout, info: edge_mask(
        x, s.lm, s.token_mask_fn, s.beta, s.map_config, layout, s.mask_value, s.cache), needs_token_mask=True),
    "sift_suppress_lowconc": SteeringMethod(lambda s, x, layout, info: sift_suppress_lowconc(
        x, s.lm, s.beta, s.map_config, layout, s.mask_value, s.cache, info)),
    "edge_suppress_lowconc": SteeringMethod(lambda s, x, layout, info: edge_suppress_lowconc(
        x, s.lm, s.beta, s.map_config, layout, s.mask_value, s.cache, info)),
}
METHODS = tuple(STEERING_METHODS)
TOKEN_MASK_METHODS = tuple(name for name, m in STEERING_METHODS.items() if m.needs_token_mask)


class SteeredViT(nn.Module):
    """A ViT whose attention in ``layers`` is steered by ``method`` (see the module docstring).

    ``layers``: indices into ``ATTENTION_FINDERS[lm.backend](lm.module)`` or a preset (``late`` = last third,
    ``middle``, ``early``, ``all``, ``none``). ``token_mask_fn(x) -> bool [B, n]`` is needed by
    ``mask_tokens`` and ``random_mask``. ``seed`` seeds ``random_mask``. After each call, ``last_bias``
    ([B, n], CPU), ``last_mask`` (mask methods) and ``last_info`` (``no_map``: images left unsteered for
    lack of a map) describe what was applied.
    """

    def __init__(self, lm: LoadedModel, method: str, layers: Sequence[int] | str = "late", beta: float = 1.0,
                 eps: float = 1e-3, token_mask_fn: TokenMaskFn | None = None, map_config: MapConfig = MapConfig(),
                 seed: int = 0, *, mask_value: float = MASK_VALUE, preserve_patch_mass: bool = True,
                 cache_size: int = 2048) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown steering method {method!r}; known: {METHODS}")
        if STEERING_METHODS[method].needs_token_mask and token_mask_fn is None:
            raise ValueError(f"method {method!r} needs token_mask_fn(x) -> bool [B, n]")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (got {eps})")
        self.lm = lm
        self.model = lm.module  # registered, so .to() / .eval() reach the wrapped model
        self.backend = lm.backend
        self.method = method
        self.beta = float(beta)
        self.eps = float(eps)
        self.token_mask_fn = token_mask_fn
        self.map_config = map_config
        self.seed = int(seed)
        self.mask_value = float(mask_value)
        self.preserve_patch_mass = bool(preserve_patch_mass)
        self.cache = MapCache(cache_size)
        self.attention_modules = ATTENTION_FINDERS[self.backend](lm.module)
        self.layers = resolve_layers(layers, len(self.attention_modules))
        self._mask_pos = {i: self._check_supported(self.attention_modules[i]) for i in self.layers}
        self.generator = torch.Generator().manual_seed(self.seed)
        self._handles: list = []
        self._key_bias: torch.Tensor | None = None
        self._removed = False
        self.last_bias: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.last_info: dict = {}

    # --- public API ---
    def set_strength(self, beta: float) -> SteeredViT:
        self.beta = float(beta)
        return self

    def reset_rng(self, seed: int | None = None) -> SteeredViT:
        """Restart ``random_mask``'s random sequence (from ``seed`` or the constructor's seed)."""
        if seed is not None:
            self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        return self

    @property
    def active(self) -> bool:
        return not self._removed and self.beta != 0 and bool(self.layers)

    def remove(self) -> None:
        """Detach from the model for good: no hook stays behind, later calls raise."""
        self._remove_hooks()
        self._removed = True

    def __enter__(self) -> SteeredViT:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"method={self.method!r}, layers={self.layers}, beta={self.beta}, backend={self.backend!r}"

    def patch_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The steering bias over patch keys, [B, n] float32 on the CPU (advances random_mask's generator)."""
        layout = self.lm.layout(tuple(x.shape[-2:]))
        info: dict = {"no_map": []}
        bias, mask = STEERING_METHODS[self.method].fn(self, x, layout, info)
        self.last_bias, self.last_mask, self.last_info = bias, mask, info
        return bias

    def key_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The full key bias [B, T] (prefix tokens 0, then the patch grid), float32 on x's device."""
        layout = self.lm.layout(tuple(x.shape[-2:]))
        pb = self.patch_bias(x)
        prefix = torch.zeros(pb.shape[0], layout.num_prefix)
        return torch.cat([prefix, pb], dim=1).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._removed:
            raise RuntimeError("this SteeredViT was removed; call the original model (lm.forward) instead")
        if not self.active:
            self.last_bias = self.last_mask = None
            self.last_info = {}
            return self.lm.forward(x)
        self._key_bias = self.key_bias(x)
        try:
            for i in self.layers:
                m = self.attention_modules[i]
                self._handles.append(m.register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: self._hook(i, mod, args, kwargs), with_kwargs=True))
            pooled = patch_pool_input(self.lm) if self.method in TOKEN_MASK_METHODS else None
            if pooled is not None and self.last_mask is not None:
                if pooled is getattr(self.model, "attn_pool", None):  # attention pooling: its keys are masked too
                    self._handles.append(pooled.register_forward_pre_hook(self._mask_pool_keys, with_kwargs=True))
                else:
                    self._handles.append(pooled.register_forward_hook(self._drop_masked_from_pool))
            return self.lm.forward(x)
        finally:
            self._remove_hooks()
            self._key_bias = None

    # --- internals ---
    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _check_supported(self, m: nn.Module) -> int:
        name = {"timm": "attn_mask", "hf": "attention_mask", "torchvision": "attn_mask"}[self.backend]
        pos = _mask_param(m, name)
        if pos is None:
            family = {"timm": "timm", "hf": "Hugging Face", "torchvision": "torchvision"}[self.backend]
            raise NotImplementedError(
                f"steering {family} attention {type(m).__name__}: its forward takes no `{name}` argument, so no "
                "bias can be added to its attention logits (supported: timm Attention-style modules with "
                "attn_mask, HF *Attention with attention_mask (eager/sdpa), torch nn.MultiheadAttention)")
        return pos

    def _drop_masked_from_pool(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The final tokens [B, T, D] with each masked patch token replaced by the mean of the image's unmasked
        patch tokens: the average (and the maximum) over patches is then that of the unmasked ones alone, so a
        removed token is also gone from the pool (an image whose every patch is masked is left as it is)."""
        mask = self.last_mask.to(out.device)
        prefix = out.shape[1] - mask.shape[1]
        patches = out[:, prefix:]
        keep = ~mask[..., None]
        n_kept = keep.sum(1, keepdim=True)
        mean_kept = (patches * keep).sum(1, keepdim=True) / n_kept.clamp(min=1)
        patches = torch.where(keep | (n_kept == 0), patches, mean_kept.to(patches.dtype))
        return torch.cat([out[:, :prefix], patches], dim=1)

    def _mask_pool_keys(self, mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """timm attention pooling (``global_pool="map"``): the key bias on its attention too."""
        x = args[0] if args else kwargs["x"]
        return _inject(args, kwargs, "attn_mask", 1, self._key_bias.to(x.device, x.dtype)[:, None, None, :])

    def _hook(self, idx: int, mod: nn.Module, args: tuple, kwargs: dict):
        bias = self._key_bias
        if bias is None:
            return None
        B, T = bias.shape
        if self.backend == "torchvision":
            q = args[0] if args else kwargs["query"]
            tokens, batch = (q.shape[1], q.shape[0]) if getattr(mod, "batch_first", False) else (q.shape[0], q.shape[1])
        else:
            q = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            batch, tokens = q.shape[0], q.shape[1]
        if (batch, tokens) != (B, T):
            raise RuntimeError(
                f"attention layer {idx} ({type(mod).__name__}) got {batch} x {tokens} tokens but the model's token "
                f"layout says {B} x {T}; steering needs every chosen layer to attend over all tokens")
        bias = bias.to(device=q.device, dtype=q.dtype if q.is_floating_point() else torch.float32)
        pos = self._mask_pos[idx]
        if self.backend == "timm":
            if kwargs.get("is_causal"):
                raise NotImplementedError("steering causal timm attention is not supported")
            return _inject(args, kwargs, "attn_mask", pos, bias[:, None, None, :])
        if self.backend == "hf":
            cfg = getattr(mod, "config", None)
            impl = getattr(cfg, "_attn_implementation", None)
            if impl not in (None, "eager", "sdpa"):
                raise NotImplementedError(
                    f"steering Hugging Face attention with attn_implementation={impl!r} is not supported; load "
                    "the model with attn_implementation='eager' or 'sdpa'")
            return _inject(args, kwargs, "attention_mask", pos, bias[:, None, None, :])
        heads = mod.num_heads
        full = bias[:, None, None, :].expand(B, heads, T, T).reshape(B * heads, T, T)  # MHA wants 3-D
        # an existing [T, T] or [B*heads, T, T] mask broadcasts against it; bool there means "blocked"
        return _inject(args, kwargs, "attn_mask", pos, full, true_means_masked=True)


def patch_pool_input(lm: LoadedModel) -> nn.Module | None:
    """The module whose output [B, T, D] is pooled over the patch tokens for the prediction, for models that
    pool (timm ``global_pool`` avg / max / avgmax, e.g. ``class_token=False`` ViTs, BEiT, EVA; Hugging Face DINOv2
    classifiers and ``use_mean_pooling`` BEiT / data2vec-vision), or timm's attention pool itself
    (``global_pool="map"``, whose input is pooled); None for models that predict from a prefix token (CLS,
    distillation), where masking a token's key already keeps it out.

    Why: masking a token as a key stops other tokens from reading it, but an average over the final patch
    tokens still reads the masked token's own output; removing a unit must take it out of the pool too."""
    m = lm.module
    if lm.backend == "timm" and isinstance(getattr(m, "attn_pool", None), nn.Module):  # "map" (SigLIP): the pool
        return m.attn_pool  # attends over the final tokens; SteeredViT masks its keys as in the blocks
    if lm.backend == "timm" and getattr(m, "global_pool", None) in ("avg", "max", "avgmax") and \
            getattr(m, "attn_pool", None) is None and isinstance(getattr(m, "norm", None), nn.Module):
        return m.norm
    if lm.is_hf_classifier:
        # HF DINOv2 classifiers read [CLS, mean of the patch tokens]; BEiT / data2vec with use_mean_pooling the mean
        base = getattr(m, getattr(m, "base_model_prefix", ""), None)
        pools = type(m).__name__.startswith("Dinov2") or getattr(m.config, "use_mean_pooling", False)
        if pools and isinstance(getattr(base, "layernorm", None), nn.Module):
            return base.layernorm
    return None


@torch.no_grad()
def steered_predict(lm: LoadedModel, images: torch.Tensor, method: str, batch_size: int | None = None,
                    **kw) -> torch.Tensor:
    """Logits of ``lm`` on model inputs ``images`` [N, 3, H, W] under steering ``method`` (kwargs as
    ``SteeredViT``), in batches of ``batch_size`` (all at once by default). The model is left untouched."""
    device = next(lm.module.parameters()).device
    bs = batch_size or len(images)
    with SteeredViT(lm, method, **kw) as steered:
        outs = [steered(images[i:i + bs].to(device)) for i in range(0, len(images), bs)]
    return torch.cat(outs) if outs else torch.empty(0)
