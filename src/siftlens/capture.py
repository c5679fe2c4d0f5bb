"""Attention capture for timm, Hugging Face and torchvision ViTs.

``AttentionCapture(adapter, on_attention)`` is a context manager. Inside it, every forward pass
calls ``on_attention(layer_index, attn)`` once per attention layer, in execution order, with the
post-softmax attention ``attn`` [B, heads, T, T] (rows = queries). The callback reduces it right
away, so only one layer's N x N maps are alive at a time. Fused attention (SDPA) returns no
weights, so it is switched off for the pass; the model is restored exactly on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .validation import UserError


class NoAttentionLayersError(UserError, TypeError):
    """The model has no attention layers that siftlens knows how to capture."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens are: prefix tokens (CLS, distillation, registers) then an h x w grid."""

    prefix_names: tuple[str, ...]  # e.g. ("cls",), ("cls", "dist"), ("cls", "reg0", ..., "reg3")
    grid: tuple[int, int]  # (h, w), row-major patch order
    patch_size: int

    def cell(self, input_hw: tuple[int, int]) -> tuple[float, float]:
        """The share of the input's height and width one token covers: 1 / grid where the input is a multiple of
        the patch; less where the grid leaves the input's last rows or columns out, more where it pads them."""
        return self.patch_size / input_hw[0], self.patch_size / input_hw[1]

    @property
    def num_prefix(self) -> int:
        return len(self.prefix_names)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def cls_index(self) -> int | None:
        return self.prefix_names.index("cls") if "cls" in self.prefix_names else None


# --- finding attention modules -------------------------------------------------------------------

