"""The image-swap null in `analyze`'s reducers: a [B, K, n] gathered copy of the bank per batch (before) against
one matmul on the shared bank (``prepare_maps(null_bank=, null_keep=)``, now). Prints CPU ms per image for the
null part of one layer's statistics (reducers with the null minus without), both ways, interleaved, and their
ratio measured in this run; and the largest difference between the two results.

    python benchmarks/bench_swap_null.py                      # ViT-S/16 shapes: 6 heads, 14 x 14 tokens, K = 999
    python benchmarks/bench_swap_null.py --heads 3 --grid 8   # bundled ViT-Ti at 128 px
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch
from attention_shapes import attention_shape_parser

from siftlens.stats import layer_statistics, prepare_maps, swap_columns, swapped_maps

NAMES = ("sift", "random_kp", "edges", "edges_sparse", "orb", "center", "uniform")


def main() -> None:
    ap = attention_shape_parser(__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=999)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, H, n = a.batch, a.heads, a.grid * a.grid
    C = torch.rand(B, len(NAMES), n, generator=g)
    C /= C.sum(-1, keepdim=True)
    groups = torch.randint(0, 4, (B, n), generator=g)
    attn = [torch.softmax(torch.randn(B, H, n + 1, n + 1, generator=g) * 3, -1) for _ in range(a.layers)]
    bank = torch.rand(a.k + 1, n, generator=g)
    bank /= bank.sum(-1, keepdim=True)
    bank_ids, index = torch.arange(a.k + 1), torch.arange(B) * 3  # a third of the batch is in the bank
    grid, patch = (a.grid, a.grid), 16

    def reducers(kind: str) -> tuple[float, list[dict]]:
        t = time.process_time()
        if kind == "none":
            maps = prepare_maps(C, groups, NAMES, 4, grid, patch)
        elif kind == "copy":
            maps = prepare_maps(C, groups, NAMES, 4, grid, patch, C_null=swapped_maps(bank, bank_ids, index))
        else:
            maps = prepare_maps(C, groups, NAMES, 4, grid, patch, null_bank=bank,
                                null_keep=swap_columns(bank_ids, index))
        outs = [layer_statistics(x, 1, 0, maps) for x in attn]
        return (time.process_time() - t) * 1e3 / B, outs

    times: dict[str, list[float]] = {"none": [], "copy": [], "shared": []}
    for _ in range(a.rounds):
        for kind in times:
            times[kind].append(reducers(kind)[0])
    med = {k: float(np.median(v)) for k, v in times.items()}
    null_copy, null_shared = med["copy"] - med["none"], med["shared"] - med["none"]
    _, o1 = reducers("copy")
    _, o2 = reducers("shared")
    pairs = list(zip(o1, o2))
    gap = max(float((x[k] - y[k]).abs().nan_to_num().max()) for x, y in pairs for k in ("s_cls_null", "s_pp_null"))
    p_diff = torch.cat([(x[k] - y[k]).abs().nan_to_num().flatten() for x, y in pairs for k in ("s_cls_p", "s_pp_p")])
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} thread(s); "
          f"B={B}, heads={H}, tokens={n}, K={a.k}, {a.layers} layers, median of {a.rounds} interleaved rounds")
    print(f"reducers CPU ms per image: no null {med['none']:.2f}, copy {med['copy']:.2f}, "
          f"shared bank {med['shared']:.2f}")
    print(f"null part: copy {null_copy:.2f} ms, shared bank {null_shared:.2f} ms, "
          f"copy/shared {null_copy / max(null_shared, 1e-9):.1f}x; "
          f"reducers with the null, copy/shared {med['copy'] / med['shared']:.2f}x")
    print(f"largest difference of the null means: {gap:.2e}; p-values that differ: {int((p_diff > 0).sum())} of "
          f"{len(p_diff)}, by at most {float(p_diff.max()) * (a.k + 1):.0f} / (K + 1)")


if __name__ == "__main__":
    main()
