"""SIFT keypoints for a batch of images on any torch device (GPU included), with kornia.

Optional: ``pip install "siftlens[gpu]"``. ``detect_sift_kornia`` is a batched, device-agnostic twin
of ``semantic_maps.detect_sift`` (OpenCV). It runs kornia's scale-space detector
(``kornia.feature.ScaleSpaceDetector``) set up like OpenCV's SIFT:

- ``ScalePyramid``: ``n_octave_layers`` levels per octave (+3), base sigma 1.6, input doubled first
  with half-pixel-centred bilinear resampling like OpenCV's ``cv2.resize`` (kornia's own doubling
  aligns corners; measured: 7 points less repeatability, docs/CHOICES.md);
- ``BlobDoG`` response, minima and maxima both;
- ``ConvQuadInterp3d`` sub-pixel / sub-scale refinement, wrapped by ``_OpenCVKeypointFilter``, which adds what
  kornia's detector does not have: OpenCV's preliminary threshold, non-convergence rejection, 5 px
  border, contrast threshold and edge (Hessian ratio) rejection, with ``SiftParams``' values;
- one keypoint per orientation-histogram peak >= 80% of the highest, as OpenCV's ``detect`` returns
  (same place and size, ~15% of OpenCV's keypoints are such copies): the 36-bin histogram of
  ``calcOrientationHist`` is computed for every keypoint on the octave's Gaussian image.

Output: ``Keypoints`` like OpenCV's: ``xy`` in input-pixel coordinates where pixel i spans [i, i+1),
``size`` the diameter like ``KeyPoint.size`` (= 2 sigma, see SIZE_FACTOR), ``response`` = |D(x̂)| in
OpenCV's units (image in [0, 1]), ``octave`` = OpenCV's octave index (-1 = the doubled image) in the
low byte and the DoG layer in the next, as OpenCV packs it (without OpenCV's sub-layer bits).

Positions are geometric: OpenCV's doubling puts doubled pixel v at input v/2 - 0.25 but reports v/2,
so OpenCV's keypoints sit 0.25 px right of and below the same kornia keypoints (measured: -0.25 px
mean offset kornia - OpenCV). Measured agreement with OpenCV: benchmarks/RESULTS.md; choices and
their measured effect: docs/CHOICES.md. Tested with kornia 0.9.0 on the CPU only (no GPU was available).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .semantic_maps import Keypoints, SiftParams

try:
    import kornia
    from kornia.feature import BlobDoG, ScaleSpaceDetector, get_laf_center, get_laf_scale
    from kornia.filters import gaussian_blur2d
    from kornia.geometry import ScalePyramid
    from kornia.geometry.subpix import ConvQuadInterp3d
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('--keypoint-detector kornia needs kornia >= 0.9: pip install "siftlens[gpu]"') from e

KORNIA_VERSION = kornia.__version__
if tuple(int(v) for v in KORNIA_VERSION.split(".")[:2] if v.isdigit()) < (0, 9):  # pragma: no cover
    # 0.9 changed what this module relies on: the octave-to-image map (aligned corners), the bilinear octave
    # resampling, the sub-pixel module contract and ConvQuadInterp3d's iterative refinement
    raise ImportError(f'--keypoint-detector kornia needs kornia >= 0.9 (found {KORNIA_VERSION}): '
                      'pip install "siftlens[gpu]"')

SIFT_IMG_BORDER = 5  # OpenCV: extrema closer than this to an octave's border are dropped
SIFT_MAX_SHIFT = 0.5  # OpenCV moves to the next voxel when an offset exceeds 0.5 (kornia's default is 0.6)
# Diameter = SIZE_FACTOR · sigma (sigma = refined detection scale in input pixels). OpenCV's KeyPoint.size is
# 2 · sigma by construction (sift.simd.hpp: size = sigma · 2^((layer + x_s) / nOctaveLayers) · 2^octave · 2).
# Measured on 200 Imagenette val images at 128 px (benchmarks/bench_keypoint_detectors.py): matched keypoints
# have geometric-mean size ratio OpenCV / kornia = 1.0004 (5-95%: 0.989-1.007), so no empirical correction.
SIZE_FACTOR = 2.0
# kornia drops a keypoint whose frame (mr_size · sigma) comes within 5 octave pixels of the border; OpenCV tests
# the centre only. A tiny frame makes kornia's test OpenCV's; sigma is read back as LAF scale / MR_SIZE.
MR_SIZE = 1e-3
ORI_BINS, ORI_SIG_FCTR, ORI_RADIUS, ORI_PEAK_RATIO = 36, 1.5, 4.5, 0.8  # OpenCV's calcOrientationHist


class _OpenCVKeypointFilter(nn.Module):
    """Sub-pixel module for ScaleSpaceDetector: kornia's ConvQuadInterp3d + the tests of OpenCV's SIFT.

    Gets one octave's signed response [B, 1, D, H, W] (the detector calls it on DoG and on -DoG for
    the minima) and returns (coords [B, 1, 3, D, H, W], values [B, 1, D, H, W]): values are the
    refined |D| at the extrema OpenCV would keep and 0 everywhere else, so that the detector's top-k
    and candidate logic only ever returns those.
    """

    def __init__(self, n_levels: int, contrast_threshold: float, edge_threshold: float) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.contrast_threshold = contrast_threshold
        self.edge_threshold = edge_threshold
        # OpenCV: floor(0.5 * contrastThreshold / nOctaveLayers * 255 * SIFT_FIXPT_SCALE) on the 0..255 image
        self.prelim = math.floor(0.5 * contrast_threshold / n_levels * 255) / 255
        self.refine = ConvQuadInterp3d(n_iters=5, max_subpixel_shift=SIFT_MAX_SHIFT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, D, H, W = x.shape
        b = SIFT_IMG_BORDER
        # OpenCV's candidates: above the preliminary threshold and >= all 26 neighbours (not strict)
        cand = (x > self.prelim) & (x >= _max3x3x3(x))
        inner = torch.zeros(D, H, W, dtype=torch.bool, device=x.device)
        inner[1: D - 1, b: H - b, b: W - b] = True
        cand &= inner
        coords, values = self.refine(x, precomputed_nms_mask=cand)
        out = torch.zeros_like(x)
        idx = cand.nonzero(as_tuple=True)  # (b, c, level, y, x) of every candidate
        if idx[0].numel() == 0:
            return coords, out
        c = coords.permute(0, 1, 3, 4, 5, 2)[idx]  # [N, 3] refined (level, x, y)
        v = values[idx].abs()
        lvl, xi, yi = c[:, 0].round().long(), c[:, 1].round().long(), c[:, 2].round().long()
        ok = (lvl >= 1) & (lvl <= D - 2) & (xi >= b) & (xi < W - b) & (yi >= b) & (yi < H - b)
        ok &= torch.isfinite(c).all(1) & torch.isfinite(v)
        # kornia keeps a candidate it could not refine (no convergence in n_iters, singular fit) at its grid
        # coordinates; OpenCV drops it
        grid = torch.stack([idx[2], idx[4], idx[3]], 1).to(c.dtype)
        ok &= ~(c == grid).all(1)
        ok &= v * self.n_levels >= self.contrast_threshold
        # edges: OpenCV's Hessian ratio test at the refined integer voxel (clamped for a valid gather)
        lvl, xi, yi = lvl.clamp(1, D - 2), xi.clamp(1, W - 2), yi.clamp(1, H - 2)
        flat = x.reshape(-1)
        base = (idx[0] * C + idx[1]) * (D * H * W) + lvl * (H * W)

        def at(dy: int, dx: int) -> torch.Tensor:
            return flat[base + (yi + dy) * W + (xi + dx)]

        v0 = at(0, 0)
        dxx = at(0, 1) + at(0, -1) - 2 * v0
        dyy = at(1, 0) + at(-1, 0) - 2 * v0
        dxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
        tr, det = dxx + dyy, dxx * dyy - dxy * dxy
        r = self.edge_threshold
        ok &= (det > 0) & (tr * tr * r < (r + 1) ** 2 * det)
        keep = tuple(i[ok] for i in idx)
        out[keep] = v[ok].to(out.dtype)
        return coords, out


def _max3x3x3(x: torch.Tensor) -> torch.Tensor:
    """Max over each voxel's 3x3x3 neighbourhood of [B, C, D, H, W] (separable; max_pool3d is slow on CPU)."""
    for dim in (2, 3, 4):
        p = F.pad(x, [0, 0] * (4 - dim) + [1, 1], value=float("-inf"))
        n = x.shape[dim]
        x = torch.maximum(torch.maximum(p.narrow(dim, 0, n), p.narrow(dim, 1, n)), p.narrow(dim, 2, n))
    return x


