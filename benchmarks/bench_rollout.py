"""Attention rollout's CLS row in `analyze`: the whole product R <- M_l @ R accumulated layer by layer (before,
B·T³ per layer) against the CLS row multiplied from the last layer down (``RolloutState`` now, B·T² per layer).
Prints CPU ms per image for update + cls_map over all layers, both ways, interleaved, their ratio measured in
this run, and the largest difference between the two maps.

    python benchmarks/bench_rollout.py                                  # ViT-S/16: 6 heads, 14 x 14 + CLS, 12 layers
    python benchmarks/bench_rollout.py --heads 12 --batch 16            # ViT-B/16 at batch 16
    python benchmarks/bench_rollout.py --heads 3 --grid 8               # bundled ViT-Ti at 128 px
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch
from attention_shapes import attention_shape_parser

from siftlens.stats import EPS, RolloutState


class AccumulatedRollout:
    """The previous RolloutState, copied here as the reference: R accumulated as a full matrix product."""

    def __init__(self) -> None:
        self.R: torch.Tensor | None = None

    def update(self, attn: torch.Tensor) -> None:
        A = attn.float().mean(1).mul_(0.5)
        A.diagonal(dim1=-2, dim2=-1).add_(0.5)
        A /= A.sum(-1, keepdim=True)
        self.R = A if self.R is None else A @ self.R

    def cls_map(self, num_prefix: int, cls_index: int) -> torch.Tensor:
        r = self.R[:, cls_index, num_prefix:]
        return r / r.sum(-1, keepdim=True).clamp_min(EPS)


def time_one(cls, layers: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.process_time()
    ro = cls()
    for attn in layers:
        ro.update(attn)
    r = ro.cls_map(1, 0)
    return time.process_time() - t0, r


def main() -> None:
    ap = attention_shape_parser(__doc__.split("\n")[0])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    T = a.grid * a.grid + 1
    layers = [(4 * torch.randn(a.batch, a.heads, T, T, generator=g)).softmax(-1) for _ in range(a.layers)]
    before, after = [], []
    for _ in range(a.rounds):  # interleaved, so both see the same load
        tb, rb = time_one(AccumulatedRollout, layers)
        ta, ra = time_one(RolloutState, layers)
        before.append(1e3 * tb / a.batch)
        after.append(1e3 * ta / a.batch)
    mb, ma = float(np.median(before)), float(np.median(after))
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds")
    print(f"batch {a.batch}, {a.heads} heads, {T} tokens, {a.layers} layers: CPU ms per image (median): "
          f"accumulated {mb:.3f}, CLS row from the last layer {ma:.3f}, ratio {mb / ma:.1f}x")
    print(f"max |difference| of the CLS rollout maps: {float((rb - ra).abs().max()):.2e}")


if __name__ == "__main__":
    main()
