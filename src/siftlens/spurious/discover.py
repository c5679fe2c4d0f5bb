"""Shortcut discovery (METHOD.md §4): keypoint motifs under the decisive attention, per class.

1. For every image: the decisive attention, the CLS row over patches (mean over the chosen layers,
   all by default, and heads; or attention rollout),
   keeping the keypoints under the highest attention (patch lift >= 2 or a top-2 patch),
   SIFT keypoints with descriptors (RootSIFT + window colour + absolute orientation, see
   ``sift_with_descriptors``), the SIFT concentration groups.
2. Descriptors of all images are clustered into visual words (k-means, seeded).
3. Per class and word: attention lift (mean n·a_j of the patches its keypoints sit in; 1 = uniform),
   class specificity (frequent in this class, rare elsewhere) and position stability (a fixed
   position is suspicious). score = lift × specificity × (0.5 + 0.5 · stability).
4. Per image, a reliance score: the share of decisive attention on the predicted class's top motif
   patches or on background (no / low concentration) patches, against the image's high-concentration
   patches. High = the prediction may rest on a shortcut or on background.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from scipy.cluster.vq import kmeans2, vq

from ..argtypes import check_ranges, discovery_option_types
from ..capture import AttentionCapture
from ..io import atomic_write_npz
from ..label_map import LabelMap
from ..layers import resolve_layers
from ..models import LoadedModel
from ..resume import Part, RunParts
from ..semantic_maps import Keypoints, concentration_groups, keypoint_mass
from ..validation import NonFiniteError, UserValueError, check_finite_output
from .cast import cast_check, class_casts, image_colours
from .causal import (
    DENSE_COLOURS,
    CausalConfig,
    CausalResult,
    ShortcutSet,
    causal_discovery,
    effect_floor,
    entropy,
    kl_divergence,
    margin_gains,
    sample_images,
    together_gains,
)
from .placed_cast import class_cast_maps, image_cells, placed_cast_check, placed_cast_unit
from .source import as_source

DECISIVE = ("mean", "rollout")


@dataclass
class DiscoveryConfig:
    # attention layers whose CLS row is "decisive": all, because a small cue's information often reaches the
    # CLS token in early/middle layers while the late CLS rows look elsewhere (planted benchmark, seed 0)
    layers: str | list[int] = "all"
    decisive: str = "mean"  # mean CLS row over ``layers``, or "rollout" up to the last of them
    # 256 since held-out round 51 (64 before): with the dense words below, the suite's options of every held-out round
    # since round 6 became the defaults (RESULTS.md, round 51)
    n_words: int = 256
    top_motifs: int = 1  # motifs per class used for reliance and token masks
    # a top motif whose keypoints sit in the same token in >= this share of its class's images is a
    # fixed-position shortcut: the masker masks that token in every image, even where SIFT misses it
    fixed_share: float = 0.5
    min_lift: float = 2.0  # keypoints "under the highest attention": patch attention >= min_lift x uniform
    top_patches: int = 2  # ... or in one of the image's top-k attended patches
    min_class_frequency: float = 0.05  # a motif must appear in at least this share of the class's images
    max_fit_descriptors: int = 20000
    batch_size: int = 64
    seed: int = 0
    groups: int = 4
    n_null: int = 200  # label permutations for each motif's p-value (0: none)
    colour_weight: float = 1.0  # motif descriptor = RootSIFT + colour + orientation (see sift_with_descriptors)
    orientation_weight: float = 0.5  # 0 and 0: plain RootSIFT words
    # visual words are fit on the descriptors of "all" keypoints (the causal ranking must find cues the CLS
    # does not attend to) or only on the "attended" ones (the attention-only discovery of earlier versions)
    word_keypoints: str = "all"
    # dense words (0: none): one descriptor at every token centre as well, clustered into their own vocabulary of
    # this many words. SIFT finds no keypoint near the image border and few on fine texture, so a cue spread over
    # many tokens there (a frame) has no detected word covering it; a dense word does (``dense_descriptors``).
    # 64 since held-out round 51 (0 before): without them a background tint got no claim and a thin frame two classes'
    dense_words: int = 64
    # weight of the RootSIFT part of a dense descriptor (0: the token's colour alone). Held-out round 4
    # (benchmarks/RESULTS.md): with it, a frame of fine oblique stripes fell into words every class shares, while
    # colour-alone words were class-specific there (held-out round 5); colour alone is the default since round 51
    dense_gradient_weight: float = 0.0
    # where a dense descriptor's colour is read (DENSE_COLOURS): "mean", the token's mean colour; "border_strip",
    # for a token on the image border the mean colour of its outer quarter (the pixels nearest the border), where a
    # frame thinner than a token fills the strip but moves the token's mean little (dev diagnosis, RESULTS.md);
    # "both" (the default since held-out round 43), every token by its mean and each border token also by its strip
    # (two rows: a unit is found at a token where either reading holds its word), so that a strip colour no longer
    # replaces a watermark's mean: a new 5/8-token frame 85% -> 106% of the oracle's headroom, RWR flag 0.73 ->
    # 0.89, a new text unchanged, random weights claimed nothing (docs/CHOICES.md)
    dense_colour: str = "both"
    causal: CausalConfig | None = field(default_factory=CausalConfig)  # None: attention ranking only

    def __post_init__(self) -> None:
        if self.word_keypoints not in ("all", "attended"):
            raise ValueError(f"word_keypoints {self.word_keypoints!r} is not 'all' or 'attended'")
        if self.decisive not in DECISIVE:
            raise UserValueError(f"--decisive {self.decisive!r} is not one of {DECISIVE}")
        if self.dense_colour not in DENSE_COLOURS:
            raise UserValueError(f"--dense-colour {self.dense_colour!r} is not one of {', '.join(DENSE_COLOURS)}")
        if self.dense_words and not (self.colour_weight > 0 or self.dense_gradient_weight > 0):
            raise UserValueError(f"--dense-words {self.dense_words}: dense descriptors need --colour-weight > 0 or "
                                 "--dense-gradient-weight > 0 (both are 0: every token would look the same)")
        types = discovery_option_types()  # the ranges `siftlens spurious` checks at parse time, for library callers
        check_ranges({name: getattr(self, name) for name in types}, types)


def select_layers(num_layers: int, layers: str | list[int]) -> list[int]:
    """The shared rule (``siftlens.layers.resolve_layers``); kept under this name for callers."""
    if layers == "none":
        raise UserValueError("discovery needs at least one attention layer (--layers none selects none)")
    return resolve_layers(layers, num_layers)


def descriptor_dim(colour_weight: float, orientation_weight: float) -> int:
    """Width of a motif descriptor: RootSIFT 128, + 3 colour dimensions, + 2 orientation dimensions."""
    return 128 + (3 if colour_weight > 0 else 0) + (2 if orientation_weight > 0 else 0)


def sift_with_descriptors(gray: np.ndarray, rgb: np.ndarray | None = None, colour_weight: float = 0.0,
                          orientation_weight: float = 0.0) -> tuple[Keypoints, np.ndarray]:
    """SIFT keypoints (+0.5 pixel-centre shift, as semantic_maps) and motif descriptors [K, D].

    D = 128 (RootSIFT) plus, when the weights are > 0, 3 colour dimensions (mean opponent colour
    O1, O2, O3 in [-1, 1] over the keypoint's square window, times ``colour_weight``; needs ``rgb``
    uint8 [H, W, 3]) and 2 orientation dimensions (cos 2θ, sin 2θ of the keypoint's absolute
    orientation, times ``orientation_weight``). Why: SIFT is computed on grey and normalised for
    rotation, so it cannot tell a yellow/blue pattern from a white/black one, or horizontal stripes
    from diagonal ones, and planted or real shortcuts (watermarks, coloured tags, stripes) often
    differ exactly there. RootSIFT has unit L2 norm, so weight 1 gives colour a comparable say.
    """
    kps, desc = cv2.SIFT_create().detectAndCompute(gray, None)
    if desc is None or not kps:
        return Keypoints.from_cv([]), np.zeros((0, descriptor_dim(colour_weight, orientation_weight)), np.float32)
    desc = desc / np.maximum(desc.sum(1, keepdims=True), 1e-7)
    parts = [np.sqrt(desc)]
    if colour_weight > 0:
        if rgb is None:
            raise ValueError("colour_weight > 0 needs the RGB image")
        parts.append(colour_weight * _window_opponent_colour(rgb, kps))
    if orientation_weight > 0:
        theta = np.deg2rad([k.angle for k in kps]) * 2  # doubled: a pattern and its 180° turn count as one
        parts.append(orientation_weight * np.stack([np.cos(theta), np.sin(theta)], 1))
    return Keypoints.from_cv(kps), np.concatenate(parts, 1).astype(np.float32)


def opponent_colour(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float64 [H, W, 3] opponent colour (O1 = R - G, O2 = (R + G - 2B) / 2,
    O3 = (R + G + B) / 1.5 - 1, each in [-1, 1])."""
    c = rgb.astype(np.float64) / 255.0
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    return np.stack([(r - g), (r + g - 2 * b) / 2, (r + g + b) / 1.5 - 1], -1)


