"""The guided pre-training verdict's statistics (src/siftlens/pretrain/protocol.py) on curves with known answers."""

import numpy as np
import pytest

from siftlens.pretrain.protocol import accuracy_band, area_gain_of_speedup, curve_area, epochs_to_reach, speedup


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


def test_paired_seeds_narrow_the_ci_when_seeds_share_their_noise():
    """Seed s of every strategy shares initialisation and data order: a seed-level offset common to both runs
    cancels in the paired bootstrap but not in the unpaired one."""
    rng = np.random.default_rng(3)
    epochs = np.arange(0, 13, dtype=float)
    base = lambda speed: 0.3 + 0.3 * (1 - np.exp(-speed * epochs / 4))
    offsets = np.array([-0.04, 0.05, -0.02, 0.03, 0.0])  # per seed, shared by both strategies
    fast = np.stack([rng.random((len(epochs), 3000)) < (base(1.3) + o)[:, None] for o in offsets])
    slow = np.stack([rng.random((len(epochs), 3000)) < (base(1.0) + o)[:, None] for o in offsets])
    paired = speedup(epochs, fast, slow, n_boot=300, paired=True)
    unpaired = speedup(epochs, fast, slow, n_boot=300, paired=False)
    width = lambda r: r["area_difference_ci"][1] - r["area_difference_ci"][0]
    assert width(paired) < 0.5 * width(unpaired)
    assert paired["area_difference_ci"][0] > 0  # the faster strategy is shown faster only when paired
    with pytest.raises(ValueError, match="paired"):
        speedup(epochs, fast[:3], slow, paired=True)


def test_speedup_against_a_longer_schedule_and_family_wise_levels():
    rng = np.random.default_rng(4)
    e12, e24 = np.arange(0, 13, dtype=float), np.arange(0, 25, dtype=float)
    curve = lambda e, tau: 0.6 * (1 - np.exp(-(e + 0.5) / tau))
    one_x = _outcomes(curve(e12, 3.0), 3, 3000, rng)
    two_x = _outcomes(curve(e24, 6.0), 3, 3000, rng)  # half the speed per epoch, twice the epochs
    r = speedup(e24, two_x, one_x, epochs_random=e12, n_boot=200, paired=True, levels=(0.95, 0.99))
    target = 0.95 * curve(e12, 3.0)[-1]
    truth = epochs_to_reach(e24, curve(e24, 6.0), target) / epochs_to_reach(e12, curve(e12, 3.0), target)
    assert truth == pytest.approx(2.0, abs=0.1)
    assert r["epochs_ratio"] == pytest.approx(truth, abs=0.2)
    (lo95, hi95), (lo99, hi99) = r["epochs_ratio_cis"][0.95], r["epochs_ratio_cis"][0.99]
    assert lo99 <= lo95 < truth < hi95 <= hi99  # the family-wise interval is the wider one
    assert r["area_difference"] < 0  # over the common 12 epochs the slower schedule is lower


def test_accuracy_band_brackets_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(5)
    curve = np.linspace(0.2, 0.6, 6)
    small, large = _outcomes(curve, 3, 300, rng), _outcomes(curve, 3, 6000, rng)
    b_small, b_large = accuracy_band(small, n_boot=200), accuracy_band(large, n_boot=200)
    assert (b_large[1] <= b_large[0]).all() and (b_large[0] <= b_large[2]).all()
    assert np.abs(b_large[0] - curve).max() < 0.03
    assert ((b_large[2] - b_large[1]) < (b_small[2] - b_small[1])).all()


def _write_runs(tmp_path, curves: dict, seeds, rng, n: int = 2000) -> dict:
    runs = {}
    for name, (epochs, curve) in curves.items():
        for s in seeds:
            d = tmp_path / f"{name}-{s}"
            d.mkdir(parents=True)
            np.savez(d / "probe_outcomes.npz", epochs=epochs, knn=_outcomes(curve, 1, n, rng)[0],
                     linear=_outcomes(curve, 1, n, rng)[0])
            runs[(name, s)] = d
    return runs


def test_bench_pretrain_protocol_table_reads_the_runs_outcomes(tmp_path):
    from bench_pretrain import protocol_table

    rng = np.random.default_rng(2)
    epochs = np.arange(0, 9, dtype=float)
    curves = {"random": (epochs, 0.6 * (1 - np.exp(-(epochs + 0.5) / 3))),
              "sift(a=+1)": (epochs, 0.6 * (1 - np.exp(-(epochs + 0.5) / 1.5))),
              "edge-matched(a=+1)": (epochs, 0.6 * (1 - np.exp(-(epochs + 0.5) / 3)))}
    runs = _write_runs(tmp_path, curves, (0, 1, 2), rng)
    names = list(curves)
    table = protocol_table(runs, names, [0, 1, 2], step_seconds={n: 1.0 for n in names}, n_boot=200)
    rows = [line for line in table.splitlines() if line.startswith("| sift(a=+1) | 3 |")]
    assert len(rows) == 2  # knn and linear (the matched-control rows name the control in their second cell)
    ratio = float(rows[0].split("|")[5].split()[0])
    assert 0.3 < ratio < 0.7  # twice as fast
    assert "Bonferroni over the 8 comparisons" in table  # 2 strategies x 2 probes x 2 metrics
    # twice as fast is not "shown" (the CI's upper end must be below 0.5) but a 25% speed-up is not excluded
    assert "EXCLUDED" not in table
    (tmp_path / "sift(a=+1)-1" / "probe_outcomes.npz").unlink()
    assert protocol_table(runs, names, [0, 1, 2]) == ""  # a run without outcomes: no table


