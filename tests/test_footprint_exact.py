"""The footprint map's disc areas are exact (docs/CHOICES.md, "Footprint").

The reference integrates each patch's area independently of the closed form: scipy's adaptive
quadrature of the vertical chord's overlap with the patch's rows, with the chord ends' kinks passed
as break points (absolute error < 1e-12 of r^2). Tolerance: 1e-9 of a keypoint's weight per patch.
"""

import math

import numpy as np
import pytest
from scipy.integrate import quad

from siftlens.semantic_maps import Keypoints, concentration_groups, keypoint_mass

TOL = 1e-9


def kps(*rows):
    """Keypoints from (x, y, size, response) rows."""
    a = np.array(rows, dtype=float)
    return Keypoints(a[:, :2], a[:, 2], a[:, 3], np.zeros(len(a), dtype=np.int64))


def disc_area_in_rect(cx, cy, r, x0, x1, y0, y1):
    """Area of the disc (cx, cy, r) inside [x0, x1] x [y0, y1], by quadrature over x."""
    a, b = max(x0, cx - r), min(x1, cx + r)
    if b <= a:
        return 0.0

    def chord_in_rows(x):
        half = math.sqrt(max(r * r - (x - cx) ** 2, 0.0))
        return max(min(cy + half, y1) - max(cy - half, y0), 0.0)

    kinks = [cx + sgn * math.sqrt(r * r - (y - cy) ** 2) for y in (y0, y1) if abs(y - cy) < r for sgn in (-1, 1)]
    kinks = [k for k in kinks if a < k < b]
    return quad(chord_in_rows, a, b, points=kinks or None, epsabs=1e-13, epsrel=1e-13, limit=200)[0]


def reference_mass(kp, grid, patch, weight="response"):
    """Each keypoint's weight split over patches by disc area inside the image, renormalised."""
    h, w = grid
    out = np.zeros((h, w))
    for (cx, cy), size, resp in zip(kp.xy, kp.size, kp.response):
        r = size / 2
        area = np.array([[disc_area_in_rect(cx, cy, r, j * patch, (j + 1) * patch, i * patch, (i + 1) * patch)
                          for j in range(w)] for i in range(h)])
        if area.sum() > 0:
            out += area / area.sum() * (resp if weight == "response" else 1.0)
    return out.ravel()


# (x, y, size, response) on a 3 x 5 grid of 16 px patches (48 px high, 80 px wide); every case is asymmetric
CASES = {
    "straddles a corner": [(16.3, 31.1, 15.8, 1.7)],
    "straddles a corner, big": [(47.2, 15.4, 29.0, 0.4)],
    "out left": [(-3.1, 20.2, 14.0, 2.0)],
    "out right": [(81.7, 9.3, 11.0, 0.9)],
    "out top": [(37.5, -2.2, 13.0, 1.1)],
    "out bottom": [(60.4, 49.9, 17.5, 0.6)],
    "out at a corner": [(-2.0, 50.5, 20.0, 1.3)],
    "tiny inside one patch": [(70.2, 25.9, 0.6, 3.0)],
    "larger than the image, off centre": [(10.0, 40.0, 150.0, 0.8)],
    "mixed, different weights": [(16.3, 31.1, 15.8, 1.7), (81.7, 9.3, 11.0, 0.9), (70.2, 25.9, 0.6, 3.0),
                                 (29.9, 8.1, 40.0, 0.05), (0.5, 0.5, 3.0, 2.5)],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("weight", ["response", "unit"])
def test_footprint_matches_quadrature(name, weight):
    kp = kps(*CASES[name])
    got = keypoint_mass(kp, (3, 5), 16, weight=weight)
    want = reference_mass(kp, (3, 5), 16, weight)
    scale = kp.response.sum() if weight == "response" else len(kp)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * scale)
    assert got.sum() == pytest.approx(scale, rel=1e-12)  # every keypoint keeps its whole weight


def test_footprint_orientation_on_a_non_square_grid():
    # the disc spills a lot to the right and a little downward: a swap of rows and columns moves mass
    kp = kps((14.0, 13.0, 10.0, 1.0))
    m = keypoint_mass(kp, (2, 3), 16, weight="unit").reshape(2, 3)
    np.testing.assert_allclose(m.ravel(), reference_mass(kp, (2, 3), 16, "unit"), rtol=0, atol=TOL)
    assert m[0, 1] > m[1, 0] > 0 and m[1, 1] > 0 and m[:, 2].sum() == 0


def test_footprint_renormalises_area_outside_the_image():
    # a quarter of the disc lies outside on the left: the inside three quarters carry the full weight
    kp = kps((0.0, 24.0, 16.0, 2.0))
    m = keypoint_mass(kp, (3, 5), 16).reshape(3, 5)
    assert m.sum() == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(m[1, 0], 2.0, rtol=1e-12)


def test_footprint_disc_covering_the_image_is_uniform():
    m = keypoint_mass(kps((40.0, 24.0, 500.0, 1.5)), (3, 5), 16)
    np.testing.assert_allclose(m, np.full(15, 1.5 / 15), rtol=1e-9)


def test_footprint_exact_zero_where_the_disc_misses():
    # Discs up and left of the corner (16, 16), further than r from it: the bounding box reaches the
    # bottom-right patch, the disc does not, and that patch must hold exactly 0 (concentration_groups puts
    # zero-mass patches in a group of their own). The four-corner CDF difference there is ~1e-16 in some
    # of these positions, not 0; every position on a 0.1 px grid is tried, so that any leak shows.
    tried = 0
    for r in (3.0, 5.0, 7.5, 10.0):
        for dx in np.arange(1, round(10 * r)) / 10:
            for dy in np.arange(1, round(10 * r)) / 10:
                if dx * dx + dy * dy <= r * r:
                    continue
                m = keypoint_mass(kps((16 - dx, 16 - dy, 2 * r, 1.0)), (2, 2), 16, weight="unit")
                assert m[3] == 0.0 and (m[:3] > 0).all(), (r, dx, dy, m)
                tried += 1
    assert tried > 1000
    assert (concentration_groups(m) == 0).sum() == 1


def test_footprint_drops_keypoints_wholly_outside_and_ignores_samples():
    inside = (20.0, 20.0, 6.0, 1.0)
    outside = (-30.0, 20.0, 6.0, 5.0)
    m = keypoint_mass(kps(inside, outside), (3, 5), 16)
    np.testing.assert_array_equal(m, keypoint_mass(kps(inside), (3, 5), 16))
    np.testing.assert_array_equal(m, keypoint_mass(kps(inside, outside), (3, 5), 16, samples=4))
    assert keypoint_mass(kps(outside), (3, 5), 16).sum() == 0


def test_footprint_random_keypoints_against_quadrature():
    rng = np.random.default_rng(7)
    n = 40
    rows = np.column_stack([rng.uniform(-8, 88, n), rng.uniform(-8, 56, n), rng.uniform(0.5, 45, n),
                            rng.uniform(0.1, 2.0, n)])
    kp = kps(*rows)
    got = keypoint_mass(kp, (3, 5), 16)
    np.testing.assert_allclose(got, reference_mass(kp, (3, 5), 16), rtol=0, atol=TOL * kp.response.sum())
