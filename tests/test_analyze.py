"""analyze(): its contract with library callers (the numbers are checked in test_analyze_reference.py)."""

import dataclasses
from pathlib import Path

import pytest

import siftlens
from siftlens.analyze import AnalyzeConfig
from tests.analyze_reference import BUNDLED, tiny_model


def test_analyze_leaves_the_callers_config_unchanged(tmp_path):
    cfg = AnalyzeConfig(batch_size=2, null_permutations=5, twin="none", workers=0, report=False, progress=False)
    before = dataclasses.asdict(cfg)
    res = siftlens.analyze(tiny_model(), images=BUNDLED, out=tmp_path / "out", config=cfg, limit=3, seed=1)
    assert dataclasses.asdict(cfg) == before  # the override (limit, seed) went to a copy
    assert res.manifest["counts"]["analysed"] == 3


def test_analyze_rejects_an_unknown_option(tmp_path):
    with pytest.raises(TypeError, match="unknown option 'batchsize'"):
        siftlens.analyze(tiny_model(), images=BUNDLED, out=tmp_path / "out", batchsize=2)


def test_analyze_runs_opencv_on_one_thread_and_gets_the_same_keypoints(monkeypatch):
    """opencv_threads(1) around the run (issue 14) and a raised niceness in each DataLoader worker; the
    keypoints and maps of every bundled image are identical to those at OpenCV's default thread count, and
    the caller's thread count is restored."""
    import cv2
    import numpy as np

    from siftlens.analyze import WORKER_NICENESS, init_map_worker, opencv_threads
    from siftlens.image_source import find_images
    from siftlens.preprocess import Preprocess, load_rgb
    from siftlens.semantic_maps import MapConfig, compute_maps

    pre, cfg = Preprocess((224, 224), crop_pct=None), MapConfig()
    grays = [pre.to_uint8_gray(pre(load_rgb(p))) for p in find_images(BUNDLED)]
    default_threads = cv2.getNumThreads()
    before = [compute_maps(g, (14, 14), 16, cfg, seed=i) for i, g in enumerate(grays)]
    with opencv_threads(1):
        assert cv2.getNumThreads() == 1
        after = [compute_maps(g, (14, 14), 16, cfg, seed=i) for i, g in enumerate(grays)]
    assert cv2.getNumThreads() == default_threads
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.keypoints.xy, b.keypoints.xy)
        np.testing.assert_array_equal(a.keypoints.size, b.keypoints.size)
        for name in a.maps:
            np.testing.assert_array_equal(a.maps[name], b.maps[name], err_msg=name)
    niced = []
    monkeypatch.setattr("os.nice", lambda inc: niced.append(inc) or 0)  # never renice the test process itself
    init_map_worker(0)
    assert niced == [WORKER_NICENESS]


def test_analyze_with_workers_after_opencv_used_its_thread_pool_here(tmp_path):
    """A process that ran OpenCV's multi-threaded SIFT before analyze forks its workers (a notebook, a
    benchmark): the run must finish (a cv2.setNumThreads call inside a forked worker deadlocked there)."""
    import subprocess
    import sys

    code = (
        "import cv2, numpy as np\n"
        "from siftlens.semantic_maps import detect_sift\n"
        "rng = np.random.default_rng(0)\n"
        "detect_sift((rng.random((256, 256)) * 255).astype(np.uint8))  # OpenCV's pool now has threads\n"
        "from siftlens.analyze import analyze\n"
        "from tests.analyze_reference import BUNDLED, tiny_model\n"
        f"analyze(tiny_model(), images=BUNDLED, out={str(tmp_path / 'out')!r}, workers=2, batch_size=4,\n"
        "        report=False, progress=False, twin='none')\n"
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