def test_bench_pretrain_verdict_excludes_a_speed_up_when_there_is_none_and_shows_a_large_one(tmp_path):
    from bench_pretrain import protocol_table

    rng = np.random.default_rng(6)
    epochs = np.arange(0, 13, dtype=float)
    same = 0.25 + 0.35 * (1 - np.exp(-epochs / 4))
    fast = 0.25 + 0.35 * (1 - np.exp(-3 * epochs / 4))
    names = ["random", "sift(a=-1)", "edge-matched(a=-1)"]
    none = _write_runs(tmp_path / "none", {"random": (epochs, same), "sift(a=-1)": (epochs, same),
                                           "edge-matched(a=-1)": (epochs, same)}, range(5), rng, n=8000)
    t = protocol_table(none, names, list(range(5)), n_boot=200)
    assert "EXCLUDED" in t and "no SIFT strategy speeds" in t
    big = _write_runs(tmp_path / "big", {"random": (epochs, same), "sift(a=-1)": (epochs, fast),
                                         "edge-matched(a=-1)": (epochs, same)}, range(5), rng, n=2000)
    t = protocol_table(big, names, list(range(5)), step_seconds={n: 1.0 for n in names}, n_boot=300)
    assert "SHOWN" in t and "Verdict: SIFT guidance speeds" in t
    # the same gain is not SIFT's when the matched edge control has it too
    both = _write_runs(tmp_path / "both", {"random": (epochs, same), "sift(a=-1)": (epochs, fast),
                                           "edge-matched(a=-1)": (epochs, fast + 0.01)}, range(5), rng, n=2000)
    t = protocol_table(both, names, list(range(5)), step_seconds={n: 1.0 for n in names}, n_boot=300)
    assert "SHOWN" not in t


def test_bench_pretrain_compares_each_sift_strategy_with_its_matched_control_on_common_seeds(tmp_path):
    from bench_pretrain import matched_control_lines, matched_controls

    rng = np.random.default_rng(8)
    epochs = np.arange(0, 13, dtype=float)
    slow = 0.25 + 0.35 * (1 - np.exp(-epochs / 4))
    fast = 0.25 + 0.35 * (1 - np.exp(-3 * epochs / 4))
    curves = {"random": (epochs, slow), "sift(a=-1)": (epochs, fast), "edge-matched(a=-1)": (epochs, slow),
              "sift(a=+1)": (epochs, slow), "edge-matched(a=+1)": (epochs, fast), "attmask-high": (epochs, slow)}
    runs = _write_runs(tmp_path, curves, range(4), rng, n=3000)
    names = list(curves)
    assert matched_controls(names) == [("sift(a=-1)", "edge-matched(a=-1)"), ("sift(a=+1)", "edge-matched(a=+1)")]
    seeds_of = {n: [0, 1, 2, 3] for n in names}
    seeds_of["edge-matched(a=+1)"] = [0, 2]  # a control with fewer seeds: compared on the common ones only
    lines = matched_control_lines(runs, names, seeds_of, n_boot=300)
    assert any("Bonferroni over these 4 comparisons" in line for line in lines)
    rows = {(r.split("|")[1].strip(), r.split("|")[4].strip()): r.split("|") for r in lines if r.startswith("| sift(")}
    gain = np.mean(fast) - np.mean(slow)  # trapezoids on a uniform grid differ from the plain mean only at the ends
    for probe in ("knn", "linear"):
        m, f = rows[("sift(a=-1)", probe)], rows[("sift(a=+1)", probe)]
        assert m[3].strip() == "4" and f[3].strip() == "2"
        d_m, d_f = float(m[5].split()[0]), float(f[5].split()[0])
        assert abs(d_m - gain) < 0.02 and abs(d_f + gain) < 0.02  # signed: SIFT minus its control
        assert float(m[5].split("[")[1].split(",")[0]) > 0  # the 95% CI excludes zero for a real gap
    assert matched_control_lines(runs, ["random", "sift(a=-1)"], seeds_of) == []  # no control run: no table