class _OpenCVScalePyramid(ScalePyramid):
    """kornia's ScalePyramid, doubling the input like OpenCV (``cv2.resize`` INTER_LINEAR: doubled pixel v
    samples input v/2 - 0.25); keeps its last output for the orientation histograms."""

    def get_first_level(self, input: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        x = F.interpolate(input, scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.init_sigma <= 1.0:  # OpenCV assumes blur 0.5 in the input, 1.0 after doubling
            return x, 1.0, 0.5
        sigma = math.sqrt(self.init_sigma**2 - 1.0)
        k = min(self.get_kernel_size(sigma), min(x.shape[-2:]) // 2 * 2 - 1)
        return gaussian_blur2d(x, (k, k), (sigma, sigma)), self.init_sigma, 0.5

    def forward(self, x: torch.Tensor):
        self.last = super().forward(x)
        return self.last


def build_detector(params: SiftParams = SiftParams(), num_features: int = 2048) -> ScaleSpaceDetector:
    """kornia's ScaleSpaceDetector set up like OpenCV's SIFT (see the module docstring)."""
    return ScaleSpaceDetector(
        num_features=num_features, mr_size=MR_SIZE,
        # min_size 10: octaves down to 11-20 px, the smallest where OpenCV's 5 px border leaves room
        scale_pyr_module=_OpenCVScalePyramid(params.n_octave_layers, params.sigma, 10, double_image=True),
        resp_module=BlobDoG(),
        subpix_module=_OpenCVKeypointFilter(params.n_octave_layers, params.contrast_threshold, params.edge_threshold),
        minima_are_also_good=True, scale_space_response=True,
    )


def _orientation_peaks(levels: torch.Tensor, b: torch.Tensor, layer: torch.Tensor, cx: torch.Tensor,
                       cy: torch.Tensor, sigma: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Number of orientations OpenCV's SIFT gives each keypoint of one octave.

    levels: the octave's Gaussian images [B, 1, L, H, W]; per keypoint: image b, layer, integer
    centre (cx, cy) and sigma in octave pixels. OpenCV's calcOrientationHist: gradients by central
    differences in a (2r+1)² window, r = round(4.5 sigma), Gaussian weight sigma_w = 1.5 sigma,
    36 bins, smoothed with [1 4 6 4 1]/16; a keypoint per bin that is a local maximum and >= 0.8 max.
    """
    _, _, _, H, W = levels.shape
    img = levels[:, 0]
    radius = torch.round(ORI_RADIUS * sigma).long()
    R = int(radius.max()) if len(radius) else 0
    off = torch.arange(-R, R + 1, device=levels.device)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    oy, ox = oy.reshape(-1), ox.reshape(-1)
    counts = []
    for s in range(0, len(b), chunk):
        sl = slice(s, s + chunk)
        y, x = cy[sl, None] + oy, cx[sl, None] + ox  # [K, P]
        inside = (y > 0) & (y < H - 1) & (x > 0) & (x < W - 1)
        inside &= (oy.abs() <= radius[sl, None]) & (ox.abs() <= radius[sl, None])
        yc, xc = y.clamp(1, H - 2), x.clamp(1, W - 2)
        base = (b[sl, None] * img.shape[1] + layer[sl, None]) * (H * W)
        flat = img.reshape(-1)
        dx = flat[base + yc * W + xc + 1] - flat[base + yc * W + xc - 1]
        dy = flat[base + (yc - 1) * W + xc] - flat[base + (yc + 1) * W + xc]
        w = torch.exp(-(oy**2 + ox**2)[None].float() / (2 * (ORI_SIG_FCTR * sigma[sl, None]) ** 2))
        mag = torch.sqrt(dx * dx + dy * dy) * w * inside
        ang = torch.rad2deg(torch.atan2(dy, dx)) % 360.0
        bins = torch.round(ang * (ORI_BINS / 360.0)).long() % ORI_BINS
        hist = torch.zeros(len(y), ORI_BINS, device=levels.device, dtype=mag.dtype).scatter_add_(1, bins, mag)
        t = hist  # OpenCV's circular [1 4 6 4 1] / 16 smoothing; roll(t, 1)[i] = t[i - 1]
        hist = (t.roll(2, 1) + t.roll(-2, 1)) / 16 + (t.roll(1, 1) + t.roll(-1, 1)) * 4 / 16 + t * 6 / 16
        peak = (hist > torch.roll(hist, 1, 1)) & (hist > torch.roll(hist, -1, 1))
        peak &= hist >= ORI_PEAK_RATIO * hist.max(1, keepdim=True).values
        counts.append(peak.sum(1))
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=levels.device)


def detect_sift_kornia(gray: torch.Tensor, params: SiftParams = SiftParams(), num_features: int | None = None,
                       orientations: bool = True, chunk: int | None = None) -> list[Keypoints]:
    """SIFT keypoints of grey images [B, 1, H, W] (float in [0, 1], any device), one ``Keypoints`` per image.

    ``num_features``: the detector's slots per image (default 2048, doubled until no image fills
    them, so that every keypoint that passes OpenCV's tests is returned; ``params.nfeatures > 0``
    then keeps the strongest, like OpenCV). ``orientations``: repeat a keypoint once per extra
    orientation peak, as OpenCV does. ``chunk``: images per detector call (bounds memory; default 64
    at 224 px and below, fewer for larger images: ~4 Mpixel per call, a few GB of device memory).
    """
    if gray.ndim != 4 or gray.shape[1] != 1:
        raise ValueError(f"expected grey images [B, 1, H, W], got shape {tuple(gray.shape)}")
    if not gray.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1], got dtype {gray.dtype}")
    if min(gray.shape[-2:]) < 2 * SIFT_IMG_BORDER + 1:
        return [_empty() for _ in range(gray.shape[0])]
    chunk = chunk or max(1, min(64, (1 << 22) // (gray.shape[-2] * gray.shape[-1])))
    out: list[Keypoints] = []
    with torch.no_grad():
        for s in range(0, gray.shape[0], chunk):
            out += _detect_chunk(gray[s: s + chunk].float(), params, num_features, orientations)
    return out


def _empty() -> Keypoints:
    return Keypoints(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))


def _detect_chunk(x: torch.Tensor, params: SiftParams, num_features: int | None,
                  orientations: bool) -> list[Keypoints]:
    B, _, H, W = x.shape
    n = params.n_octave_layers
    k = num_features or 2048
    while True:
        det = build_detector(params, k).to(x.device)
        lafs, resp = det(x)
        keep = resp * n >= params.contrast_threshold  # also drops the empty slots (response 0)
        if num_features is not None or int(keep.sum(1).max()) < k:
            break
        k *= 2
    pyr = det.scale_pyr.last[0]
    img_i, slot = keep.nonzero(as_tuple=True)
    p = get_laf_center(lafs)[img_i, slot].double()  # [N, 2] kornia's input coordinates (pixel centres at integers)
    laf_scale = get_laf_scale(lafs)[img_i, slot, 0, 0].double() / MR_SIZE
    response = resp[img_i, slot].double()
    # kornia maps octave pixel u to the input as u (W - 1) / (W_o - 1) (aligned corners). The octave's own sigma
    # is laf_scale / that factor; its octave is the one where the refined level rounds into 1..n
    # (sigma = sigma0 · 2^(level / n) in octave pixels; the ranges of two octaves do not overlap).
    sizes = torch.tensor([[(W - 1) / (o.shape[-1] - 1), (H - 1) / (o.shape[-2] - 1)] for o in pyr],
                         dtype=torch.float64, device=p.device)  # [O, 2] input pixels per octave pixel (kornia)
    level = n * torch.log2(laf_scale[:, None] / sizes.prod(1).sqrt()[None] / max(params.sigma, 1.0))  # [N, O]
    in_range = (level.round() >= 1) & (level.round() <= n)
    octave = torch.where(in_range.any(1), in_range.float().argmax(1), level.sub((n + 1) / 2).abs().argmin(1))
    layer = level.gather(1, octave[:, None])[:, 0].round().long().clamp(1, n)
    # The composed map is p = v (W - 1) / (2W - 1) in every octave, v = position in the doubled image, whose
    # pixel v samples input v/2 - 0.25 (OpenCV's doubling); so input = p · c - 0.25, c = (2W - 1) / (2 (W - 1)).
    c = torch.tensor([(2 * W - 1) / (2 * (W - 1)), (2 * H - 1) / (2 * (H - 1))], dtype=torch.float64,
                     device=p.device)
    xy = p * c - 0.25 + 0.5  # + 0.5: pixel i spans [i, i + 1)
    sigma_in = laf_scale * c.prod().sqrt()  # detection sigma in input pixels
    copies = torch.ones(len(img_i), dtype=torch.long, device=p.device)
    if orientations:
        for o, levels in enumerate(pyr):
            m = octave == o
            if not m.any():
                continue
            u = p[m] / sizes[o]  # octave pixel coordinates
            sig_oct = laf_scale[m] / sizes[o].prod().sqrt()
            copies[m] = _orientation_peaks(levels.float(), img_i[m], layer[m], u[:, 0].round().long(),
                                           u[:, 1].round().long(), sig_oct.float())
    packed = ((octave - 1) & 0xFF) | (layer << 8)  # OpenCV's octave field: octave (-1 = doubled) | layer << 8
    cols = [t.cpu().numpy() for t in (img_i, xy, SIZE_FACTOR * sigma_in, response, packed, copies)]
    img_np, xy_np, size_np, resp_np, oct_np, copies_np = cols
    out = []
    for i in range(B):
        m = np.flatnonzero(img_np == i)
        m = np.repeat(m, copies_np[m])
        if params.nfeatures > 0 and len(m) > params.nfeatures:  # OpenCV keeps the strongest (copies included)
            m = m[np.argsort(-resp_np[m], kind="stable")[: params.nfeatures]]
        out.append(Keypoints(xy=xy_np[m], size=size_np[m], response=resp_np[m], octave=oct_np[m].astype(np.int64)))
    return out


def repeatability(ref: Keypoints, other: Keypoints, radius: float = 2.0,
                  size_ratio: tuple[float, float] = (0.5, 2.0)) -> np.ndarray:
    """Per keypoint of ``ref``: does ``other`` have a keypoint within ``radius`` px whose size / ref's size
    lies in ``size_ratio``? (Boolean [len(ref)]; the agreement measure of benchmarks/RESULTS.md.)"""
    from scipy.spatial import cKDTree

    if len(ref) == 0 or len(other) == 0:
        return np.zeros(len(ref), dtype=bool)
    hits = cKDTree(other.xy).query_ball_point(ref.xy, radius)
    lo, hi = size_ratio
    return np.array([any(lo <= other.size[j] / ref.size[i] <= hi for j in h) for i, h in enumerate(hits)], dtype=bool)


def gray_from_model_input(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Model inputs [B, 3, H, W] -> grey [B, 1, H, W] in [0, 1] on x's device, quantised to 8 bits like
    ``Preprocess.to_uint8_gray`` (ITU-R 601 weights), so that both detectors see the same image."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    rgb = (x.float() * s + m).clamp(0.0, 1.0)
    g = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    return torch.floor(g * 255.0 + 0.5) / 255.0
