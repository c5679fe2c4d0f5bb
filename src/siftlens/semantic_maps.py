"""SIFT semantic maps (METHOD.md §1) and the baseline maps they are compared with (§3).

Everything here works on one image: the exact model input, un-normalised to 8-bit grey, and the
patch grid (h, w, p). A *map* is the per-patch concentration c (length n = h*w, sums to 1), or
None when the image gives it no mass (e.g. SIFT finds no keypoint).

Coordinates: OpenCV puts pixel i's centre at i, so pixel i spans [i - 0.5, i + 0.5]. We shift by
+0.5 so that patch j spans [j*p, (j+1)*p) exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .io import atomic_write_npz

MAP_MODES = ("point", "footprint", "count")
BASELINE_NAMES = ("random_kp", "edges", "edges_sparse", "orb", "center", "uniform")


@dataclass(frozen=True)
class SiftParams:
    """OpenCV SIFT parameters (cv2.SIFT_create)."""

    nfeatures: int = 0
    n_octave_layers: int = 3
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6


@dataclass(frozen=True)
class MapConfig:
    """How semantic maps are built; every choice METHOD.md leaves open is a field here."""

    mode: str = "footprint"  # point | footprint | count
    weight: str = "response"  # response | unit
    groups: int = 4  # G: group 0 = zero mass, 1..G-1 = equal-count bins of the rest
    sift: SiftParams = field(default_factory=SiftParams)
    baselines: tuple[str, ...] = BASELINE_NAMES
    center_sigma: float = 0.25  # centred Gaussian prior, sigma as a fraction of image side
    orb_nfeatures: int = 500

    def __post_init__(self) -> None:
        if self.mode not in MAP_MODES:
            raise ValueError(f"map mode {self.mode!r} is not one of {MAP_MODES}")
        if self.weight not in ("response", "unit"):
            raise ValueError(f"keypoint weight {self.weight!r} is not 'response' or 'unit'")
        if self.groups < 2:
            raise ValueError(f"groups must be >= 2 (got {self.groups})")
        unknown = set(self.baselines) - set(BASELINE_NAMES)
        if unknown:
            raise ValueError(f"unknown baseline maps {sorted(unknown)}; known: {BASELINE_NAMES}")

    @property
    def map_names(self) -> tuple[str, ...]:
        return ("sift",) + tuple(self.baselines)


@dataclass
class Keypoints:
    """Keypoints in input-pixel coordinates (patch j spans [j*p, (j+1)*p))."""

    xy: np.ndarray  # [K, 2] float
    size: np.ndarray  # [K] diameter in pixels
    response: np.ndarray  # [K]
    octave: np.ndarray  # [K] int

    def __len__(self) -> int:
        return len(self.size)

    @classmethod
    def from_cv(cls, kps: list) -> Keypoints:
        if not kps:
            return cls(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
        return cls(
            xy=np.array([k.pt for k in kps], dtype=np.float64) + 0.5,
            size=np.array([k.size for k in kps], dtype=np.float64),
            response=np.array([k.response for k in kps], dtype=np.float64),
            octave=np.array([k.octave for k in kps], dtype=np.int64),
        )


def detect_sift(gray: np.ndarray, params: SiftParams = SiftParams()) -> Keypoints:
    """OpenCV SIFT on an 8-bit grey image."""
    sift = cv2.SIFT_create(
        nfeatures=params.nfeatures, nOctaveLayers=params.n_octave_layers,
        contrastThreshold=params.contrast_threshold, edgeThreshold=params.edge_threshold,
        sigma=params.sigma,
    )
    return Keypoints.from_cv(sift.detect(gray, None))


def detect_orb(gray: np.ndarray, nfeatures: int = 500) -> Keypoints:
    """ORB (oriented FAST) keypoints: a non-SIFT detector as a control."""
    orb = cv2.ORB_create(nfeatures=nfeatures, edgeThreshold=8, patchSize=15)
    return Keypoints.from_cv(orb.detect(gray, None))


def keypoint_mass(kp: Keypoints, grid: tuple[int, int], patch: int, mode: str = "footprint",
                  weight: str = "response", samples: int = 32) -> np.ndarray:
    """Semantic mass per patch, [h*w] (row-major), for keypoints on an image of h*p x w*p pixels.

    footprint: keypoint k's weight is spread over its disc of diameter size_k in proportion to
    the disc area inside each patch (area outside the image is dropped and the rest renormalised).
    The areas are exact (closed form of disc ∩ rectangle, rounding error only). ``samples`` is
    ignored: it set the number of chords of the numerical integration this replaced, and is still
    accepted so that existing callers keep working.
    """
    h, w = grid
    mass = np.zeros((h, w))
    if len(kp) == 0:
        return mass.ravel()
    wk = kp.response.copy() if (weight == "response" and mode != "count") else np.ones(len(kp))
    if mode in ("point", "count"):
        col = np.clip((kp.xy[:, 0] // patch).astype(int), 0, w - 1)
        row = np.clip((kp.xy[:, 1] // patch).astype(int), 0, h - 1)
        np.add.at(mass, (row, col), wk)
        return mass.ravel()
    if mode != "footprint":
        raise ValueError(f"map mode {mode!r} is not one of {MAP_MODES}")
    share, flat_index = _footprint_shares(kp.xy[:, 0], kp.xy[:, 1], np.maximum(kp.size / 2, 1e-6), wk, grid, patch)
    return np.bincount(flat_index, weights=share, minlength=h * w)


# Patch areas below this (in units of r^2; the disc is pi) are rounding noise of the four-corner difference
# (|noise| < 1e-14): they are set to 0, so that a patch the disc misses or only grazes (by < ~1e-8 r) holds
# exactly nothing, as concentration_groups puts zero-mass patches in a group of their own. The same noise is
# the error of every area: ~1e-15 (r/p)^2 of a patch's area (1e-13 for SIFT discs of up to 10 patches; 4e-5
# for a disc of diameter 1e7 px on 16 px patches; beyond r = 1e6 p whole patches would fall below this).
_AREA_EPS = 1e-12


def _chord_integral(t: np.ndarray) -> np.ndarray:
    """S(t) = integral from 0 to t of s(x) = sqrt(1 - x^2), the unit disc's half chord: (t s(t) + asin t) / 2."""
    return 0.5 * (t * np.sqrt(np.maximum(1.0 - t * t, 0.0)) + np.arcsin(t))


