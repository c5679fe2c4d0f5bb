"""The report's streamed reduction of per_image.parquet (per_image_summary.py) gives the numbers of the whole
table: per (image, layer) head means, per (layer, head) image means, BH shares, the verdicts built on them.

The synthetic table differs between heads, layers and images (and has NaN rows), so averaging over the wrong
axis, splitting an image between two record batches, or counting the BH family wrongly changes a number.
The streamed path follows pandas 3.1's summation order and is bit-identical there; the frame comparisons allow
rtol 1e-6 so that another pandas' float32 summation order (≈1e-7) cannot fail them, while every error above
(≥1e-3 here) still does."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from siftlens.analyze import PER_HEAD_BY_MAP, PER_HEAD_SCALARS, rows_from_stacked
from siftlens.dataset_stats import bootstrap_mean_ci, layer_curve, significant_fraction
from siftlens.per_image_summary import GroupMeans, bh_fraction, head_grid, read_per_image_summary
from siftlens.report import verdict_table
from siftlens.verdict import layer_verdicts

MAPS = ("sift", "random_kp", "edges", "center", "uniform")
MEANS = ["partial_spearman_sift", "s_cls_null", "s_pp_null"] + [f"{s}__{m}" for s in ("s_cls", "s_pp") for m in MAPS]
GRIDS = ["s_cls__sift", "s_pp__sift", "partial_spearman_sift", "s_cls__random_kp"]  # the last: no NaN
PS = ["s_cls_p", "s_pp_p"]
K = 199  # null maps: p-values are multiples of 1/200


def synthetic_rows(n_images: int, L: int = 4, H: int = 3, seed: int = 0, effect: float = 0.3,
                   no_kp: tuple[int, ...] = (2,), shuffled_ids: bool = False) -> pa.Table:
    """Rows as analyze writes them (rows_from_stacked), with statistics that depend on layer, head and image."""
    g = torch.Generator().manual_seed(seed)
    shape = (L, n_images, H)
    layer = torch.arange(L, dtype=torch.float32)[:, None, None] / L
    head = torch.arange(H, dtype=torch.float32)[None, None, :] / H
    image = torch.randn(1, n_images, 1, generator=g) * 0.2
    stacked = {k: torch.randn(shape, generator=g) for k in PER_HEAD_SCALARS}
    for key in PER_HEAD_BY_MAP:
        v = 1 + 0.1 * torch.randn(*shape, len(MAPS), generator=g) + image[..., None]
        v[..., MAPS.index("sift")] += effect * layer + 0.5 * head ** 2  # SIFT rises with depth, unequal heads
        v[..., MAPS.index("edges")] += 0.2 * head
        stacked[key] = v
    stacked["s_cls_null"] = stacked["s_pp_null"] = 1 + 0.05 * torch.randn(shape, generator=g) + image
    # discrete permutation p-values, smaller in deeper layers and for head 0
    count = (torch.randint(0, K + 1, shape, generator=g).float() * (1 - layer) ** 2).floor()
    count[L // 2:, :, 0] = 0  # head 0 of the later layers sits at the floor 1 / (K + 1)
    stacked["s_cls_p"] = stacked["s_pp_p"] = (1 + count) / (K + 1)
    stacked["lift"] = torch.rand(*shape, 2, 2, generator=g)
    edges = stacked["s_cls"][..., MAPS.index("edges")]
    edges[torch.rand(shape, generator=g) < 0.1] = float("nan")  # scattered non-finite heads
    for i in no_kp:  # an image without SIFT keypoints: no SIFT statistics, no null, no p
        for key in ("s_cls", "s_pp"):
            stacked[key][:, i, :, MAPS.index("sift")] = float("nan")
        for key in ("partial_spearman_sift", "s_cls_p", "s_pp_p", "s_cls_null", "s_pp_null"):
            stacked[key][:, i] = float("nan")
    ids = np.random.default_rng(seed).permutation(1000)[:n_images]
    ids = ids if shuffled_ids else np.sort(ids)  # sorted, as analyze writes them, or in no particular order
    return rows_from_stacked(stacked, ids, MAPS, 2)


def write(table: pa.Table, path, pieces: int = 3) -> None:
    """In several write_table calls, as analyze's merge writes its parts."""
    with pq.ParquetWriter(path, table.schema) as w:
        for chunk in np.array_split(np.arange(table.num_rows), pieces):
            w.write_table(table.slice(int(chunk[0]), len(chunk)), row_group_size=40)


