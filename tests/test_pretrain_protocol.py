"""The guided pre-training verdict's statistics (src/siftlens/pretrain/protocol.py) on curves with known answers."""

import numpy as np
import pytest

from siftlens.pretrain.protocol import curve_area, epochs_to_reach, speedup


def test_epochs_to_reach_interpolates_between_probes():
    e = np.array([1, 2, 4, 8])
    a = np.array([0.1, 0.3, 0.5, 0.6])
    assert epochs_to_reach(e, a, 0.4) == pytest.approx(3.0)  # halfway between epoch 2 (0.3) and 4 (0.5)
    assert epochs_to_reach(e, a, 0.05) == 1.0
    assert epochs_to_reach(e, a, 0.6) == 8.0
    assert epochs_to_reach(e, a, 0.61) == float("inf")
    # the first crossing counts, not a later one after a dip
    assert epochs_to_reach([1, 2, 3, 4], [0.1, 0.5, 0.2, 0.6], 0.4) == pytest.approx(1.75)


def test_curve_area_is_the_runs_mean_accuracy_with_uneven_probes():
    # trapezoids: (0.2+0.4)/2*1 + (0.4+0.4)/2*3 = 0.3 + 1.2 = 1.5 over 4 epochs
    assert curve_area([0, 1, 4], [0.2, 0.4, 0.4]) == pytest.approx(1.5 / 4)
    assert curve_area([2], [0.7]) == 0.7


def _outcomes(curve: np.ndarray, seeds: int, n: int, rng) -> np.ndarray:
    """Per-image correct/incorrect [S, E, N] whose expected accuracy follows ``curve`` [E]."""
    return rng.random((seeds, len(curve), n)) < curve[None, :, None]


def test_speedup_recovers_a_strategy_twice_as_fast_with_a_ci_around_it():
    rng = np.random.default_rng(0)
    epochs = np.arange(1, 21, dtype=float)
    random_curve = 0.6 * (1 - np.exp(-epochs / 6))
    fast_curve = 0.6 * (1 - np.exp(-2 * epochs / 6))  # the same curve at twice the speed
    res = speedup(epochs, _outcomes(fast_curve, 5, 4000, rng), _outcomes(random_curve, 5, 4000, rng),
                  n_boot=300)
    target = 0.95 * random_curve[-1]
    truth = epochs_to_reach(epochs, fast_curve, target) / epochs_to_reach(epochs, random_curve, target)
    assert truth == pytest.approx(0.5, abs=0.03)
    lo, hi = res["epochs_ratio_ci"]
    assert lo < truth < hi and hi - lo < 0.15
    assert res["epochs_ratio"] == pytest.approx(truth, abs=0.05)
    assert res["area_difference"] > 0 and res["area_difference_ci"][0] > 0
    # the comparison is not symmetric: random against the fast strategy is about 2x slower
    back = speedup(epochs, _outcomes(random_curve, 5, 4000, rng), _outcomes(fast_curve, 5, 4000, rng), n_boot=50)
    assert back["epochs_ratio"] > 1.5 and back["area_difference"] < 0


def test_speedup_of_the_same_process_is_one_and_refuses_mismatched_shapes():
    rng = np.random.default_rng(1)
    epochs = np.arange(1, 11, dtype=float)
    curve = 0.5 * (1 - np.exp(-epochs / 3))
    res = speedup(epochs, _outcomes(curve, 4, 3000, rng), _outcomes(curve, 4, 3000, rng), n_boot=300)
    lo, hi = res["epochs_ratio_ci"]
    assert lo < 1.0 < hi
    with pytest.raises(ValueError, match="do not share"):
        speedup(epochs, np.zeros((2, 10, 5)), np.zeros((2, 9, 5)))


def test_bench_pretrain_protocol_table_reads_the_runs_outcomes(tmp_path):
    from bench_pretrain import protocol_table

    rng = np.random.default_rng(2)
    epochs = np.arange(0, 9, dtype=float)
    curves = {"random": 0.6 * (1 - np.exp(-(epochs + 0.5) / 3)), "sift": 0.6 * (1 - np.exp(-(epochs + 0.5) / 1.5))}
    runs = {}
    for name, curve in curves.items():
        for s in (0, 1):
            d = tmp_path / f"{name}-{s}"
            d.mkdir()
            np.savez(d / "probe_outcomes.npz", epochs=epochs, knn=_outcomes(curve, 1, 2000, rng)[0],
                     linear=_outcomes(curve, 1, 2000, rng)[0])
            runs[(name, s)] = d
    table = protocol_table(runs, ["random", "sift"], [0, 1])
    rows = [line for line in table.splitlines() if line.startswith("| sift |")]
    assert len(rows) == 2  # knn and linear
    ratio = float(rows[0].split("|")[3].split()[0])
    assert 0.3 < ratio < 0.7  # twice as fast
    (tmp_path / "sift-1" / "probe_outcomes.npz").unlink()
    assert protocol_table(runs, ["random", "sift"], [0, 1]) == ""  # a run without outcomes: no table