def timm_attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention blocks: they carry ``fused_attn`` and pass softmax weights through attn_drop."""
    found = [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(
        getattr(m, "attn_drop", None), nn.Dropout)]
    if not found:
        raise NoAttentionLayersError(
            f"{type(model).__name__}: no timm attention layers found (modules with `fused_attn` "
            "and an `attn_drop` dropout); this architecture is not supported")
    return found


def _hf_recorded_attention(model: nn.Module) -> tuple[type, str | None] | None:
    """The attention class the model itself records ``attentions`` from (transformers >= 4.56).

    ``_can_record_outputs["attentions"]`` is either a class or an ``OutputRecorder`` with a
    ``target_class`` and an optional ``layer_name`` (a suffix of the module's qualified name).
    """
    rec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(rec, type):
        return rec, None
    target = getattr(rec, "target_class", None)
    if isinstance(target, type):
        return target, getattr(rec, "layer_name", None)
    return None


def hf_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The HF self-attention modules whose eager forward returns (output, weights [B, heads, T, T]).

    Asks the model first (the class it records ``output_attentions`` from), else falls back to the
    innermost modules whose class name ends in ``Attention`` (older transformers).
    """
    rec = _hf_recorded_attention(model)
    if rec is not None:
        cls, layer_name = rec
        found = [m for name, m in model.named_modules() if isinstance(m, cls) and
                 (layer_name is None or name == layer_name or name.endswith("." + layer_name))]
        if found:
            return found
    cands = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    ids = {id(m) for m in cands}
    inner = [m for m in cands if not any(c is not m and id(c) in ids for c in m.modules())]
    if not inner:
        raise NoAttentionLayersError(
            f"{type(model).__name__}: no Hugging Face attention layers found (modules whose class name "
            "ends in 'Attention'); this architecture is not supported")
    return inner


def torchvision_attention_modules(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not found:
        raise NoAttentionLayersError(
            f"{type(model).__name__}: no attention layers found (no nn.MultiheadAttention); siftlens "
            "analyses Vision Transformers (torchvision vit_*), not convolutional networks")
    return found


ATTENTION_FINDERS = {
    "timm": timm_attention_modules,
    "hf": hf_attention_modules,
    "torchvision": torchvision_attention_modules,
}


def detect_backend(model: nn.Module) -> str:
    """Which family a model belongs to, from its own modules (never from its name)."""
    mod = type(model).__module__
    if mod.startswith("transformers."):
        return "hf"
    if mod.startswith("torchvision."):
        return "torchvision"
    if any(hasattr(m, "fused_attn") for m in model.modules()):
        return "timm"
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return "torchvision"
    raise NoAttentionLayersError(
        f"{type(model).__name__}: not a timm, Hugging Face or torchvision ViT with attention layers")


# --- the capture ---------------------------------------------------------------------------------

class AttentionCapture:
    """Context manager that streams per-layer attention maps to ``on_attention``."""

    def __init__(self, model: nn.Module, backend: str,
                 on_attention: Callable[[int, torch.Tensor], None]) -> None:
        self.model, self.backend, self.on_attention = model, backend, on_attention
        self.modules = ATTENTION_FINDERS[backend](model)
        self._handles: list = []
        self._restore: list[Callable[[], None]] = []
        self.calls = 0

    def __enter__(self) -> AttentionCapture:
        for idx, m in enumerate(self.modules):
            if self.backend == "timm":
                self._setup_timm(idx, m)
            elif self.backend == "hf":
                self._handles.append(m.register_forward_hook(partial(self._hf_hook, idx)))
            else:
                self._setup_torchvision(idx, m)
        if self.backend == "hf":
            self._set_hf_eager()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for undo in reversed(self._restore):
            undo()
        self._handles, self._restore = [], []

    def _emit(self, idx: int, attn: torch.Tensor) -> None:
        self.calls += 1
        self.on_attention(idx, attn)

    # timm: switch SDPA off, read the softmax output where it passes through attn_drop (identity in eval)
    def _setup_timm(self, idx: int, m: nn.Module) -> None:
        old = m.fused_attn
        m.fused_attn = False
        self._restore.append(lambda m=m, old=old: setattr(m, "fused_attn", old))
        self._handles.append(m.attn_drop.register_forward_hook(
            lambda _mod, _inp, out, idx=idx: self._emit(idx, out)))

    # HF: eager attention returns (attn_output, attn_weights) from the innermost *Attention module
    def _hf_hook(self, idx: int, _mod: nn.Module, _inp, out) -> None:
        if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]) and out[1].dim() == 4:
            self._emit(idx, out[1])

    def _set_hf_eager(self) -> None:
        """Switch every config in the model to eager attention; remember each one's setting exactly."""
        configs = _hf_configs(self.model)
        if not configs or all(_get_attn_impl(c) == "eager" for c in configs):
            return
        saved = [(c, _impl_key(c), c.__dict__.get(_impl_key(c), _MISSING)) for c in configs]

        def restore() -> None:
            for c, key, val in saved:
                if val is _MISSING:
                    c.__dict__.pop(key, None)
                else:
                    c.__dict__[key] = val

        self._restore.append(restore)
        if hasattr(self.model, "set_attn_implementation"):
            try:
                self.model.set_attn_implementation("eager")
            except Exception:  # fall back to setting the configs directly below
                pass
        for c in configs:  # models that cannot switch dynamically, or configs not reached above
            if _get_attn_impl(c) != "eager":
                _set_attn_impl(c, "eager")

    # torchvision: EncoderBlock calls MHA with need_weights=False; force per-head weights for the pass
    def _setup_torchvision(self, idx: int, m: nn.MultiheadAttention) -> None:
        had_own = "forward" in m.__dict__
        original = m.forward  # the bound method (or whatever instance forward someone set before us)

        def forward(*args, **kwargs):
            kwargs["need_weights"], kwargs["average_attn_weights"] = True, False
            out = original(*args, **kwargs)
            self._emit(idx, out[1])
            return out

        m.forward = forward

        def restore(m=m, had_own=had_own, original=original) -> None:
            if had_own:
                m.forward = original
            else:
                m.__dict__.pop("forward", None)

        self._restore.append(restore)


_MISSING = object()


def _hf_configs(model: nn.Module) -> list:
    """Every distinct HF config object referenced by the model or its submodules."""
    seen: dict[int, object] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "to_dict") and id(c) not in seen:
            seen[id(c)] = c
    return list(seen.values())


def _impl_key(cfg) -> str:
    """Where a config stores its attention implementation (a property over ``*_internal`` in HF)."""
    if isinstance(getattr(type(cfg), "_attn_implementation", None), property):
        return "_attn_implementation_internal"
    return "_attn_implementation"


def _get_attn_impl(cfg) -> str | None:
    return getattr(cfg, "_attn_implementation", None)


def _set_attn_impl(cfg, value: str) -> None:
    cfg.__dict__[_impl_key(cfg)] = value
