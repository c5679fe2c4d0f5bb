"""Which attention layers a command uses: one rule for `analyze`-style presets in every command.

``spurious`` (decisive attention and the counterfactual scores), its causal discovery, ``flag`` and
``prompt`` all resolve ``--layers`` here, so the same name picks the same layers everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .validation import UserIndexError, UserValueError

LAYER_PRESETS = ("late", "middle", "early", "all", "last", "none")


class LayerIndexError(UserIndexError, ValueError):
    """A layer index out of range (a user error: the CLI reports it in one line)."""


def resolve_layers(layers: Sequence[int] | str, num_layers: int) -> list[int]:
    """Attention-layer indices (order of ``siftlens.capture.ATTENTION_FINDERS[backend]``), sorted, unique.

    Presets split the L layers in thirds of k = max(1, round(L / 3)) layers: ``early`` = the first k,
    ``late`` = the last k, ``middle`` = the rest (the middle layer L // 2 when there is no rest, so no
    preset is ever empty for L >= 1), ``last`` = the last layer, ``all``, ``none`` (the empty list).
    Explicit lists may use negative indices (counted from the last layer).
    """
    L = int(num_layers)
    if isinstance(layers, str):
        k = max(1, round(L / 3))
        presets = {"all": range(L), "none": range(0), "last": range(max(0, L - 1), L),
                   "late": range(max(0, L - k), L), "early": range(min(k, L)), "middle": range(k, L - k)}
        if layers not in presets:
            raise UserValueError(f"layers={layers!r}: use a list of indices or one of {LAYER_PRESETS}")
        out = list(presets[layers])
        return out if out or layers == "none" or L == 0 else [L // 2]
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"layers must be integers, got {i!r}")
        if not -L <= int(i) < L:
            raise LayerIndexError(f"attention layer {int(i)} out of range for a model with {L} attention layers")
        out.add(int(i) % L)
    return sorted(out)


def model_layers(lm, layers: Sequence[int] | str) -> list[int]:
    """``resolve_layers`` for a loaded model (its number of attention layers)."""
    from .capture import ATTENTION_FINDERS

    return resolve_layers(layers, len(ATTENTION_FINDERS[lm.backend](lm.module)))
