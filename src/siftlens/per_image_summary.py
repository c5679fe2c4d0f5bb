"""What the report needs from ``per_image.parquet``, reduced while the file is read in record batches.

The table has one row per image x layer x head (at 50,000 images x 144 heads, ~7 million rows). The report's
statistics need far less:

* per (image, layer), each statistic averaged over heads (the bootstrap CIs and the tests are over images:
  ``dataset_stats.per_image_layer_means``), H times smaller than the table;
* per (layer, head), a mean over images (the layer x head figure);
* per layer, how many image x head p-values take each value (the Benjamini-Hochberg share; with K null maps a
  p-value is one of K + 1 values, so this does not grow with the number of images).

Only the first still grows with the number of images: 4-8 bytes per image x layer x column kept (float32, or
float64 where pandas averages in float64; see the note at KEYS). benchmarks/RESULTS.md (issue 14) has the
measurement: ~2.4 KB per image at 12 layers for the whole report step, against ~64 KB before.

``PerImageSummary`` answers the same questions as the whole DataFrame, with the same numbers: each
(image, layer) mean is pandas' groupby mean over the same rows in the same order (an image's rows are never
split between two batches), and the (layer, head) means repeat pandas' compensated summation row by row.
``verdict.py``, ``report.py`` and ``dataset_stats.layer_curve`` take either.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .dataset_stats import per_image_layer_means, significant_fraction

KEYS = ["image_id", "layer", "head"]
# pandas (3.1) has two groupby means: with the group keys in sorted order and no NaN in the column, one in
# float64; otherwise Kahan sums in the column's dtype (float32 here). The two differ in the last bits. The
# whole table's groupby picks one per column, so each batch must be averaged the way its whole column was:
# a first pass over the file finds the columns with a NaN and whether the (image, layer) keys are sorted.
BATCH_ROWS = 1 << 16  # rows per record batch: ~6 MB of float32 statistics for the report's ~22 columns


class GroupMeans:
    """Mean of a column per (layer, head) over rows fed in order: pandas' groupby mean, kept running.

    pandas sums each group with Kahan compensation and skips NaNs; the same steps in the same row order and
    the same dtype give the same bits as ``frame.groupby(["layer", "head"])[col].mean()`` on the whole table,
    which a sum of per-batch means would not."""

    def __init__(self, dtype: type = np.float32) -> None:
        self.slots: dict[tuple[int, int], int] = {}
        self.dtype = dtype  # the column's: pandas' Kahan path sums in it
        self.sums = self.comp = None
        self.nobs = np.zeros(0, np.int64)

    def _grow(self, n: int) -> None:
        if self.sums is None:
            self.sums, self.comp = np.zeros(0, self.dtype), np.zeros(0, self.dtype)
        extra = n - len(self.nobs)
        if extra > 0:
            self.sums = np.concatenate([self.sums, np.zeros(extra, self.sums.dtype)])
            self.comp = np.concatenate([self.comp, np.zeros(extra, self.comp.dtype)])
            self.nobs = np.concatenate([self.nobs, np.zeros(extra, np.int64)])

    def update(self, layer: np.ndarray, head: np.ndarray, values: np.ndarray) -> None:
        keys, inverse = np.unique(np.stack([layer, head], axis=1), axis=0, return_inverse=True)
        slot_of_key = np.array([self.slots.setdefault((int(a), int(b)), len(self.slots)) for a, b in keys])
        self._grow(len(self.slots))
        slot = slot_of_key[inverse.ravel()]
        keep = ~np.isnan(values)
        slot, values = slot[keep], values[keep].astype(self.dtype, copy=False)
        # the k-th value of every group, for k = 0, 1, ...: one vectorised Kahan step per k, groups in parallel
        order = np.argsort(slot, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(slot[order])) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        by_rank = order[np.argsort(rank, kind="stable")]
        bounds = np.r_[0, np.cumsum(np.bincount(rank))] if len(rank) else np.zeros(1, np.int64)
        sums, comp = self.sums, self.comp
        with np.errstate(invalid="ignore"):  # inf - inf: pandas resets the compensation, as below
            for a, b in zip(bounds[:-1], bounds[1:]):
                rows = by_rank[a:b]
                s, val = slot[rows], values[rows]
                y = val - comp[s]
                t = sums[s] + y
                c = (t - sums[s]) - y
                comp[s] = np.where(np.isnan(c), 0, c)
                sums[s] = t
        self.nobs += np.bincount(slot, minlength=len(self.nobs))

    def frame(self) -> pd.DataFrame:
        """[layers x heads], as ``groupby(["layer", "head"]).mean().unstack("head")``."""
        if self.sums is None:
            return pd.DataFrame()
        keys = list(self.slots)
        idx = [self.slots[k] for k in keys]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(self.nobs[idx] > 0, self.sums[idx] / self.nobs[idx].astype(self.sums.dtype), np.nan)
        s = pd.Series(means.astype(self.sums.dtype), index=pd.MultiIndex.from_tuples(keys, names=["layer", "head"]))
        return s.sort_index().unstack("head")


class PerImageSummary:
    """The reduced view of one ``per_image.parquet`` (see the module docstring); ``column in summary`` is
    True for the columns it was asked for and the file has."""

    def __init__(self, columns: set[str], layer_means: dict[str, pd.DataFrame], grids: dict[str, pd.DataFrame],
                 p_counts: dict[str, pd.Series], p_layers: dict[str, np.ndarray], nonempty: set[str]) -> None:
        self.columns, self._layer_means, self._grids = columns, layer_means, grids
        self._p_counts, self._p_layers, self.nonempty = p_counts, p_layers, nonempty

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    def layer_means(self, column: str) -> pd.DataFrame:
        """[images x layers] head-averaged ``column`` (= ``dataset_stats.per_image_layer_means``)."""
        return self._layer_means[column]

    def head_grid(self, column: str) -> pd.DataFrame:
        return self._grids[column]

    def significant_fraction(self, p_column: str, alpha: float = 0.05) -> pd.Series:
        """Per layer: share of image x head tests with BH q < alpha (= ``dataset_stats.significant_fraction``).

        BH within a layer rejects the j smallest p-values for the largest j with p_(j) m / j < alpha. Among
        tied p-values p m / j is smallest at the last of them, so only each distinct value's last rank needs
        checking: the counts per value give the same rejections as sorting all m p-values."""
        counts = self._p_counts[p_column]
        out = {}
        for layer in self._p_layers[p_column]:
            per_value = counts.xs(layer, level="layer") if layer in counts.index.get_level_values("layer") \
                else pd.Series(dtype=np.int64)
            values = per_value.index.to_numpy(np.float64)  # sorted ascending (the Series is sorted)
            last_rank = np.cumsum(per_value.to_numpy())
            m = int(last_rank[-1]) if len(last_rank) else 0
            passing = last_rank[values * m / last_rank < alpha] if m else last_rank[:0]
            out[layer] = (int(passing.max()) if len(passing) else 0) / max(m, 1)
        return pd.Series(out, name="fraction", dtype=np.float64).rename_axis("layer")


PerImage = pd.DataFrame | PerImageSummary


def has_values(per_image: PerImage | None, column: str) -> bool:
    """``column`` is there and holds at least one non-NaN value."""
    if per_image is None or column not in per_image:
        return False
    if isinstance(per_image, PerImageSummary):
        return column in per_image.nonempty
    return bool(per_image[column].notna().any())


def head_grid(per_image: PerImage, column: str) -> pd.DataFrame:
    """[layers x heads]: ``column`` averaged over images."""
    if isinstance(per_image, PerImageSummary):
        return per_image.head_grid(column)
    return per_image.groupby(["layer", "head"])[column].mean().unstack("head")


def bh_fraction(per_image: PerImage, p_column: str, alpha: float = 0.05) -> pd.Series:
    """Per layer: share of image x head p-values significant after BH within the layer."""
    if isinstance(per_image, PerImageSummary):
        return per_image.significant_fraction(p_column, alpha)
    return significant_fraction(per_image, p_column, alpha)["fraction"]


def _first_pass(pf: pq.ParquetFile, columns: list[str], batch_rows: int) -> tuple[set[str], bool]:
    """The columns with a NaN somewhere, and whether the (image_id, layer) keys never decrease."""
    with_nan: set[str] = set()
    keys_sorted, last = True, None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=KEYS[:2] + columns):
        with_nan.update(c for c in columns
                        if c not in with_nan and np.isnan(batch.column(c).to_numpy(zero_copy_only=False)).any())
        if keys_sorted and batch.num_rows:
            ids, layer = (batch.column(k).to_numpy().astype(np.int64) for k in KEYS[:2])
            if last is not None:
                ids, layer = np.r_[last[0], ids], np.r_[last[1], layer]
            d_id, d_layer = np.diff(ids), np.diff(layer)
            keys_sorted = bool(((d_id > 0) | ((d_id == 0) & (d_layer >= 0))).all())
            last = ids[-1], layer[-1]
    return with_nan, keys_sorted


def _kahan_mean(df: pd.DataFrame, column: str) -> pd.Series:
    """Per (image, layer) mean by pandas' Kahan path, whatever this batch's keys and values: one extra row (a
    NaN, in an image id the batch lacks) keeps pandas off its sorted, NaN-free path."""
    ids = df["image_id"].to_numpy()
    dummy = int(ids.min()) - 1
    extra = pd.DataFrame({"image_id": np.array([dummy], ids.dtype), "layer": df["layer"].iloc[:1].to_numpy(),
                          column: np.array([np.nan], df[column].dtype)})
    both = pd.concat([extra, df[["image_id", "layer", column]]], ignore_index=True)
    return both.groupby(["image_id", "layer"])[column].mean().drop(dummy, level="image_id")


def _tail_start(ids: np.ndarray) -> int:
    """Index of the first row of the last image's trailing run (0 if the batch is all one image)."""
    other = np.flatnonzero(ids != ids[-1])
    return int(other[-1]) + 1 if len(other) else 0


