"""The calibration benchmark measures what it says: at a tiny size, it must find the within-image permutation
null anti-conservative on smooth maps and the image-swap null not, and find a planted effect."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from siftlens.verdict import layer_verdicts

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calibration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_calibration", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(bench):
    torch.set_num_threads(1)
    return bench.SynthConfig(grid=(12, 12), n_images=24, heads=2, layers=2, n_perm=99)


def _rate(rows, conclusion):
    (row,) = [r for r in rows if r["conclusion"] == conclusion]
    return row


def test_fpr_separates_permute_from_swap(bench, tiny):
    reps = [bench.synthetic_replicate(100 + r, tiny) for r in range(5)]
    swap = bench.summarize([x["swap"]["s_cls"] for x in reps], null="swap")
    perm = bench.summarize([x["permute"]["s_cls"] for x in reps], null="permute")
    swap_rate, perm_rate = _rate(swap, "per_map p<0.05"), _rate(perm, "per_map p<0.05")
    # smooth, centre-biased maps and attention, independent: shuffles over patches call far more than 5%
    # significant; other images' maps keep what maps share and stay near the nominal level
    assert perm_rate["rate"] > 0.15 and perm_rate["lo"] > 0.08
    assert swap_rate["rate"] < 0.08
    assert perm_rate["n"] == swap_rate["n"] == 5 * tiny.n_images * tiny.heads * tiny.layers
    # the BH share follows: permute rejects in most layers, swap (p floor 1/24: BH cannot reject) never
    assert _rate(perm, "BH share (mean)")["rate"] > 0.05
    assert _rate(swap, "BH share (mean)")["rate"] == 0.0


def test_rate_is_the_share_of_small_p_values(bench, tiny):
    """The benchmark's per-map count equals a direct count on the per-image table, and its diagnostics equal
    layer_verdicts run with min_effect=0 / without a twin."""
    rng = np.random.default_rng(7)
    C, g = bench.synthetic_maps(rng, tiny)
    C, g = torch.from_numpy(C).float(), torch.from_numpy(g)
    gen = torch.Generator().manual_seed(7)
    maps, ids = bench.synthetic_nulls(C, g, tiny, "permute")
    frames = [bench.per_image_frame([bench.layer_statistics(bench.synthetic_attention(gen, tiny, lay), 1, 0, maps)
                                     for lay in range(tiny.layers)], ids) for _ in range(2)]
    c = bench.conclusions(frames[0], frames[1], bench.MAP_NAMES, "s_cls")
    p = frames[0]["s_cls_p"].to_numpy()
    assert c["per_map_sig"].sum() == (p < 0.05).sum() and c["per_map_n"].sum() == np.isfinite(p).sum()
    bare = layer_verdicts(frames[0], "s_cls", list(bench.MAP_NAMES), frames[1], min_effect=0.0)
    notwin = layer_verdicts(frames[0], "s_cls", list(bench.MAP_NAMES), None)
    assert np.array_equal(c["follows_bare"], bare["follows"].to_numpy())
    assert np.array_equal(c["follows_notwin"], notwin["follows"].to_numpy())


def test_planted_effect_is_found(bench, tiny):
    """Power: attention drawn toward the own SIFT map (beta = 1) in layer 1 only is found there, not in layer 0."""
    reps = [bench.synthetic_replicate(200 + r, tiny, ("swap",), beta=1.0, planted_layers=(1,)) for r in range(2)]
    for x in reps:
        c = x["swap"]["s_cls"]
        rate = c["per_map_sig"] / c["per_map_n"]
        assert rate[1] > 0.2 and rate[0] < 0.1
        assert c["follows"][1] and not c["follows"][0]
        assert c["effect"][1] > 0.5


def test_rate_intervals(bench):
    lo, hi = bench.clopper_pearson(0, 12)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 12), rel=1e-6)  # exact upper bound at k = 0
    lo, hi = bench.cluster_bootstrap(np.array([1, 3, 2, 4]), np.array([10, 10, 10, 10]))
    assert lo < 0.25 < hi and lo >= 0.1 and hi <= 0.4
    assert bench.judge(0.05, 0.07) == "met" and bench.judge(0.07, 0.09) == "MISSED"
    assert bench.judge(0.0, 0.26) == "rate ok, CI too wide"
