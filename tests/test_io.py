"""io.py: output directories that cannot be written fail in one line naming the path; every output is written
atomically (complete or absent, never a half-written file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siftlens.io import (
    OutputDirError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_parquet,
    atomic_write_text,
    ensure_writable_dir,
)
from tests.bad_files import assert_names, write


def test_out_dir_under_a_regular_file(tmp_path):
    f = write(tmp_path / "file", b"x")
    with pytest.raises(OutputDirError) as ei:
        ensure_writable_dir(f / "sub")
    assert_names(ei.value, str(f / "sub"), "not writable")
    with pytest.raises(OutputDirError) as ei:
        ensure_writable_dir(f)
    assert_names(ei.value, str(f), "not a directory")
    assert f.read_bytes() == b"x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError) as ei:
            ensure_writable_dir(ro)
        assert_names(ei.value, str(ro), "permission denied")
    finally:
        ro.chmod(0o700)


def test_atomic_write_failure_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "gone" / "manifest.json"  # the directory vanished mid-run
    with pytest.raises(OutputDirError) as ei:
        atomic_write_bytes(target, b"{}")
    assert_names(ei.value, str(target))

    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(TypeError):
        atomic_write_bytes(d / "x.bin", object())  # write fails: the temp file is removed
    assert not list(d.iterdir())
    atomic_write_bytes(d / "x.bin", b"ok")
    assert (d / "x.bin").read_bytes() == b"ok" and [p.name for p in d.iterdir()] == ["x.bin"]
    assert (d / "x.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_writers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "ünïcode ✓\n")
    assert (tmp_path / "t.txt").read_bytes() == "ünïcode ✓\n".encode()
    atomic_write_json(tmp_path / "m.json", {"path": tmp_path / "x", "n": [1, 2.5]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"path": str(tmp_path / "x"), "n": [1, 2.5]}
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    for compress in (True, False):
        atomic_write_npz(tmp_path / f"a{compress}.npz", compress=compress, a=a, b=np.array(["x", "y"]))
        with np.load(tmp_path / f"a{compress}.npz") as z:
            np.testing.assert_array_equal(z["a"], a)
            assert z["b"].tolist() == ["x", "y"]
    raw = (tmp_path / "aTrue.npz").stat().st_size, (tmp_path / "aFalse.npz").stat().st_size
    assert raw[0] != raw[1]  # compress is honoured
    df = pd.DataFrame({"x": [3, 1, 2], "y": ["a", "b", "c"]}, index=[10, 20, 30])
    atomic_write_parquet(df, tmp_path / "d.parquet")
    back = pd.read_parquet(tmp_path / "d.parquet")
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True))  # no index column is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aFalse.npz", "aTrue.npz", "d.parquet", "m.json", "t.txt"]


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"run": 1})
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # the write itself fails
    assert json.loads(target.read_text()) == {"run": 1}
    with pytest.raises(KeyError):  # an error inside the block: renamed never, temp file removed
        with atomic_path(target) as tmp:
            tmp.write_text('{"run": 3}')
            raise KeyError("writer failed")
    assert json.loads(target.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_paths_are_unique_and_os_errors_name_the_output(tmp_path):
    target = tmp_path / "per_image.parquet"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".per_image.parquet.")
        a.write_bytes(b"first")
        b.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block finished last: its file stands
    with pytest.raises(OutputDirError) as ei:
        with atomic_path(target) as tmp:
            os.replace(tmp / "no" / "such", Path(tmp))  # an OSError inside the block
    assert_names(ei.value, str(target), "cannot write output")
    assert target.read_bytes() == b"first"

