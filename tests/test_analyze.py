"""analyze(): its contract with library callers (the numbers are checked in test_analyze_reference.py)."""

import dataclasses

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


def test_map_workers_run_one_opencv_thread_at_lower_priority_and_get_the_same_keypoints(monkeypatch):
    """init_map_worker (issue 14): one OpenCV thread and a raised niceness in each DataLoader worker; the
    keypoints and maps of every bundled image are identical to those of OpenCV's default thread count."""
    import cv2
    import numpy as np

    from siftlens.analyze import WORKER_NICENESS, init_map_worker
    from siftlens.image_source import find_images
    from siftlens.preprocess import Preprocess, load_rgb
    from siftlens.semantic_maps import MapConfig, compute_maps

    pre, cfg = Preprocess((224, 224), crop_pct=None), MapConfig()
    grays = [pre.to_uint8_gray(pre(load_rgb(p))) for p in find_images(BUNDLED)]
    default_threads = cv2.getNumThreads()
    before = [compute_maps(g, (14, 14), 16, cfg, seed=i) for i, g in enumerate(grays)]
    niced = []
    monkeypatch.setattr("os.nice", lambda inc: niced.append(inc) or 0)  # never renice the test process itself
    try:
        init_map_worker(0)
        assert cv2.getNumThreads() == 1 and niced == [WORKER_NICENESS]
        after = [compute_maps(g, (14, 14), 16, cfg, seed=i) for i, g in enumerate(grays)]
    finally:
        cv2.setNumThreads(default_threads)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.keypoints.xy, b.keypoints.xy)
        np.testing.assert_array_equal(a.keypoints.size, b.keypoints.size)
        for name in a.maps:
            np.testing.assert_array_equal(a.maps[name], b.maps[name], err_msg=name)