# image ids in order (as analyze writes them) or not: pandas' groupby mean takes another path for each
@pytest.fixture(scope="module", params=[False, True], ids=["sorted_ids", "shuffled_ids"])
def run(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("per_image")
    model = synthetic_rows(37, seed=0, shuffled_ids=request.param)
    twin = synthetic_rows(23, seed=1, effect=0.0, shuffled_ids=request.param)
    write(model, d / "model.parquet")
    write(twin, d / "twin.parquet")
    # batches of 50 rows: an image's 12 rows are often split between two batches
    summaries = [read_per_image_summary(d / f"{n}.parquet", MEANS, GRIDS, PS, batch_rows=50) for n in ("model", "twin")]
    return model.to_pandas(), twin.to_pandas(), summaries[0], summaries[1], d


def test_layer_means_are_the_head_means_of_the_whole_table(run):
    frame, _, summary, _, _ = run
    L, H = 4, 3
    for col in MEANS:
        want = frame.groupby(["image_id", "layer"])[col].mean().unstack("layer").sort_index(axis=1)
        pd.testing.assert_frame_equal(summary.layer_means(col), want, check_exact=False, rtol=1e-6, check_names=False,
                                      check_column_type=False)
    # and by hand: [images, layers, heads] in image-id order, NaN heads skipped
    by_id = frame.sort_values(["image_id", "layer", "head"], kind="stable")
    cube = by_id["s_cls__edges"].to_numpy(np.float64).reshape(-1, L, H)
    np.testing.assert_allclose(summary.layer_means("s_cls__edges").to_numpy(), np.nanmean(cube, axis=2), rtol=1e-6)
    assert summary.layer_means("s_cls__sift").iloc[:, 0].isna().sum() == 1  # the image without keypoints


def test_head_grid_is_the_image_mean_per_layer_and_head(run):
    frame, _, summary, _, _ = run
    for col in GRIDS:
        want = frame.groupby(["layer", "head"])[col].mean().unstack("head")
        got = head_grid(summary, col)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6, check_names=False,
                                      check_column_type=False,
                                      check_index_type=False)
    by_hand = np.nanmean(frame["s_cls__sift"].to_numpy(np.float64).reshape(-1, 4, 3), axis=0)
    np.testing.assert_allclose(head_grid(summary, "s_cls__sift").to_numpy(), by_hand, rtol=1e-6)
    assert np.ptp(by_hand, axis=1).min() > 0.05  # heads differ: a mean over heads would not pass


def test_running_group_means_match_pandas_on_hard_sums():
    # float32 values of very different sizes, infinities, NaNs, fed in uneven pieces: pandas' compensated sum
    rng = np.random.default_rng(3)
    n = 3000
    frame = pd.DataFrame({"layer": rng.integers(0, 3, n).astype(np.int16),
                          "head": rng.integers(0, 4, n).astype(np.int16),
                          "v": (rng.normal(size=n) * 10.0 ** rng.integers(-4, 6, n)).astype(np.float32)})
    frame.loc[rng.uniform(size=n) < 0.05, "v"] = np.nan
    frame.loc[[7, 900], "v"] = np.inf
    frame.loc[(frame["layer"] == 2) & (frame["head"] == 3), "v"] = np.nan  # a group with no value
    means = GroupMeans()
    for part in np.array_split(np.arange(n), 7):
        rows = frame.iloc[part]
        means.update(rows["layer"].to_numpy(), rows["head"].to_numpy(), rows["v"].to_numpy())
    want = frame.groupby(["layer", "head"])["v"].mean().unstack("head")
    pd.testing.assert_frame_equal(means.frame(), want, check_exact=False, rtol=1e-6, check_names=False,
                                  check_column_type=False,
                                  check_index_type=False)