def _window_opponent_colour(rgb: np.ndarray, kps) -> np.ndarray:
    """Mean opponent colour (O1 = (R-G)/√2, O2 = (R+G-2B)/√6, O3 = (R+G+B)/√3, scaled to [-1, 1]) over
    each keypoint's square window of half side max(2, size/2), from an integral image: [K, 3].

    The window holds the pixels whose centres lie in [centre - half, centre + half) (OpenCV's pixel-centre
    convention: pixel i's centre is at i), so a token's window is exactly its pixels. (Truncating the corners
    instead shifted a window by up to one pixel up-left: a token in the last column read a column of its left
    neighbour and missed its own outermost one.)"""
    H, W = rgb.shape[:2]
    integral = cv2.integral(opponent_colour(rgb))  # [H+1, W+1, 3]
    out = np.zeros((len(kps), 3))

    def span(centre: float, half: float, size: int) -> tuple[int, int]:  # [first, last + 1) pixel, >= 1 pixel
        lo = int(np.clip(np.ceil(centre - half), 0, size - 1))
        return lo, int(np.clip(np.ceil(centre + half), lo + 1, size))

    for i, k in enumerate(kps):
        half = max(2.0, k.size / 2)
        (x0, x1), (y0, y1) = span(k.pt[0], half, W), span(k.pt[1], half, H)
        s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out[i] = s / ((x1 - x0) * (y1 - y0))
    return out