def test_curve_metrics_logged_by_pretrain_follow_the_probes_so_far():
    from siftlens.pretrain.protocol import curve_metrics

    history = [{"epoch": 0, "knn_acc": 0.2, "linear_acc": 0.3}, {"epoch": 1, "knn_acc": None, "linear_acc": None},
               {"epoch": 2, "knn_acc": 0.4, "linear_acc": 0.3}, {"epoch": 4, "knn_acc": 0.5, "linear_acc": 0.6}]
    m = curve_metrics(history, {"knn_acc": 0.45, "linear_acc": 0.45})
    # kNN trapezoids: (0.2+0.4)/2*2 + (0.4+0.5)/2*2 = 0.6 + 0.9 = 1.5 over 4 epochs
    assert m["knn_area"] == pytest.approx(1.5 / 4)
    assert m["linear_area"] == pytest.approx((0.3 * 2 + 0.45 * 2) / 4)
    assert m["knn_epochs_to_reference"] == pytest.approx(3.0)  # halfway from 0.4 (epoch 2) to 0.5 (epoch 4)
    assert m["linear_epochs_to_reference"] == pytest.approx(3.0)
    early = curve_metrics(history[:3], {"knn_acc": 0.45, "linear_acc": 0.45})
    assert np.isnan(early["knn_epochs_to_reference"])  # not reached yet
    assert "knn_epochs_to_reference" not in curve_metrics(history, None)


def test_reference_run_must_be_a_pretrain_run_with_probes(tmp_path):
    import pandas as pd

    from siftlens.pretrain.loop import reference_targets
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--reference .*no log.parquet"):
        reference_targets(tmp_path)
    pd.DataFrame({"epoch": [0, 1], "knn_acc": [None, None], "linear_acc": [None, None]}).to_parquet(
        tmp_path / "log.parquet")
    with pytest.raises(UserValueError, match="no knn_acc probe"):
        reference_targets(tmp_path)
    pd.DataFrame({"epoch": [0, 2, 3], "knn_acc": [0.1, 0.4, None], "linear_acc": [0.2, 0.6, None]}).to_parquet(
        tmp_path / "log.parquet")
    assert reference_targets(tmp_path) == {"knn_acc": pytest.approx(0.38), "linear_acc": pytest.approx(0.57)}


def test_area_gain_of_a_speedup_is_what_a_time_compressed_copy_of_the_curve_adds():
    epochs = np.array([0.0, 1, 2, 3, 4])
    acc = np.array([0.0, 0.2, 0.4, 0.4, 0.4])
    # 0.5x the epochs: acc(t / 0.5) = acc(2t) -> [0, 0.4, 0.4, 0.4, 0.4]; area 1.4/4 against 1.2/4
    assert area_gain_of_speedup(epochs, acc, 0.5) == pytest.approx(0.2 / 4)
    assert area_gain_of_speedup(epochs, acc, 1.0) == 0.0
    assert area_gain_of_speedup(epochs, acc, 2.0) < 0  # twice as slow loses area


def test_bench_pretrain_verdict_family_holds_only_what_the_verdict_reads(tmp_path):
    from bench_pretrain import family_members, protocol_table

    rng = np.random.default_rng(11)
    epochs = np.arange(0, 13, dtype=float)
    same = 0.25 + 0.35 * (1 - np.exp(-epochs / 4))
    fast = 0.25 + 0.35 * (1 - np.exp(-3 * epochs / 4))
    names = ["random", "sift(a=-1)", "sift(a=+1)", "edge-matched(a=-1)"]
    assert family_members(names, "verdict") == {(n, "knn", m) for n in ("sift(a=-1)", "sift(a=+1)")
                                                 for m in ("ratio", "area")}
    assert len(family_members(names, "table")) == 12
    with pytest.raises(ValueError, match="family scope"):
        family_members(names, "all")
    runs = _write_runs(tmp_path / "a", {n: (epochs, same) for n in names}, range(3), rng, n=3000)
    t = protocol_table(runs, names, list(range(3)), n_boot=200, family_scope="verdict")
    assert "Bonferroni over the 4 comparisons the verdict reads" in t
    edge_rows = [line for line in t.splitlines() if line.startswith("| edge-matched(a=-1) | 3 |")]
    assert len(edge_rows) == 2 and all(line.count("(secondary)") == 2 for line in edge_rows)
    sift_knn = [line for line in t.splitlines() if line.startswith("| sift(a=-1) | 3 | knn |")][0]
    assert "(secondary)" not in sift_knn
    # the narrower family gives narrower family-wise intervals than the whole table's, on the same runs
    wide = protocol_table(runs, names, list(range(3)), n_boot=200, family_scope="table")
    def width(table: str) -> float:  # the curve-area family-wise interval of sift(a=-1), kNN
        row = [line for line in table.splitlines() if line.startswith("| sift(a=-1) | 3 | knn |")][0]
        lo, hi = (float(x) for x in row.split("{")[-1].split("}")[0].split(","))
        return hi - lo

    assert width(t) < width(wide)
    # a large speed-up with no control run is not called shown
    fast_runs = _write_runs(tmp_path / "b", {"random": (epochs, same), "sift(a=-1)": (epochs, fast)}, range(5), rng,
                            n=2000)
    t = protocol_table(fast_runs, ["random", "sift(a=-1)"], list(range(5)), step_seconds={"random": 1.0,
                       "sift(a=-1)": 1.0}, n_boot=300, family_scope="verdict")
    assert "no control was run: not shown" in t and "SHOWN" not in t
