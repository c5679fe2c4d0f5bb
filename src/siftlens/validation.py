"""Checks that stop a run with a one-line error before it can write a wrong result.

- Non-finite numbers are caught where they arise: a model parameter (named), a layer's attention
  (named by layer) or the model's output. NaN never reaches the statistics, so no p-value, ratio or
  verdict is ever computed from it (a NaN compares false with everything: a permutation p-value
  from NaN would read "significant").
- The model input size is checked against the model once the model is known.
- ``UserError`` marks errors the user can fix (bad input, bad arguments, a broken model file); the
  command line prints those as one line, while anything else keeps its traceback (an internal bug).
"""

from __future__ import annotations

import torch
from torch import nn


class UserError(Exception):
    """An error caused by the user's input; the message names the input and the cause."""


class UserValueError(UserError, ValueError):
    """A user error that is also a ValueError (what the library raised before UserError existed)."""


class UserRuntimeError(UserError, RuntimeError):
    """A user error that is also a RuntimeError."""


class UserIndexError(UserError, IndexError):
    """A user error that is also an IndexError (a layer index out of range)."""


class NonFiniteError(UserValueError):
    """NaN or Inf in a model's parameters, attention or output."""


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite. A sum is NaN or Inf if any value is (one fast reduction, ~20x quicker
    than isfinite(t).all() on a batch of ViT-B attention); only a non-finite sum is checked element-wise,
    since the sum of huge finite values can overflow."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _kinds(t: torch.Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return " and ".join(k for k, bad in (("NaN", nan), ("Inf", inf)) if bad)


def check_finite_parameters(module: nn.Module, model_name: str) -> None:
    """Raise NonFiniteError naming the first parameter that holds NaN or Inf (buffers may hold -inf masks)."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and not _all_finite(p.detach()):
            n_bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(f"--model {model_name}: parameter {name} has {_kinds(p)} ({n_bad} of {p.numel()} "
                                 "values); the weights are broken, nothing was analysed")


def check_finite_attention(layer: int, attn: torch.Tensor, model_name: str) -> None:
    """Raise NonFiniteError if a layer's attention is not finite (weights too large, overflow under --amp)."""
    if not _all_finite(attn):
        raise NonFiniteError(f"--model {model_name}: layer {layer} attention has {_kinds(attn)} (model weights "
                             "non-finite or so large that the attention logits overflow?); nothing was written "
                             "for this batch")


def check_finite_output(logits: torch.Tensor, model_name: str) -> None:
    if logits.is_floating_point() and not _all_finite(logits):
        raise NonFiniteError(f"--model {model_name}: the model output (logits) has {_kinds(logits.float())} (model "
                             "weights non-finite or too large?); nothing was written for this batch")


def check_device(device: str) -> None:
    """--device names a device torch knows and that exists here (no traceback from deep inside torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserValueError(f"--device {device}: not a device ({e})") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}.get(dev.type)
    if available is None or not available():
        raise UserValueError(f"--device {device}: not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_input_size(lm, input_size: tuple[int, int] | None) -> None:
    """The model input must be a whole number of patches (unless the model pads itself) and at least one."""
    H, W = lm.preprocess.input_size
    p = lm.patch_size
    what = f"--input-size {H} {W}" if input_size is not None else f"the model's input size {H}x{W}"
    if H < p or W < p:
        raise UserValueError(f"{what}: smaller than one {p}-px patch of {lm.name}")
    pads = lm.backend == "timm" and getattr(getattr(lm.module, "patch_embed", None), "dynamic_img_pad", False)
    if not pads and (H % p or W % p):
        raise UserValueError(f"{what}: not divisible by the patch size {p} of {lm.name} (try "
                        f"{max(p, H // p * p)} {max(p, W // p * p)})")


def check_model_accepts_input(lm, device: str, input_size: tuple[int, int] | None) -> None:
    """One forward pass of a blank input: a model that cannot take this size fails here, in one line."""
    check_input_size(lm, input_size)
    H, W = lm.preprocess.input_size
    x = torch.zeros(1, 3, H, W, device=device)
    try:
        with torch.inference_mode():
            lm.forward(x)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = f"--input-size {H} {W}" if input_size is not None else f"input size {H}x{W}"
        raise UserValueError(f"--model {lm.name} does not accept {what} ({type(e).__name__}: {first})") from None