def _bbox_patches(centre: np.ndarray, r: np.ndarray, patch: int, n_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """First patch and number of patches (0 when none) of each disc's bounding box along one axis, cut to
    the image: area outside it is dropped, and a huge disc costs no more than the image's patches."""
    first = np.clip(np.floor((centre - r) / patch), 0, n_patches).astype(np.int64)
    last = np.clip(np.floor((centre + r) / patch), -1, n_patches - 1).astype(np.int64)
    return first, np.maximum(last - first + 1, 0)


def _bbox_edges(first: np.ndarray, count: np.ndarray, centre: np.ndarray, r: np.ndarray, patch: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Ragged list of the count + 1 patch edges of each keypoint's bounding box along one axis, in units of r
    from the centre and clipped to [-1, 1]; and where each keypoint's edges start in it."""
    n_edges = count + 1
    start = np.cumsum(n_edges) - n_edges
    k = np.repeat(np.arange(len(first)), n_edges)
    edge = (first[k] + np.arange(len(k)) - start[k]) * patch
    return np.clip((edge - centre[k]) / r[k], -1.0, 1.0), start


def _footprint_shares(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, wk: np.ndarray, grid: tuple[int, int],
                      patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Mass shares and flat patch indices of every (keypoint, patch) pair with disc area inside the image.

    A patch's area is the 2-D difference at its four corners of the disc's CDF, F(u, v) = area of the disc
    with x < u and y < v (exact, below). Each keypoint only touches its own bounding box of patches, cut to
    the image (most SIFT discs reach 1-2 columns and rows, the largest 5+), so the corners are a ragged list
    built with np.repeat, not a [K, max span] array.

    F in units of r from the centre (area in units of r^2): with s(t) = sqrt(1 - t^2) and S(t) its integral
    from 0, the chord at x = t has length min(max(v + s(t), 0), 2 s(t)) below y = v. That is v + s(t) where
    |t| < c = s(v) (the line y = v cuts the chord), and 2 s(t) if v >= 0 else 0 elsewhere. Over [-1, u] the
    cut part is [-c, q], q = clip(u, -c, c); S is odd and S(1) = pi/4, so
        F = v (q + c) + S(q) + S(c) + [v >= 0] * 2 (S(u) + pi/4 - S(q) - S(c)).
    The terms in v alone and u alone are computed once per bounding-box edge, not per corner.
    """
    h, w = grid
    n = len(cx)
    col0, ncol = _bbox_patches(cx, r, patch, w)
    row0, nrow = _bbox_patches(cy, r, patch, h)
    u, u_start = _bbox_edges(col0, ncol, cx, r, patch)
    v, v_start = _bbox_edges(row0, nrow, cy, r, patch)
    twice_su = 2.0 * _chord_integral(u)
    c = np.sqrt(np.maximum(1.0 - v * v, 0.0))
    below = v >= 0  # the whole chords left of the cut count (v >= 0) or not
    s_c = _chord_integral(c)
    in_v = v * c + s_c + np.where(below, np.pi / 2 - 2.0 * s_c, 0.0)
    sign_sq = np.where(below, -1.0, 1.0)  # S(q) enters with +1, and -2 more when v >= 0

    # Corners: (ncol + 1) x (nrow + 1) per keypoint, corner (i, j) at flat position corner_start + i * stride + j
    stride = nrow + 1
    n_corner = (ncol + 1) * stride
    corner_start = np.cumsum(n_corner) - n_corner
    k = np.repeat(np.arange(n), n_corner)
    i, j = np.divmod(np.arange(len(k)) - corner_start[k], stride[k])
    ui, vj = u_start[k] + i, v_start[k] + j
    cv = c[vj]
    q = np.minimum(np.maximum(u[ui], -cv), cv)
    cdf = v[vj] * q + sign_sq[vj] * _chord_integral(q) + in_v[vj] + below[vj] * twice_su[ui]

    # Patch (i, j) = column col0 + i, row row0 + j has its top-left corner at corner (i, j)
    tl = np.flatnonzero((i < ncol[k]) & (j < nrow[k]))
    k, i, j = k[tl], i[tl], j[tl]
    tr = tl + stride[k]  # the next column's corner
    area = (cdf[tr + 1] - cdf[tr]) - (cdf[tl + 1] - cdf[tl])
    hit = area > _AREA_EPS
    k, area = k[hit], area[hit]
    total = np.bincount(k, weights=area, minlength=n)  # [K] disc area inside the image
    share = area * (wk[k] / total[k])  # total[k] > 0 for every pair left
    return share, (row0[k] + j[hit]) * w + col0[k] + i[hit]


def concentration(mass: np.ndarray) -> np.ndarray | None:
    """c_j = m_j / sum(m); None when the image has no mass (never divide by zero)."""
    total = float(mass.sum())
    if not np.isfinite(total) or total <= 0:
        return None
    return mass / total


def concentration_groups(mass: np.ndarray, groups: int = 4) -> np.ndarray:
    """Group per patch: 0 = zero mass, 1..G-1 = equal-count bins of non-zero patches by mass rank."""
    out = np.zeros(mass.shape, dtype=np.int64)
    nz = np.flatnonzero(mass > 0)
    if len(nz) == 0:
        return out
    order = nz[np.argsort(mass[nz], kind="stable")]  # ascending mass
    rank = np.arange(len(order))
    out[order] = 1 + (rank * (groups - 1)) // len(order)
    return out


def edge_density(gray: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Mean Sobel gradient magnitude per patch, [h*w]."""
    g = gray.astype(np.float32)
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
    return patch_mean(mag, grid, patch)


def patch_mean(img: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    h, w = grid
    return img[: h * patch, : w * patch].reshape(h, patch, w, patch).mean(axis=(1, 3)).ravel()


def center_prior(grid: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """Centred Gaussian over patch centres, sigma as a fraction of each image side."""
    h, w = grid
    yy = (np.arange(h) + 0.5) / h - 0.5
    xx = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(yy[:, None] ** 2 + xx[None, :] ** 2) / (2 * sigma**2)).ravel()


def random_keypoints_like(kp: Keypoints, image_hw: tuple[int, int], rng: np.random.Generator) -> Keypoints:
    """Same count, sizes and responses as ``kp``, positions uniform over the image."""
    H, W = image_hw
    xy = rng.uniform(0, 1, size=(len(kp), 2)) * np.array([W, H])
    return Keypoints(xy=xy, size=kp.size.copy(), response=kp.response.copy(), octave=kp.octave.copy())


def sparsity_matched(values: np.ndarray, k: int) -> np.ndarray:
    """Keep ``values`` on its k largest patches only (k = patches SIFT gives mass to)."""
    out = np.zeros_like(values)
    if k > 0:
        top = np.argsort(-values, kind="stable")[:k]
        out[top] = values[top]
    return out


class KeypointCache:
    """On-disk keypoints keyed by the exact grey input and detector parameters (safe to share, atomic).
    ``write=False``: read what is there, store nothing new."""

    def __init__(self, root: str | Path, write: bool = True) -> None:
        self.root = Path(root)
        self.write = write
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, gray: np.ndarray, detector: str, params) -> Path:
        h = hashlib.sha256(gray.tobytes())
        h.update(f"{gray.shape}|{detector}|{params!r}".encode())
        key = h.hexdigest()
        return self.root / key[:2] / f"{key}.npz"

    def get(self, gray: np.ndarray, detector: str, params) -> Keypoints | None:
        """The cached keypoints, or None (absent or damaged: a damaged entry is recomputed and overwritten)."""
        path = self._path(gray, detector, params)
        if path.is_file():
            try:
                with np.load(path) as z:
                    return Keypoints(z["xy"], z["size"], z["response"], z["octave"])
            except (OSError, ValueError, KeyError):
                pass
        return None

    def put(self, gray: np.ndarray, detector: str, params, kp: Keypoints) -> None:
        if not self.write:
            return
        path = self._path(gray, detector, params)
        path.parent.mkdir(exist_ok=True)
        atomic_write_npz(path, compress=False, xy=kp.xy, size=kp.size, response=kp.response, octave=kp.octave)

    def get_or_detect(self, gray: np.ndarray, detector: str, params, detect) -> Keypoints:
        kp = self.get(gray, detector, params)
        if kp is None:
            kp = detect()
            self.put(gray, detector, params, kp)
        return kp


@dataclass
class ImageMaps:
    """All maps of one image. ``maps[name]`` is c (sums to 1) or None where undefined."""

    maps: dict[str, np.ndarray | None]
    groups: np.ndarray  # [n] SIFT concentration group per patch
    keypoints: Keypoints
    sift_mass: np.ndarray  # [n]


# baselines built from the SIFT keypoints (random_kp: their count and sizes; edges_sparse: how many patches they cover)
SIFT_DEPENDENT_BASELINES = ("random_kp", "edges_sparse")


def _check_input(gray: np.ndarray, grid: tuple[int, int], patch: int) -> None:
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected an 8-bit grey image, got dtype {gray.dtype} shape {gray.shape}")
    h, w = grid
    if gray.shape[0] < h * patch or gray.shape[1] < w * patch:
        raise ValueError(f"image {gray.shape} smaller than grid {grid} x patch {patch}")


def keypoint_free_maps(gray: np.ndarray, grid: tuple[int, int], patch: int, cfg: MapConfig,
               cache: KeypointCache | None = None) -> tuple[dict[str, np.ndarray | None], np.ndarray | None]:
    """The baseline maps that do not depend on the SIFT keypoints, and the per-patch edge density
    (None when neither edge map is asked for) that ``keypoint_maps`` needs for ``edges_sparse``."""
    _check_input(gray, grid, patch)
    h, w = grid
    edges = edge_density(gray, grid, patch) if {"edges", "edges_sparse"} & set(cfg.baselines) else None
    maps: dict[str, np.ndarray | None] = {}
    for name in cfg.baselines:
        if name == "edges":
            maps[name] = concentration(edges)
        elif name == "orb":
            okp = (cache.get_or_detect(gray, "orb", cfg.orb_nfeatures, lambda: detect_orb(gray, cfg.orb_nfeatures))
                   if cache is not None else detect_orb(gray, cfg.orb_nfeatures))
            maps[name] = concentration(keypoint_mass(okp, grid, patch, cfg.mode, cfg.weight))
        elif name == "center":
            maps[name] = concentration(center_prior(grid, cfg.center_sigma))
        elif name == "uniform":
            maps[name] = np.full(h * w, 1.0 / (h * w))
    return maps, edges


def keypoint_maps(kp: Keypoints, grid: tuple[int, int], patch: int, cfg: MapConfig, seed: int = 0,
                  edges: np.ndarray | None = None) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
    """The SIFT map and the baselines built from the SIFT keypoints (``SIFT_DEPENDENT_BASELINES``), for
    keypoints from any detector; returns (maps, SIFT mass per patch). ``edges``: ``edge_density`` of
    the image, needed for ``edges_sparse``."""
    h, w = grid
    mass = keypoint_mass(kp, grid, patch, cfg.mode, cfg.weight)
    maps: dict[str, np.ndarray | None] = {"sift": concentration(mass)}
    rng = np.random.default_rng(seed)
    for name in cfg.baselines:
        if name == "random_kp":
            rk = random_keypoints_like(kp, (h * patch, w * patch), rng)
            maps[name] = concentration(keypoint_mass(rk, grid, patch, cfg.mode, cfg.weight))
        elif name == "edges_sparse":
            if edges is None:
                raise ValueError("edges_sparse needs the image's edge density (edges=)")
            maps[name] = concentration(sparsity_matched(edges, int((mass > 0).sum())))
    return maps, mass


def assemble_maps(kp: Keypoints, mass: np.ndarray, kp_maps: dict, other_maps: dict, cfg: MapConfig) -> ImageMaps:
    """``ImageMaps`` from the two halves, maps in ``cfg.map_names`` order."""
    both = {**other_maps, **kp_maps}
    return ImageMaps(maps={name: both[name] for name in cfg.map_names}, groups=concentration_groups(mass, cfg.groups),
                     keypoints=kp, sift_mass=mass)


def compute_maps(gray: np.ndarray, grid: tuple[int, int], patch: int, cfg: MapConfig,
                 seed: int = 0, cache: KeypointCache | None = None, keypoints: Keypoints | None = None) -> ImageMaps:
    """SIFT map and every baseline map for one 8-bit grey model input (keypoints from ``cache`` if given).

    ``keypoints``: SIFT keypoints found elsewhere (e.g. ``keypoints_kornia.detect_sift_kornia``) to use
    instead of OpenCV's; every map that depends on them (``sift``, ``random_kp``, ``edges_sparse``) uses them.
    """
    _check_input(gray, grid, patch)
    if keypoints is None:
        keypoints = (cache.get_or_detect(gray, "sift", cfg.sift, lambda: detect_sift(gray, cfg.sift))
                     if cache is not None else detect_sift(gray, cfg.sift))
    other, edges = keypoint_free_maps(gray, grid, patch, cfg, cache)
    kp_maps, mass = keypoint_maps(keypoints, grid, patch, cfg, seed, edges)
    return assemble_maps(keypoints, mass, kp_maps, other, cfg)
