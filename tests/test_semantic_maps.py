"""Semantic maps against hand-computed cases (METHOD.md §1)."""

import math

import cv2
import numpy as np
import pytest

from siftlens.semantic_maps import (
    Keypoints,
    MapConfig,
    compute_maps,
    concentration,
    concentration_groups,
    detect_sift,
    keypoint_mass,
    random_keypoints_like,
    sparsity_matched,
)


def kps(*rows):
    """Keypoints from (x, y, size, response) rows."""
    a = np.array(rows, dtype=float)
    return Keypoints(a[:, :2], a[:, 2], a[:, 3], np.zeros(len(a), dtype=np.int64))


def test_point_and_count_modes():
    kp = kps((5, 5, 4, 2.0), (20, 5, 4, 3.0), (21, 6, 4, 1.0))
    m = keypoint_mass(kp, (2, 2), 16, mode="point", weight="response").reshape(2, 2)
    np.testing.assert_allclose(m, [[2, 4], [0, 0]])
    c = keypoint_mass(kp, (2, 2), 16, mode="count").reshape(2, 2)
    np.testing.assert_allclose(c, [[1, 2], [0, 0]])
    u = keypoint_mass(kp, (2, 2), 16, mode="point", weight="unit").reshape(2, 2)
    np.testing.assert_allclose(u, c)


def test_footprint_disc_inside_one_patch():
    m = keypoint_mass(kps((8, 8, 16, 1.0)), (2, 2), 16, weight="unit").reshape(2, 2)
    np.testing.assert_allclose(m, [[1, 0], [0, 0]], atol=1e-9)


def test_footprint_symmetric_splits():
    corner = keypoint_mass(kps((16, 16, 10, 1.0)), (2, 2), 16, weight="unit")
    np.testing.assert_allclose(corner, [0.25] * 4, atol=1e-9)
    edge = keypoint_mass(kps((16, 8, 10, 1.0)), (2, 2), 16, weight="unit").reshape(2, 2)
    np.testing.assert_allclose(edge, [[0.5, 0.5], [0, 0]], atol=1e-9)


def test_footprint_known_areas():
    # disc r=10 centred in the middle patch of a 3x3 grid (p=16): four circular segments at d=8 spill over
    r, d = 10.0, 8.0
    seg = r**2 * math.acos(d / r) - d * math.sqrt(r**2 - d**2)
    frac_seg = seg / (math.pi * r**2)
    m = keypoint_mass(kps((24, 24, 2 * r, 1.0)), (3, 3), 16, weight="unit").reshape(3, 3)
    expect = np.zeros((3, 3))
    expect[1, 1] = 1 - 4 * frac_seg
    expect[0, 1] = expect[2, 1] = expect[1, 0] = expect[1, 2] = frac_seg
    np.testing.assert_allclose(m, expect, rtol=0, atol=1e-12)  # exact areas: rounding only


def test_footprint_clipped_at_border_keeps_weight():
    m = keypoint_mass(kps((0.0, 8, 12, 3.0)), (1, 2), 16, weight="response")
    assert m.sum() == pytest.approx(3.0)
    assert m[0] == pytest.approx(3.0)


def test_concentration_and_empty_map():
    assert concentration(np.zeros(4)) is None
    np.testing.assert_allclose(concentration(np.array([1.0, 3.0, 0, 0])), [0.25, 0.75, 0, 0])


def test_groups_equal_count_bins():
    mass = np.array([0, 5, 0, 1, 2, 3, 4, 6, 0])
    g = concentration_groups(mass, groups=4)
    assert (g[mass == 0] == 0).all()
    # 6 non-zero patches -> 2 per bin, by rank: (1,2) low, (3,4) mid, (5,6) high
    np.testing.assert_array_equal(g[[3, 4, 5, 6, 1, 7]], [1, 1, 2, 2, 3, 3])
    assert (concentration_groups(np.zeros(5)) == 0).all()


def test_sift_keypoint_lands_in_the_right_patch():
    img = np.zeros((64, 64), np.uint8)
    cv2.circle(img, (40, 24), 5, 255, -1)  # blob centred on pixel (x=40, y=24)
    kp = detect_sift(img)
    assert len(kp) > 0
    best = kp.xy[np.argmax(kp.response)]
    assert abs(best[0] - 40.5) < 1.5 and abs(best[1] - 24.5) < 1.5  # pixel centres at +0.5
    m = keypoint_mass(kp, (4, 4), 16, mode="point").reshape(4, 4)
    assert np.unravel_index(m.argmax(), m.shape) == (1, 2)


def test_random_keypoints_keep_count_sizes():
    kp = kps((1, 2, 3, 0.5), (4, 5, 6, 0.7))
    rk = random_keypoints_like(kp, (32, 48), np.random.default_rng(0))
    assert len(rk) == 2
    np.testing.assert_array_equal(rk.size, kp.size)
    assert (rk.xy[:, 0] < 48).all() and (rk.xy[:, 1] < 32).all()


def test_sparsity_matched_keeps_top_k():
    np.testing.assert_array_equal(sparsity_matched(np.array([0.1, 0.5, 0.3, 0.2]), 2), [0, 0.5, 0.3, 0])


def test_compute_maps_all_baselines_and_no_keypoints():
    rng = np.random.default_rng(0)
    textured = (rng.random((64, 96)) * 255).astype(np.uint8)
    textured = cv2.GaussianBlur(textured, (5, 5), 1.5)
    cfg = MapConfig()
    maps = compute_maps(textured, (4, 6), 16, cfg, seed=1)
    assert list(maps.maps) == list(cfg.map_names)
    for name, c in maps.maps.items():
        assert c is not None and c.shape == (24,), name
        assert c.sum() == pytest.approx(1.0)
    k = int((maps.sift_mass > 0).sum())
    assert int((maps.maps["edges_sparse"] > 0).sum()) <= k
    # deterministic for the same seed
    again = compute_maps(textured, (4, 6), 16, cfg, seed=1)
    np.testing.assert_array_equal(maps.maps["random_kp"], again.maps["random_kp"])

    flat = np.full((64, 96), 128, np.uint8)
    fm = compute_maps(flat, (4, 6), 16, cfg)
    assert len(fm.keypoints) == 0 and fm.maps["sift"] is None and fm.maps["random_kp"] is None
    assert fm.maps["uniform"] is not None and fm.maps["center"] is not None


def test_map_config_validates():
    with pytest.raises(ValueError, match="map mode"):
        MapConfig(mode="blob")
    with pytest.raises(ValueError, match="baseline"):
        MapConfig(baselines=("edges", "nope"))


def test_keypoint_cache_gives_identical_maps(tmp_path, monkeypatch):
    from siftlens import semantic_maps
    from siftlens.semantic_maps import KeypointCache

    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur((rng.random((64, 64)) * 255).astype(np.uint8), (5, 5), 1.5)
    cache = KeypointCache(tmp_path / "kp")
    first = compute_maps(img, (4, 4), 16, MapConfig(), seed=0, cache=cache)
    assert len(list((tmp_path / "kp").rglob("*.npz"))) == 2  # SIFT and ORB
    monkeypatch.setattr(semantic_maps, "detect_sift", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = compute_maps(img, (4, 4), 16, MapConfig(), seed=0, cache=cache)
    for name in first.maps:
        np.testing.assert_array_equal(first.maps[name], again.maps[name])
    # other parameters -> another key, not a stale hit
    with pytest.raises(AssertionError, match="recomputed"):
        compute_maps(img, (4, 4), 16, MapConfig(sift=semantic_maps.SiftParams(contrast_threshold=0.03)), cache=cache)