def dense_descriptors(gray: np.ndarray, rgb: np.ndarray | None, grid: tuple[int, int], patch: int,
                      colour_weight: float = 0.0, orientation_weight: float = 0.0, gradient_weight: float = 1.0,
                      colour: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One motif descriptor per token, at its centre: (xy [n, 2] in pixels, pixel-centre convention as
    ``Keypoints``; size [n]; descriptors [n, D], the same layout as ``sift_with_descriptors``), row-major.

    The SIFT descriptor is computed upright (angle 0: a pattern's orientation is part of what it is) at size
    patch / 6, so that its 4 x 4 cells of 1.5 x size pixels span one token; the colour part is the token's mean
    opponent colour; the orientation part is constant (angle 0). Tokens at the border get a descriptor too,
    where SIFT detects nothing. ``gradient_weight`` scales the SIFT part (0: the token's colour alone, with the
    same descriptor layout). ``colour="border_strip"``: a border token's colour is that of its outer quarter
    (``border_strip_colour``); other tokens keep their mean. ``colour="both"``: the n rows by the mean colour,
    then each border token once more (row-major) with its outer quarter's colour: a frame thinner than a token
    fills the strip, a watermark or patch inside the token fills the mean, and neither reading is lost."""
    rows, cols = grid
    centre = lambda i: i * patch + (patch - 1) / 2  # noqa: E731  (OpenCV: pixel i's centre is at i)
    pts = [(centre(c), centre(r)) for r in range(rows) for c in range(cols)]
    kps = [cv2.KeyPoint(float(x), float(y), patch / 6, 0.0) for x, y in pts]
    kept, desc = cv2.SIFT_create().compute(gray, kps)
    if desc is None or len(kept) != len(kps):  # OpenCV keeps every given point; refuse to misalign rows if not
        raise RuntimeError(f"dense SIFT: {0 if desc is None else len(kept)} descriptors for {len(kps)} tokens")
    desc = desc / np.maximum(desc.sum(1, keepdims=True), 1e-7)
    rows_of = np.arange(len(kps))  # the token each descriptor row describes
    if colour == "both":  # the border tokens once more, read by their outer strip
        rows_of = np.concatenate([rows_of, border_tokens(grid)])
    parts = [gradient_weight * np.sqrt(desc[rows_of])]
    if colour_weight > 0:
        if rgb is None:
            raise ValueError("colour_weight > 0 needs the RGB image")
        token_windows = [cv2.KeyPoint(float(x), float(y), float(patch), 0.0) for x, y in pts]
        col = _window_opponent_colour(rgb, token_windows)
        if colour == "border_strip":
            col = border_strip_colour(rgb, grid, patch, col)
        elif colour == "both":
            col = np.concatenate([col, border_strip_colour(rgb, grid, patch, col)[rows_of[len(kps):]]])
        parts.append(colour_weight * col)
    if orientation_weight > 0:
        parts.append(np.tile([orientation_weight, 0.0], (len(rows_of), 1)))  # cos 0, sin 0
    xy = np.asarray(pts, np.float64)[rows_of] + 0.5
    return xy, np.full(len(rows_of), patch / 6, np.float64), np.concatenate(parts, 1).astype(np.float32)


def border_tokens(grid: tuple[int, int]) -> list[int]:
    """The tokens on the image border, row-major (a token index is row * cols + col)."""
    rows, cols = grid
    return [i * cols + j for i in range(rows) for j in range(cols) if i in (0, rows - 1) or j in (0, cols - 1)]


def border_strip_colour(rgb: np.ndarray, grid: tuple[int, int], patch: int, mean: np.ndarray) -> np.ndarray:
    """``mean`` [n, 3] (the tokens' mean opponent colours, row-major) with each border token's replaced by the mean
    opponent colour of its outer strip: the max(1, patch // 4) pixel rows / columns of the token that lie along the
    image border (a corner token: both strips, pixels counted once)."""
    rows, cols = grid
    w = max(1, patch // 4)
    opp = opponent_colour(rgb)
    out = mean.copy()
    for t in border_tokens(grid):
        i, j = divmod(t, cols)
        outer = np.zeros((patch, patch), bool)  # [patch, patch] within the token
        outer[:w] |= i == 0
        outer[-w:] |= i == rows - 1
        outer[:, :w] |= j == 0
        outer[:, -w:] |= j == cols - 1
        out[t] = opp[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch][outer].mean(0)
    return out


def image_descriptors(lm: LoadedModel, x: torch.Tensor, colour_weight: float, orientation_weight: float,
                      dense: bool = False, dense_gradient_weight: float = 1.0, dense_colour: str = "mean"
                      ) -> tuple[np.ndarray, Keypoints, np.ndarray, tuple | None]:
    """The grey image SIFT sees, its keypoints and motif descriptors, for one model input [3, H, W]; with
    ``dense``, also the per-token descriptors (``dense_descriptors``: xy, size, descriptors), else None."""
    gray = lm.preprocess.to_uint8_gray(x)
    rgb = lm.preprocess.to_uint8_rgb(x) if colour_weight > 0 else None
    kp, desc = sift_with_descriptors(gray, rgb, colour_weight, orientation_weight)
    extra = None
    if dense:
        layout = lm.layout(tuple(x.shape[-2:]))
        extra = dense_descriptors(gray, rgb, layout.grid, layout.patch_size, colour_weight, orientation_weight,
                                  dense_gradient_weight, dense_colour)
    return gray, kp, desc, extra


@torch.no_grad()
def decisive_attention(lm: LoadedModel, x: torch.Tensor, layers: list[int], how: str = "mean"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decisive attention over patches [B, n] (sums to 1 per image) and the logits.

    ``how="mean"``: the CLS row averaged over ``layers`` and heads (for a model without a CLS token that
    averages its patch tokens, the mean of the patch rows). ``how="rollout"``: attention
    rollout (Abnar & Zuidema: (A + I)/2 multiplied from the first layer to the last of ``layers``),
    which also credits patches whose information reached the CLS token through other tokens in
    earlier layers, as a small fixed-position cue often does."""
    from ..stats import RolloutState

    if how not in DECISIVE:
        raise ValueError(f"decisive attention {how!r} is not one of {DECISIVE}")
    from ..prompting import patch_pool_input

    layout = lm.layout(tuple(x.shape[-2:]))
    P = layout.num_prefix
    # a model without a CLS token that pools its patch tokens: every patch row reaches the prediction (equally
    # for an average; for an attention pool this is an approximation), so the decisive attention is the patch
    # rows' mean
    if layout.cls_index is None and patch_pool_input(lm) is None:
        raise UserValueError(f"{lm.name}: has no CLS token and does not pool its patch tokens; decisive (CLS) "
                             "attention is undefined")
    rows: list[torch.Tensor] = []
    rollout = RolloutState()

    def keep(idx: int, attn: torch.Tensor) -> None:
        if how == "rollout":
            if idx <= max(layers):
                rollout.update(attn.float())
        elif idx in layers:
            if layout.cls_index is None:
                a = attn[:, :, P:, P:].float()
                rows.append((a / a.sum(-1, keepdim=True)).mean((1, 2)))
            else:
                a = attn[:, :, layout.cls_index, P:].float()
                rows.append((a / a.sum(-1, keepdim=True)).mean(1))

    with AttentionCapture(lm.module, lm.backend, keep):
        logits = lm.forward(x)
    if how == "rollout":
        if layout.cls_index is not None:
            return rollout.cls_map(P, layout.cls_index), logits  # renormalised over patches
        r = rollout.R[:, P:, P:].mean(1)
        return r / r.sum(-1, keepdim=True), logits
    return torch.stack(rows).mean(0), logits


@dataclass
class DiscoveryResult:
    motifs: pd.DataFrame  # one row per (class, word), ranked within class
    per_image: pd.DataFrame  # label, pred, confidence, reliance and its parts
    centroids: np.ndarray  # [n_words, D] visual words, D = descriptor_dim(*descriptor_weights): 128, 131 or 133
    class_names: list[str]
    shortcut_words: dict[int, list[int]]  # class -> its top motif words
    keypoints: pd.DataFrame = field(repr=False)  # every keypoint: image, word, patch, position, lift
    descriptor_weights: tuple[float, float] = (0.0, 0.0)  # (colour, orientation) the words were built with
    fixed_tokens: dict[int, np.ndarray] = field(default_factory=dict)  # class -> bool [h, w] fixed-position cue
    causal: CausalResult | None = None  # causal ranking of candidate units and the SIFT-free control
    shortcuts: ShortcutSet | None = None  # the shortcut units applied to new images (flag, gated prompt)
    layers: list[int] = field(default_factory=list)
    source: object = field(default=None, repr=False)  # where the images are (exemplar crops read them back)
    label_map: LabelMap | None = None  # class k is model output label_map.output_index[k] (None: output k)
    dense_centroids: np.ndarray | None = None  # [dense words, D]: word W >= len(centroids) is dense word W - that
    casts: pd.DataFrame | None = None  # per class: its colour cast and the cast's claim columns (cast.py)
    twin: dict | None = None  # run.random_twin_check of a random-weights twin (spurious --twin random-init)

    def masker(self, lm: LoadedModel, classes: list[int] | None = None) -> ShortcutMasker:
        """token_mask_fn for steering: patches under the top motifs of ``classes`` (default: every class)
        and the tokens where a fixed-position top motif always sits."""
        words = sorted({w for k, ws in self.shortcut_words.items() if classes is None or k in classes for w in ws})
        fixed = [m for k, m in self.fixed_tokens.items() if classes is None or k in classes]
        return ShortcutMasker(lm, self.centroids, words, *self.descriptor_weights,
                              fixed_tokens=np.any(fixed, axis=0) if fixed else None)

    def save_words(self, path: str | Path) -> None:
        words = sorted({w for ws in self.shortcut_words.values() for w in ws})
        fixed = np.any(list(self.fixed_tokens.values()), axis=0) if self.fixed_tokens else np.zeros((0, 0), bool)
        atomic_write_npz(path, compress=False, centroids=self.centroids, words=np.array(words, dtype=np.int64),
                         descriptor_weights=np.array(self.descriptor_weights, dtype=np.float64), fixed_tokens=fixed)


class ShortcutMasker:
    """bool [B, n]: patches holding a keypoint whose descriptor falls in one of the shortcut words, plus
    ``fixed_tokens`` (bool [h, w], resized nearest-neighbour to another grid): where a fixed-position
    shortcut always sits."""

    def __init__(self, lm: LoadedModel, centroids: np.ndarray, words: list[int], colour_weight: float = 0.0,
                 orientation_weight: float = 0.0, fixed_tokens: np.ndarray | None = None) -> None:
        self.lm, self.centroids, self.words = lm, centroids, list(words)
        has_fixed = fixed_tokens is not None and np.size(fixed_tokens) > 0  # saved files store an empty array
        self.fixed_tokens = np.asarray(fixed_tokens, bool) if has_fixed else None
        self.colour_weight, self.orientation_weight = float(colour_weight), float(orientation_weight)
        expected = descriptor_dim(colour_weight, orientation_weight)
        if centroids.ndim != 2 or centroids.shape[1] != expected:
            raise UserValueError(f"shortcut words: centroids of shape {centroids.shape} do not match descriptors "
                                 f"of {expected} dimensions (colour weight {colour_weight}, orientation "
                                 f"{orientation_weight})")

    @classmethod
    def load(cls, lm: LoadedModel, path: str | Path) -> ShortcutMasker:
        try:
            with np.load(path) as z:
                if not {"centroids", "words"} <= set(z.files):
                    raise UserValueError(f"{path}: not a shortcut-words file (needs 'centroids' and 'words'; "
                                         "written by `siftlens spurious` as shortcut_words.npz)")
                weights = z["descriptor_weights"] if "descriptor_weights" in z.files else (0.0, 0.0)  # older files
                fixed = z["fixed_tokens"] if "fixed_tokens" in z.files else None
                centroids, words = z["centroids"], [int(w) for w in z["words"]]
        except UserValueError:
            raise
        except Exception as e:  # truncated zip, pickled arrays (refused), wrong dtypes: a broken file
            raise UserValueError(f"{path}: not a readable shortcut-words file ({type(e).__name__}: {e})") from None
        return cls(lm, centroids, words, *map(float, weights), fixed_tokens=fixed)

    def _fixed_on(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.fixed_tokens is None or not self.fixed_tokens.any():
            return None
        f = torch.from_numpy(self.fixed_tokens)[None, None].float()
        return torch.nn.functional.interpolate(f, size=grid, mode="nearest")[0, 0].flatten() > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.lm.layout(tuple(x.shape[-2:]))
        out = torch.zeros(len(x), layout.num_patches, dtype=torch.bool)
        for b in range(len(x)):
            _, kp, desc, _ = image_descriptors(self.lm, x[b], self.colour_weight, self.orientation_weight)
            if not len(desc):
                continue
            hit = np.isin(vq(desc.astype(np.float64), self.centroids)[0], self.words)
            if hit.any():
                sub = Keypoints(kp.xy[hit], kp.size[hit], np.ones(hit.sum()), kp.octave[hit])
                cover = keypoint_mass(sub, layout.grid, layout.patch_size, "footprint", "unit")
                out[b] = torch.from_numpy(cover > 0.05)  # patches holding >5% of a motif keypoint's disc
        fixed = self._fixed_on(layout.grid)
        return out if fixed is None else out | fixed


def extract(lm: LoadedModel, images, layers: list[int], batch_size: int = 64, groups: int = 4,
            colour_weight: float = 0.0, orientation_weight: float = 0.0, decisive: str = "mean",
            parts: RunParts | None = None, dense: bool = False, dense_gradient_weight: float = 1.0,
            dense_colour: str = "mean") -> tuple[np.ndarray, np.ndarray, pd.DataFrame, DescriptorParts, np.ndarray]:
    """Per image: decisive attention [N, n], class probabilities [N, K], SIFT concentration groups [N, n];
    per keypoint: a table (image, patch, position, size, lift, dense) and its motif descriptors [K, D], left in
    the parts (``DescriptorParts``: read back chunk by chunk). ``dense``: each image's per-token descriptors
    (``dense_descriptors``) follow its keypoints in the table, with ``dense`` True; the concentration groups
    use the detected keypoints only.

    ``images``: model inputs [N, 3, H, W] or a source (``siftlens.spurious.source``), read chunk by chunk
    (the readable files are fixed in the source afterwards). ``parts``: where each chunk's results are kept
    (pass ``extract``), so a killed run resumes and torchrun ranks share the chunks."""
    source = as_source(images)
    parts = parts or RunParts.memory()
    layout = lm.layout(source.input_hw)
    n = layout.num_patches
    device = next(lm.module.parameters()).device
    width = descriptor_dim(colour_weight, orientation_weight)

    def chunk(c: int) -> Part:
        kept, x, skipped = source.read_chunk(c, batch_size)
        meta = {"kept": kept.tolist(), "skipped": skipped}
        if x is None:
            return Part(meta)
        a, logits = decisive_attention(lm, x.to(device), layers, decisive)
        a, logits = a.cpu(), logits.cpu()
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise UserValueError(f"--model {lm.name}: has no classifier head (output shape {tuple(logits.shape)}); "
                                 "discovery needs class logits")
        check_finite_output(logits, lm.name)
        if not np.isfinite(a.numpy()).all():  # NaN attention would rank motifs by NaN (docs/CHOICES.md)
            raise NonFiniteError(f"--model {lm.name}: the decisive attention has NaN or Inf (model weights "
                                 "non-finite or too large?)")
        kp_rows, descs, group_rows = [], [], []
        for b in range(len(x)):
            gray, kp, desc, extra = image_descriptors(lm, x[b], colour_weight, orientation_weight, dense,
                                                      dense_gradient_weight, dense_colour)
            mass = keypoint_mass(kp, layout.grid, layout.patch_size, "footprint", "response")
            group_rows.append(concentration_groups(mass, groups))
            H, W = gray.shape
            rows = [(kp.xy, kp.size, desc, False)] + ([(*extra, True)] if extra is not None else [])
            for xy, size, d, is_dense in rows:  # detected keypoints, then the per-token descriptors
                if not len(xy):
                    continue
                col = np.clip((xy[:, 0] // layout.patch_size).astype(int), 0, layout.grid[1] - 1)
                row = np.clip((xy[:, 1] // layout.patch_size).astype(int), 0, layout.grid[0] - 1)
                patch = row * layout.grid[1] + col
                kp_rows.append(pd.DataFrame({"image": b, "patch": patch, "x": xy[:, 0] / W,  # b: within the chunk
                                             "y": xy[:, 1] / H, "size": size, "lift": n * a[b, patch].numpy(),
                                             "dense": is_dense}))
                descs.append(d)
        return Part(meta, pd.concat(kp_rows, ignore_index=True) if kp_rows else None,
                    {"attn": a.numpy(), "probs": logits.float().softmax(-1).numpy(), "groups": np.stack(group_rows),
                     "desc": np.concatenate(descs) if descs else np.zeros((0, width), np.float32)})

    attn_all, probs_all, kp_rows, group_rows, kept, skipped = [], [], [], [], [], []
    desc_chunks, desc_counts = [], []
    for c, part in enumerate(parts.run("extract", source.n_chunks(batch_size), chunk)):
        skipped += part.meta["skipped"]
        if not part.meta["kept"]:
            continue
        if part.table is not None:  # images numbered among the readable ones, in file order
            kp_rows.append(part.table.assign(image=part.table["image"].to_numpy() + len(kept)))
            desc_chunks.append(c)  # the descriptors stay in the part: one row per row of its table
            desc_counts.append(len(part.table))
        kept += part.meta["kept"]
        attn_all.append(part.arrays["attn"])
        probs_all.append(part.arrays["probs"])
        group_rows.append(part.arrays["groups"])
    source.set_readable(kept, skipped)
    kps = pd.concat(kp_rows, ignore_index=True) if kp_rows else pd.DataFrame(
        columns=["image", "patch", "x", "y", "size", "lift", "dense"])
    kps["dense"] = kps["dense"].astype(bool)
    descriptors = DescriptorParts(parts, desc_chunks, desc_counts, width)  # no keypoint anywhere: empty
    return np.concatenate(attn_all), np.concatenate(probs_all), kps, descriptors, np.concatenate(group_rows)


class DescriptorParts:
    """The motif descriptors of every keypoint ([K, D] float32, row i = row i of the keypoint table), left in the
    ``extract`` pass's parts and read back one chunk at a time: the descriptors of all images are never in
    memory together (at 128 keypoints per image they would cost ~70 KB per image, ~1 KB per keypoint with the
    float64 copies that k-means and word assignment make)."""

    def __init__(self, parts: RunParts, chunks: list[int], counts: list[int], width: int) -> None:
        self.parts, self.chunks, self.width = parts, list(chunks), width
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # first row of each chunk, total
        self.max_rows_read = 0  # the most descriptor rows held at once (tests check it stays one chunk's)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, descriptors) of each chunk, in order."""
        for c, start, stop in zip(self.chunks, self.starts[:-1], self.starts[1:]):
            desc = self.parts.read("extract", c, arrays=("desc",), table=False).arrays["desc"]
            if len(desc) != stop - start:
                raise RuntimeError(f"extract part {c}: {len(desc)} descriptors for {stop - start} keypoints")
            self.max_rows_read = max(self.max_rows_read, len(desc))
            yield int(start), desc

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The descriptors of keypoint ``rows`` (indices into the table, any order), in that order: [len(rows), D]."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.width), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start, desc in self:
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(desc)])
            out[order[lo:hi]] = desc[sorted_rows[lo:hi] - start]
        return out

    def words(self, centroids: np.ndarray, dense: np.ndarray | None = None,
              dense_centroids: np.ndarray | None = None) -> np.ndarray:
        """The nearest visual word of every keypoint (``scipy.cluster.vq.vq``, chunk by chunk: each row's word
        does not depend on the other rows). Rows where ``dense`` (bool, one per row) is True are matched to
        ``dense_centroids`` instead and numbered after ``centroids``' words."""
        out = []
        for start, desc in self:
            w = vq(desc.astype(np.float64), centroids)[0]
            if dense is not None and dense_centroids is not None and len(dense_centroids):
                d = dense[start:start + len(desc)]
                if d.any():
                    w[d] = len(centroids) + vq(desc[d].astype(np.float64), dense_centroids)[0]
            out.append(w)
        return np.concatenate(out) if out else np.zeros(0, np.int32)


def discover_shortcuts(lm: LoadedModel, images, labels: np.ndarray | None = None,
                       class_names: list[str] | None = None, cfg: DiscoveryConfig | None = None,
                       min_per_class: int = 1, parts: RunParts | None = None,
                       label_map: LabelMap | None = None) -> DiscoveryResult:
    """Find shortcut candidates: visual words and the fixed tokens they occupy, ranked per class by their
    causal effect (``cfg.causal``; see ``siftlens.spurious.causal``) and by the attention they get.

    images: normalised model inputs [N, 3, H, W], or a ``PathSource`` (read batch by batch; ``labels``
    then has one entry per file and is narrowed to the readable ones). ``parts``: where the costly passes keep
    their finished batches (``siftlens.resume.RunParts``: resume after a kill, torchrun ranks). ``label_map``:
    which model output each label is (``siftlens.label_map.map_labels``; None: label k is output k); the
    class evidence is the softmax over all outputs read at the label's output."""
    cfg = cfg or DiscoveryConfig()
    from ..capture import ATTENTION_FINDERS

    source = as_source(images)
    layers = select_layers(len(ATTENTION_FINDERS[lm.backend](lm.module)), cfg.layers)
    if labels is not None and len(labels) != source.n_files:
        raise UserValueError(f"labels: {len(labels)} labels for {source.n_files} images")
    attn, probs, kps, descriptors, groups = extract(lm, source, layers, cfg.batch_size, cfg.groups,
                                                 cfg.colour_weight, cfg.orientation_weight, cfg.decisive, parts,
                                                 dense=cfg.dense_words > 0,
                                                 dense_gradient_weight=cfg.dense_gradient_weight,
                                                 dense_colour=cfg.dense_colour)
    if labels is not None and hasattr(source, "kept"):
        labels = np.asarray(labels)[source.kept]  # the readable images
    preds = probs.argmax(1)
    cls_of_image = np.asarray(labels) if labels is not None else preds
    class_names = class_names or [str(k) for k in range(probs.shape[1])]
    label_map = label_map or LabelMap.positional(class_names, probs.shape[1])
    # by name: the run's classes only (a 1000-output head need not be carried); by position, as before
    K = len(class_names) if label_map.by_name else probs.shape[1]
    counts = np.bincount(cls_of_image, minlength=K)
    small = [f"{class_names[k]} ({c})" for k, c in enumerate(counts) if 0 < c < min_per_class]
    if small:
        raise UserValueError(f"classes with fewer than {min_per_class} images: {', '.join(small)}")
    is_dense = kps["dense"].to_numpy()
    if is_dense.all():  # also with no keypoint at all (an empty table)
        raise UserValueError("no SIFT keypoints in any image: nothing to discover")

    top = np.argsort(-attn, axis=1)[:, : cfg.top_patches]
    in_top = (top[kps["image"].to_numpy()] == kps["patch"].to_numpy()[:, None]).any(1)
    kps["attended"] = ((kps["lift"].to_numpy() >= cfg.min_lift) | in_top) & ~is_dense
    if not kps["attended"].any():  # no keypoint under the top attention: describe them all
        kps["attended"] = ~is_dense
    # the attention view describes only keypoints under the decisive attention; the causal view needs
    # words for every keypoint, the ones the CLS never looks at included. The k-means sample (at most
    # max_fit_descriptors, seeded) is drawn by row before any descriptor is read, then gathered from the parts
    eligible = np.flatnonzero(~is_dense) if cfg.word_keypoints == "all" else \
        np.flatnonzero(kps["attended"].to_numpy())
    rng = np.random.default_rng(cfg.seed)
    centroids = _fit_words(descriptors, eligible, cfg.n_words, cfg.max_fit_descriptors, rng, cfg.seed)
    k_words = len(centroids)
    # dense words: their own vocabulary (so the detected keypoints' words are what they are without them),
    # numbered after the detected words
    dense_centroids = (_fit_words(descriptors, np.flatnonzero(is_dense), cfg.dense_words, cfg.max_fit_descriptors,
                                  rng, cfg.seed) if cfg.dense_words > 0 and is_dense.any() else None)
    kps["word"] = descriptors.words(centroids, is_dense, dense_centroids)
    kps["cls"] = cls_of_image[kps["image"].to_numpy()]
    detected = kps[~is_dense]  # the attention view and the legacy masks read the detected keypoints only

    motifs = motif_table(detected[detected["attended"]], cls_of_image, K, k_words, cfg.min_class_frequency,
                         cfg.n_null, cfg.seed)
    if len(motifs):
        motifs["class_name"] = [class_names[k] for k in motifs["cls"]]
    shortcut_words = {k: motifs[motifs["cls"] == k].nsmallest(cfg.top_motifs, "rank")["word"].tolist()
                      if len(motifs) else [] for k in range(K)}
    per_image = _per_image(attn, probs, groups, detected, shortcut_words, cfg.groups, labels, label_map)
    layout = lm.layout(source.input_hw)
    fixed = fixed_position_tokens(detected, cls_of_image, shortcut_words, layout.grid, cfg.fixed_share)
    res = DiscoveryResult(motifs, per_image, centroids, class_names, shortcut_words, kps,
                          (cfg.colour_weight, cfg.orientation_weight), fixed, layers=layers, source=source,
                          label_map=label_map, dense_centroids=dense_centroids)
    if cfg.causal is not None:
        # class k is output label_map.output_index[k] (output k by position); only the labelled classes are ranked
        columns = label_map.columns if label_map.by_name else None
        # the floor the claims use: set on ten-output models, scaled up for fewer outputs (effect_floor)
        causal_cfg = replace(cfg.causal, seed=cfg.seed, batch_size=cfg.batch_size,
                             shortcut_min_effect=effect_floor(cfg.causal.shortcut_min_effect, probs.shape[1]))
        class_probs = probs if columns is None else probs[:, columns]
        res.causal = causal_discovery(lm, source, layers, cls_of_image, class_probs, attn, kps, layout.grid,
                                      layout.patch_size, len(class_names), source.input_hw, causal_cfg, parts,
                                      columns)
        if len(res.causal.units):
            res.causal.units.insert(1, "class", [class_names[k] for k in res.causal.units["cls"]])
        if len(res.causal.control):
            res.causal.control.insert(1, "class", [class_names[k] for k in res.causal.control["cls"]])
        all_words = centroids if dense_centroids is None else np.concatenate([centroids, dense_centroids])
        res.shortcuts = ShortcutSet.select(lm, res.causal, all_words, res.descriptor_weights, class_names, layers,
                                           source.input_hw, causal_cfg, num_outputs=probs.shape[1],
                                           output_index=label_map.output_index,
                                           dense_words=0 if dense_centroids is None else len(dense_centroids),
                                           dense_gradient_weight=cfg.dense_gradient_weight,
                                           dense_colour=cfg.dense_colour)
        # whether flag grows each small unit's removal by its neighbours (causal.MARGIN_MIN_GAIN)
        gains = margin_gains(lm, source, res.shortcuts.units, layers, cls_of_image, class_probs, layout.grid,
                             causal_cfg, parts, columns)
        for u, g in zip(res.shortcuts.units, gains):
            if g is not None:
                u["margin_gain"] = g
        # whether the counterfactual gate also removes every shortcut at once for a class (causal.TOGETHER_MIN_GAIN)
        spread = together_gains(lm, source, res.shortcuts.units, layers, cls_of_image, class_probs,
                                layout.num_patches, causal_cfg, parts, columns)
        for u in res.shortcuts.units:
            if int(u["cls"]) in spread:
                u["together_gain"] = spread[int(u["cls"])]
        if causal_cfg.casts:  # a global colour shortcut has no place: its own unit (cast.py)
            colours, change = image_colours(lm, source, len(cls_of_image), cfg.batch_size, parts,
                                            causal_cfg.cast_removal)
            casts = class_casts(colours, cls_of_image, len(class_names))
            sample = sample_images(cls_of_image, len(class_names), causal_cfg.causal_images, causal_cfg.seed)
            res.casts = cast_check(lm, source, casts, change, sample, cls_of_image[sample], class_probs,
                                   causal_cfg, parts, columns)
            res.casts.insert(1, "class", class_names)
            res.shortcuts.casts = [{"cls": int(r.cls), "class_name": class_names[int(r.cls)],
                                    "cast": [float(r.cast_r), float(r.cast_g), float(r.cast_b)],
                                    "cast_effect": float(r.cast_effect), "cast_sufficiency": float(r.cast_sufficiency)}
                                   for r in res.casts[res.casts["cast_claimed"]].itertuples()]
            res.shortcuts.cast_removal = causal_cfg.cast_removal
            if causal_cfg.placed_casts:  # a colour with a place (a background tint): masked where it sits
                maps = class_cast_maps(image_cells(source, len(cls_of_image), cfg.batch_size, parts), cls_of_image,
                                       len(class_names))
                placed = placed_cast_check(lm, source, maps, sample, cls_of_image[sample], class_probs, causal_cfg,
                                           layout.grid, set(res.casts.loc[res.casts["cast_claimed"], "cls"].tolist()),
                                           parts, columns)
                res.casts = res.casts.merge(placed, on="cls")
                res.shortcuts.units += [placed_cast_unit(r, class_names[int(r.cls)], layout.grid,
                                                             layout.cell(source.input_hw))
                                        for r in placed[placed["place_claimed"]].itertuples()]
    return res


def _fit_words(descriptors: DescriptorParts, rows: np.ndarray, n_words: int, max_fit: int,
               rng: np.random.Generator, seed: int) -> np.ndarray:
    """k-means centroids [<= n_words, D] of the descriptors of ``rows`` (a seeded sample of at most ``max_fit``,
    drawn by row before any descriptor is read, then gathered from the parts)."""
    fit_rows = rows if len(rows) <= max_fit else rows[rng.choice(len(rows), max_fit, replace=False)]
    fit = descriptors.take(fit_rows)
    centroids, _ = kmeans2(fit.astype(np.float64), min(n_words, len(fit)), minit="++", seed=seed)
    return centroids


def fixed_position_tokens(kps: pd.DataFrame, cls_of_image: np.ndarray, shortcut_words: dict[int, list[int]],
                          grid: tuple[int, int], share: float) -> dict[int, np.ndarray]:
    """Per class: bool [h, w], the tokens holding one of the class's shortcut words in at least ``share``
    of the class's images (a cue at a fixed position; natural motifs move and never qualify)."""
    out = {}
    if not 0 < share <= 1:
        return out
    for k, words in shortcut_words.items():
        n_k = int((cls_of_image == k).sum())
        sub = kps[(kps["cls"] == k) & kps["word"].isin(words)]
        if not n_k or sub.empty:
            continue
        occupancy = sub.drop_duplicates(["image", "patch"]).groupby("patch").size() / n_k
        fixed = np.zeros(grid[0] * grid[1], bool)
        fixed[occupancy.index[occupancy.to_numpy() >= share].to_numpy()] = True
        if fixed.any():
            out[k] = fixed.reshape(grid)
    return out


def score_images(lm: LoadedModel, images: torch.Tensor, result: DiscoveryResult,
                 cfg: DiscoveryConfig | None = None, labels: np.ndarray | None = None) -> pd.DataFrame:
    """Reliance (and confidence, entropy) of new images, with the motifs of an earlier discovery."""
    cfg = cfg or DiscoveryConfig()
    from ..capture import ATTENTION_FINDERS

    layers = select_layers(len(ATTENTION_FINDERS[lm.backend](lm.module)), cfg.layers)
    attn, probs, kps, descriptors, groups = extract(lm, images, layers, cfg.batch_size, cfg.groups,
                                                 *result.descriptor_weights, cfg.decisive)  # the words' own
    kps["word"] = descriptors.words(result.centroids) if len(descriptors) else np.zeros(0, int)
    return _per_image(attn, probs, groups, kps, result.shortcut_words, cfg.groups, labels, result.label_map)


@torch.no_grad()
def counterfactual_scores(lm: LoadedModel, images, masker, batch_size: int = 64,
                          layers: str | list[int] = "all", seed: int = 0, parts: RunParts | None = None
                          ) -> pd.DataFrame:
    """Per image, what the prediction rests on: the class probabilities with and without the shortcut
    tokens (their keys masked in ``layers``), and

    - ``shortcut_kl``: KL(p || p_masked), how much removing the shortcut evidence moves the model's belief
      (the flag score: high when the prediction depends on the shortcut rather than on the rest);
    - ``masked_disagreement``: 1 - p_masked(pred), the chance the model would not say the same without it;
    - ``pred_masked``: the prediction without the shortcut tokens;
    - ``random_kl``: the control, KL(p || p_random) with as many random tokens masked (seeded).
    ``n_masked``: tokens masked per image. ``images``: model inputs or a source read batch by batch (its
    readable images, as a first pass fixed them); ``masker``: a ``ShortcutMasker`` or the gated masker of a
    ``ShortcutSet``. ``parts``: where each batch's probabilities are kept (pass ``counterfactual``)."""
    from ..prompting import SteeredViT

    source = as_source(images)
    parts = parts or RunParts.memory()
    device = next(lm.module.parameters()).device
    with (SteeredViT(lm, "mask_tokens", layers=layers, token_mask_fn=masker) as steered,
          # the control only needs the counts of the mask the steered pass has just computed for this batch
          SteeredViT(lm, "random_mask", layers=layers, token_mask_fn=lambda _x: steered.last_mask,
                     seed=seed) as control):
        def batch(c: int) -> Part:
            x = source.get(np.arange(c * batch_size, min((c + 1) * batch_size, len(source)))).to(device)
            # the control's draws restart per batch: a resumed run or another rank draws what one run draws
            control.reset_rng(int(np.random.SeedSequence([seed, c]).generate_state(1)[0]))
            p1 = steered(x).float().softmax(-1).cpu()
            return Part(arrays={"p0": lm.forward(x).float().softmax(-1).cpu().numpy(), "p1": p1.numpy(),
                                "n_masked": steered.last_mask.sum(1).cpu().numpy(),
                                "p2": control(x).float().softmax(-1).cpu().numpy()})

        # each batch's class probabilities are reduced to its rows' scores as it is read back: the [N, K]
        # tables of every image are never in memory together (row-wise numbers, the same as over all rows)
        scores = [_counterfactual_rows(p) for p in parts.run("counterfactual", -(-len(source) // batch_size), batch)]
    return pd.concat(scores, ignore_index=True)


def _counterfactual_rows(part: Part) -> pd.DataFrame:
    P0, P1, P2 = (part.arrays[k].astype(np.float64) for k in ("p0", "p1", "p2"))
    pred = P0.argmax(1)
    rows = np.arange(len(pred))

    def kl(q: np.ndarray) -> np.ndarray:
        return np.maximum(kl_divergence(P0, q), 0.0)

    return pd.DataFrame({"p_pred": P0[rows, pred], "p_pred_masked": P1[rows, pred], "pred_masked": P1.argmax(1),
                         "masked_disagreement": 1 - P1[rows, pred], "shortcut_kl": kl(P1), "random_kl": kl(P2),
                         "n_masked": part.arrays["n_masked"]})


def _per_image(attn, probs, groups, kps, shortcut_words, G, labels, label_map: LabelMap | None = None
               ) -> pd.DataFrame:
    """``pred``: the argmax over all the model's outputs (an output index, ``pred_name`` its name); ``label``:
    the label's output index (``label_map``), so ``pred == label`` is a correct prediction."""
    preds = probs.argmax(1)
    # the shortcut words of class k count where the prediction is class k's output
    pred_cls = preds if label_map is None else label_map.class_of_output()[preds]
    df = reliance_scores(attn, groups, kps, pred_cls, shortcut_words, G)
    df["pred"] = preds
    if label_map is not None:
        df["pred_name"] = [label_map.output_name(int(j)) for j in preds]
    df["confidence"] = probs.max(1)
    df["entropy"] = entropy(probs)
    if labels is not None:
        df["label"] = np.asarray(labels) if label_map is None else label_map.columns[np.asarray(labels)]
    return df


def motif_components(kps: pd.DataFrame, cls_of_image: np.ndarray, K: int, n_words: int
                     ) -> dict[str, np.ndarray]:
    """Per (class, word) [K, W]: f_in, f_out (share of the class's / other images holding the word),
    mean lift, position spread, keypoint count, mean position; and the score
    lift × specificity × (0.5 + 0.5 · stability), specificity = f_in² / (f_in + f_out), stability =
    1 / (1 + spread / 0.1). Vectorised (bincounts), so a label-permutation null is cheap."""
    img, word = kps["image"].to_numpy(), kps["word"].to_numpy()
    N = len(cls_of_image)
    present = np.zeros((N, n_words), bool)
    present[img, word] = True
    onehot = np.eye(K, dtype=np.float64)[cls_of_image]  # [N, K]
    n_k = onehot.sum(0)[:, None]  # [K, 1]
    in_count = onehot.T @ present  # [K, W]
    with np.errstate(invalid="ignore", divide="ignore"):
        f_in = in_count / n_k
        f_out = (present.sum(0)[None] - in_count) / (N - n_k)
    f_in, f_out = np.nan_to_num(f_in), np.nan_to_num(f_out)
    cell = cls_of_image[img] * n_words + word  # (class, word) of every keypoint

    def cell_sum(v: np.ndarray) -> np.ndarray:
        return np.bincount(cell, weights=v, minlength=K * n_words).reshape(K, n_words)

    count = cell_sum(np.ones(len(cell)))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = {c: cell_sum(kps[c].to_numpy(np.float64)) / count for c in ("lift", "x", "y")}
        var = sum(np.maximum(cell_sum(kps[c].to_numpy(np.float64) ** 2) / count - mean[c] ** 2, 0) * count /
                  np.maximum(count - 1, 1) for c in ("x", "y"))  # unbiased, as pandas .var()
        specificity = np.nan_to_num(f_in * f_in / (f_in + f_out))
    spread = np.where(count > 1, np.sqrt(var), 0.5)  # one keypoint: no evidence of a fixed position
    stability = 1.0 / (1.0 + spread / 0.1)
    score = np.nan_to_num(mean["lift"]) * specificity * (0.5 + 0.5 * stability)
    return {"f_in": f_in, "f_out": f_out, "lift": mean["lift"], "count": count, "specificity": specificity,
            "stability": stability, "mean_x": mean["x"], "mean_y": mean["y"], "score": score}


def motif_table(kps: pd.DataFrame, cls_of_image: np.ndarray, K: int, n_words: int,
                min_freq: float, n_null: int = 0, seed: int = 0) -> pd.DataFrame:
    """Score every (class, word): lift × specificity × (0.5 + 0.5 · position stability).

    With ``n_null`` > 0, two controls per motif: ``p_label_null``, the share of label permutations
    (images' classes shuffled, the attention and keypoints kept) in which the class's best motif
    scores at least this high (a max statistic over the class's words, so it already accounts for
    picking the best of W words); and ``lift_lo``/``lift_hi``, a 95% bootstrap CI of the mean lift
    over the class's images (lift 1 = uniform attention is its null)."""
    def kept(c: dict[str, np.ndarray]) -> np.ndarray:  # enough keypoints, frequent enough in the class
        return (c["count"] >= 3) & (c["f_in"] >= min_freq)

    c = motif_components(kps, cls_of_image, K, n_words)
    ks, ws = np.nonzero(kept(c))
    df = pd.DataFrame({"cls": ks, "word": ws, "lift": c["lift"][ks, ws], "f_in": c["f_in"][ks, ws],
                       "f_out": c["f_out"][ks, ws], "specificity": c["specificity"][ks, ws],
                       "stability": c["stability"][ks, ws], "n_keypoints": c["count"][ks, ws].astype(int),
                       "mean_x": c["mean_x"][ks, ws], "mean_y": c["mean_y"][ks, ws], "score": c["score"][ks, ws]})
    if df.empty:
        return df.assign(rank=pd.Series(dtype=int))
    if n_null > 0:
        rng = np.random.default_rng([seed, 11])
        best = np.empty((n_null, K))  # per permutation: each class's best motif score
        for i in range(n_null):
            cp = motif_components(kps, rng.permutation(cls_of_image), K, n_words)
            best[i] = np.where(kept(cp), cp["score"], 0).max(1)
        df["p_label_null"] = (1 + (best[:, df["cls"]] >= df["score"].to_numpy()[None]).sum(0)) / (1 + n_null)
        df[["lift_lo", "lift_hi"]] = _lift_ci(kps, cls_of_image, df, rng)
    df["rank"] = df.groupby("cls")["score"].rank(ascending=False, method="first").astype(int)
    return df.sort_values(["cls", "rank"]).reset_index(drop=True)


def _lift_ci(kps: pd.DataFrame, cls_of_image: np.ndarray, df: pd.DataFrame, rng: np.random.Generator,
             n_boot: int = 1000) -> np.ndarray:
    """95% percentile bootstrap CI (images resampled) of a motif's mean lift in its class: [len(df), 2]."""
    out = np.full((len(df), 2), np.nan)
    kcls = cls_of_image[kps["image"].to_numpy()]
    for i, (k, w) in enumerate(zip(df["cls"], df["word"])):
        sub = kps[(kcls == k) & (kps["word"].to_numpy() == w)]
        per_img = sub.groupby("image")["lift"].agg(["sum", "count"]).to_numpy()  # [m, 2]
        idx = rng.integers(0, len(per_img), size=(n_boot, len(per_img)))
        boot = per_img[idx, 0].sum(1) / per_img[idx, 1].sum(1)  # keypoint-weighted, as the lift itself
        out[i] = np.quantile(boot, [0.025, 0.975])
    return out


def reliance_scores(attn: np.ndarray, groups: np.ndarray, kps: pd.DataFrame, preds: np.ndarray,
                    shortcut_words: dict[int, list[int]], G: int) -> pd.DataFrame:
    """Share of decisive attention on shortcut-motif or background patches vs high-concentration patches."""
    N, n = attn.shape
    shortcut = np.zeros((N, n), bool)
    for k, words in shortcut_words.items():
        hit = kps[kps["word"].isin(words) & (preds[kps["image"].to_numpy()] == k)]
        shortcut[hit["image"].to_numpy(), hit["patch"].to_numpy()] = True
    background = (groups <= 1) & ~shortcut  # no or low SIFT concentration
    semantic = (groups >= G - 1) & ~shortcut  # the image's own high-concentration patches
    m_short = (attn * shortcut).sum(1)
    m_back = (attn * background).sum(1)
    m_sem = (attn * semantic).sum(1)
    n_off = (shortcut | background).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        reliance = (m_short + m_back) / (m_short + m_back + m_sem)
        uniform = n_off / (n_off + semantic.sum(1))  # the score if attention were uniform: its baseline
    return pd.DataFrame({"shortcut_mass": m_short, "background_mass": m_back, "semantic_mass": m_sem,
                         "reliance": np.nan_to_num(reliance, nan=1.0),
                         "reliance_uniform": np.nan_to_num(uniform, nan=1.0)})


def exemplar_crops(images_uint8: np.ndarray, kps: pd.DataFrame, cls: int, word: int, k: int = 6,
                   half: int = 10) -> list[np.ndarray]:
    """Crops around the most attended keypoints of ``word`` in class ``cls`` images."""
    sub = kps[(kps["cls"] == cls) & (kps["word"] == word)].sort_values("lift", ascending=False)
    crops, seen = [], set()
    for r in sub.itertuples():
        if r.image in seen:
            continue
        img = images_uint8[r.image]
        H, W = img.shape[:2]
        cx, cy = int(r.x * W), int(r.y * H)
        pad = np.pad(img, ((half, half), (half, half), (0, 0)), mode="constant")
        crops.append(pad[cy:cy + 2 * half, cx:cx + 2 * half])
        seen.add(r.image)
        if len(crops) == k:
            break
    return crops