def read_per_image_summary(path: str | Path, mean_columns: Iterable[str], grid_columns: Iterable[str] = (),
                           p_columns: Iterable[str] = (), batch_rows: int = BATCH_ROWS) -> PerImageSummary:
    """Read ``path`` in record batches of the needed columns only, reducing each batch at once.

    Columns the file lacks are left out (``column in summary`` is then False). Rows of one image must be
    contiguous (``analyze`` writes them so); if they are not, the file is read whole instead, so the numbers
    are right either way."""
    # pre_buffer=False: pyarrow would otherwise buffer every row group's column chunks before the first batch
    # (at 20,000 images the whole ~270 MB of the report's columns)
    pf = pq.ParquetFile(path, pre_buffer=False)
    have = set(pf.schema_arrow.names)
    mean_cols = [c for c in dict.fromkeys(mean_columns) if c in have]
    grid_cols = [c for c in dict.fromkeys(grid_columns) if c in have]
    p_cols = [c for c in dict.fromkeys(p_columns) if c in have]
    stats = list(dict.fromkeys(mean_cols + grid_cols + p_cols))
    with_nan, keys_sorted = _first_pass(pf, mean_cols, batch_rows) if mean_cols else (set(), True)
    # the columns whose whole-table mean took pandas' Kahan path (see the note at KEYS)
    kahan = {c for c in mean_cols if c in with_nan or not keys_sorted}
    pieces: dict[str, list[pd.DataFrame]] = {c: [] for c in mean_cols}  # per batch: [images x layers]
    # (layer, head) keys cycle with every image: the whole table's grid always took the Kahan path
    grids = {c: GroupMeans(pf.schema_arrow.field(c).type.to_pandas_dtype()) for c in grid_cols}
    p_counts: dict[str, list[pd.Series]] = {c: [] for c in p_cols}
    p_layers: dict[str, set[int]] = {c: set() for c in p_cols}
    nonempty: set[str] = set()

    def reduce(df: pd.DataFrame) -> None:
        by_image_layer = df.groupby(["image_id", "layer"])
        for c in mean_cols:
            if c in kahan and not df[c].isna().any():  # this batch alone might take the other path
                mean = _kahan_mean(df, c)
            else:  # takes the whole column's path: a NaN here too, or sorted keys and no NaN anywhere
                mean = by_image_layer[c].mean()
            pieces[c].append(mean.unstack("layer"))
        layer, head = df["layer"].to_numpy(), df["head"].to_numpy()
        for c in grid_cols:
            grids[c].update(layer, head, df[c].to_numpy())
        for c in p_cols:
            p_layers[c].update(np.unique(layer).tolist())
            valid = df.loc[df[c].notna(), ["layer", c]]
            p_counts[c].append(valid.groupby(["layer", c]).size())
        nonempty.update(c for c in stats if df[c].notna().any())

    carry = None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=KEYS + stats):
        df = batch.to_pandas()
        if carry is not None and len(carry):
            df = pd.concat([carry, df], ignore_index=True)
        if not len(df):
            continue
        # the last image's rows may go on in the next batch: hold them back so no (image, layer) is split
        cut = _tail_start(df["image_id"].to_numpy())
        carry = df.iloc[cut:]
        if cut:
            reduce(df.iloc[:cut])
    if carry is not None and len(carry):
        reduce(carry)

    layer_means = {}
    for c in mean_cols:  # one column at a time, its batches freed as they are joined
        wide = pd.concat(pieces.pop(c)) if pieces[c] else pd.DataFrame(index=pd.Index([], name="image_id"))
        if not wide.index.is_unique:  # an image's rows were not contiguous
            break
        layer_means[c] = wide.sort_index().sort_index(axis=1)
    if len(layer_means) < len(mean_cols):  # read the file whole instead (the same numbers, all the memory)
        del layer_means, pieces
        frame = pd.read_parquet(path, columns=KEYS + stats)
        layer_means = {c: per_image_layer_means(frame, c) for c in mean_cols}
        grid_frames = {c: head_grid(frame, c) for c in grid_cols}
        counts = {c: frame.loc[frame[c].notna()].groupby(["layer", c]).size() for c in p_cols}
        layers = {c: np.unique(frame["layer"].to_numpy()) for c in p_cols}
        return PerImageSummary(set(stats), layer_means, grid_frames, counts, layers,
                               {c for c in stats if frame[c].notna().any()})
    counts = {}
    for c in p_cols:
        parts = [s for s in p_counts[c] if len(s)]
        counts[c] = (pd.concat(parts).groupby(level=[0, 1]).sum() if parts
                     else pd.Series(dtype=np.int64, index=pd.MultiIndex.from_arrays([[], []], names=["layer", c])))
    return PerImageSummary(set(stats), layer_means, {c: g.frame() for c, g in grids.items()}, counts,
                           {c: np.array(sorted(p_layers[c])) for c in p_cols}, nonempty)