def test_bh_share_from_value_counts_equals_bh_over_every_p(run):
    frame, twin_frame, summary, twin, _ = run
    for col in PS:
        for f, s in ((frame, summary), (twin_frame, twin)):
            want = significant_fraction(f, col)["fraction"]
            got = bh_fraction(s, col)
            pd.testing.assert_series_equal(got, want, check_exact=False, rtol=1e-6, check_names=False,
                                           check_index_type=False)
    shares = bh_fraction(summary, "s_cls_p")
    assert shares.nunique() > 1 and 0 < shares.max() < 1  # layers differ; not all or nothing


def test_verdicts_and_report_table_identical_from_the_summary(run):
    frame, twin_frame, summary, twin, _ = run
    for stat in ("s_cls", "s_pp"):
        want = layer_verdicts(frame, stat, list(MAPS), twin_frame)
        got = layer_verdicts(summary, stat, list(MAPS), twin)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)
        assert want["follows"].any() and not want["follows"].all()  # a case with both answers
        t_want, w_want = verdict_table(frame, list(MAPS), stat, twin_frame, "swap")
        t_got, w_got = verdict_table(summary, list(MAPS), stat, twin, "swap")
        pd.testing.assert_frame_equal(t_got, t_want, check_exact=False, rtol=1e-6)
        assert w_got == w_want
        pd.testing.assert_frame_equal(layer_curve(summary, f"{stat}__sift"), layer_curve(frame, f"{stat}__sift"),
                                      check_exact=False, rtol=1e-6, check_dtype=False)
    alone = layer_verdicts(summary, "s_cls", list(MAPS), None)
    pd.testing.assert_frame_equal(alone, layer_verdicts(frame, "s_cls", list(MAPS), None), check_exact=False, rtol=1e-6)


def test_images_out_of_order_in_the_file_fall_back_to_the_whole_table(run, tmp_path):
    frame, *_ = run
    table = pa.Table.from_pandas(frame.sample(frac=1.0, random_state=0), preserve_index=False)  # rows shuffled
    pq.write_table(table, tmp_path / "shuffled.parquet")
    summary = read_per_image_summary(tmp_path / "shuffled.parquet", MEANS, GRIDS, PS, batch_rows=50)
    shuffled = table.to_pandas()
    for col in ("s_cls__sift", "s_pp_null"):
        want = shuffled.groupby(["image_id", "layer"])[col].mean().unstack("layer").sort_index(axis=1)
        pd.testing.assert_frame_equal(summary.layer_means(col), want, check_exact=False, rtol=1e-6, check_names=False)
    want = significant_fraction(shuffled, "s_cls_p")["fraction"]
    pd.testing.assert_series_equal(bh_fraction(summary, "s_cls_p"), want,
                                   check_exact=False, rtol=1e-6, check_names=False, check_index_type=False)


def test_missing_columns_are_left_out(run):
    *_, d = run
    s = read_per_image_summary(d / "model.parquet", ["s_cls__sift", "not_a_column"], p_columns=["nope_p"])
    assert "s_cls__sift" in s and "not_a_column" not in s and "nope_p" not in s


def test_bootstrap_in_chunks_draws_the_same_resamples():
    # the reference: all resamples in one [n_boot, N] matrix, as before chunking
    v = np.random.default_rng(5).normal(size=(300, 3)) * [1, 5, 0.1]
    v[::11, 1] = np.nan
    rng = np.random.default_rng(0)
    counts = rng.multinomial(300, np.full(300, 1 / 300), size=1000).astype(np.float64)
    valid = ~np.isnan(v)
    boots = (counts @ np.where(valid, v, 0.0)) / (counts @ valid)
    lo, hi = np.nanquantile(boots, [0.025, 0.975], axis=0)
    mean, got_lo, got_hi = bootstrap_mean_ci(v)
    np.testing.assert_allclose(mean, np.nanmean(v, axis=0), rtol=1e-14)
    np.testing.assert_allclose(got_lo, lo, rtol=1e-13)  # other resamples would move these by ~1e-2
    np.testing.assert_allclose(got_hi, hi, rtol=1e-13)
