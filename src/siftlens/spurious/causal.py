"""Causal shortcut discovery (METHOD.md §4): rank candidate units by what removing them does to the class evidence.

Candidate units, per class k (from the SIFT keypoints of the discovery images):

- ``word:W``: a visual word (k-means cluster of keypoint descriptors) present in at least
  ``min_class_frequency`` of class k's images. Removing it in image i = masking (as keys, in the chosen
  layers) the tokens its keypoints' footprints cover in that image; an image without the word is untouched.
- ``token:r,c[+r,c...]``: the fixed-position tokens a frequent word occupies: the tokens holding that word's
  keypoint centre in >= ``fixed_share`` of the class's images that contain the word. Removing it = masking
  those tokens in every image, also where SIFT missed the cue. A cue drawn in one of a few places (a watermark
  in one of the corners) also gets a token unit of all its places (``_word_places``), so that it is removed,
  and later looked for, wherever it sits.

Causal effect of unit u for class k: the mean, over a seeded sample of class k's images (``causal_images``
per class), of the drop of p_k when u is removed (0 where u is absent). Controls beside it:

- ``causal_p``: label-permutation null. The sample images' labels are shuffled and every class's effects
  recomputed from the same forwards (each forward gives every class's probability, and every unit is
  removed in the sample images of every class), with a max over the class's candidate units, so the
  p-value already pays for picking the best unit of many. The max is taken within the unit's ``family``
  (``FAMILIES``: keypoint words and their token units; dense words and theirs; region units against all),
  so a vocabulary of dense scene colours does not raise the keypoint units' null; a claim is tested at
  ``family_alpha`` (alpha split between the claimable families the class has).
- ``causal_lo``/``causal_hi``: 95% bootstrap CI over the class's sample images (stability across images);
  ``positive_share``: share of those images where removal lowers p_k by more than 0.01.

The SIFT-free control (``occlusion_control``): every single token masked alone, on as many of the class's
sample images as the SIFT units' forwards on that class allow (same number of forward passes), ranked by
the same mean drop. If the control finds the same place, SIFT added nothing to localising it; the report
says so per class.

Boxes (``box_x0..box_y1`` in [0, 1], x = column / width, y = row / height of the model input): the unit's
evidence tokens (a token unit: its tokens; a word: the smallest set of tokens that carries >= ``evidence_share``
of its effect, each image's drop shared equally by the tokens masked there, which for a fixed cue is the cue's
tokens), cut to their 8-connected group with the most evidence (``main_region``): a cue that sits in one of
several places (corners) is boxed at one of them, not between them. ``box_share`` = the share of the unit's
evidence inside that group.

``ShortcutSet`` holds the per-class shortcut units (per family, the top causal unit with causal_p <=
``family_alpha``, effect >= ``shortcut_min_effect`` and class-specific) with the words and model identity
needed to apply them to new images
(``shortcuts.json``): a unit is *present* in an image when a keypoint of its word lies in the unit's box grown
by one token (token units: a keypoint of one of its gate words has its centre in its tokens); the gated masker
masks only present units.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.cluster.vq import vq

from ..io import atomic_write_json
from ..models import LoadedModel
from ..resume import Part, RunParts
from ..semantic_maps import Keypoints, keypoint_mass
from ..validation import UserValueError
from .cast import CAST_REMOVALS, DEFAULT_CAST_REMOVAL, cast_removal_probs, remove_cast
from .placed_cast import FAMILY as PLACED_FAMILY

GATES = ("presence", "counterfactual")  # how gated steering decides where a shortcut is (ShortcutSet.masker)
# the counterfactual gate's minimum drop: in probability (absolute), as a share of the predicted class's (relative),
# or that share for a unit SIFT finds by its words in the image and in probability for the others
# (relative_where_found), or that share only where the unit is found in its place (relative_in_place: a dense unit's
# words fill its own tokens; CounterfactualMasker)
GATE_DROPS = ("absolute", "relative", "relative_where_found", "relative_in_place")
# prompt's default since held-out round 35: as many steering lines as relative_where_found (15 of 19), cue-free
# images touched 13.8% in total over four runs against 28.5% (the frame's 13.2% -> 3.2%); relative_where_found was
# the default of rounds 33-34 (20 of 26 lines against the absolute drop's 17; benchmarks/RESULTS.md)
DEFAULT_GATE_DROP = "relative_in_place"
# prompt's default: the counterfactual gate reached 90% / 115% of the oracle's headroom on held-out round 7b where
# presence reached 66% / 77% (benchmarks/RESULTS.md)
DEFAULT_GATE = "counterfactual"
# the counterfactual gate's default minimum drop: a removal steers an image only where it changes the prediction and
# lowers the predicted class's probability at least this much (in probability, or as a share of it: GATE_DROPS).
# A cue-free image's prediction (max softmax ~0.4-0.6 on models that learned little but the cue) changes under most
# removals; with 0.5 the gate touched 0-2% of cue-free images instead of 4-24% on held-out round 13b (worst group
# -4..+3 points of headroom; benchmarks/RESULTS.md)
GATE_MIN_DROP = 0.5
FORMAT = "siftlens-shortcuts"
FORMAT_VERSION = 1
# what flag / gated prompt read from shortcuts.json (num_layers / prefix_tokens in "model" are checked when present)
REQUIRED_KEYS = ("model", "class_names", "layers", "centroids", "descriptor_weights", "units")
REQUIRED_MODEL_KEYS = ("input_size", "patch_size", "grid", "num_classes")
REQUIRED_UNIT_KEYS = ("cls", "class_name", "unit", "kind", "word", "tokens", "box")
# the model's outputs on one seeded noise input (shortcuts.json "output_probe"): motifs are refused for a model whose
# outputs there differ by more than this share of their spread (other weights); float noise across devices is ~1e-4
PROBE_RTOL = 1e-2
COVER = 0.05  # a token is covered by a keypoint set when it holds > 5% of one keypoint's footprint disc
# unit families, each with its own label-permutation null (``causal_p``): units of detected keypoints' words,
# units of dense words (``--dense-words``), SIFT-free region units (null: the best of all the class's candidates)
FAMILIES = ("keypoint", "dense", "region")
CLAIMABLE_FAMILIES = ("keypoint", "dense")  # region units have no frequency, so they are never claimed
DENSE_REMOVALS = ("found", "with_discovery_tokens")  # ShortcutSet.dense_removal
# where a fixed-token dense unit (a colour over fixed tokens) is tested by removal (ShortcutSet.dense_token_test):
# only where its words fill its tokens ("where_found", the default), or in every image as a keypoint token unit is
DENSE_TOKEN_TESTS = ("always", "where_found")
# where a dense descriptor's colour is read (DiscoveryConfig.dense_colour, stored in ShortcutSet.dense_colour)
# ("both": every token by its mean and each border token a second time by its outer strip: two readings)
DENSE_COLOURS = ("mean", "border_strip", "both")
DENSE_PRESENCE = 0.5  # a dense-word unit is present in an image where its words sit in >= half of its tokens
DENSE_SET_PRESENCES = ("any", "tokens")  # CausalConfig.dense_set_presence
# ... and in its place where its words fill at least this share of its own (discovery) tokens: a drawn cue fills the
# tokens it was found in, a colour that happens to match it elsewhere (a frame's colours on a natural border) does
# not (dev round 33, three fine-tuned dev frames: every cue-present firing filled 100% of its unit's tokens or none
# of them; cue-free firings 0-83%)
DENSE_IN_PLACE = 0.9
# flag's default ``margin_below``: where it removes a unit, a removal of at most this many tokens takes their 8
# neighbours too. A token unit is where the cue's keypoint centre sits, but a drawn cue (a watermark's letters) runs
# into the tokens around it and the model reads it there (dev round 11: on held-out round 9's text the flag's
# removals held 35% of the cue's tokens, 88% with the margin; right-for-the-wrong-reason AUROC 0.61 -> 0.83). Not
# for steering (prompt): the larger removals there changed more cue-free predictions and cost average accuracy on
# three of four dev runs. Discovery's own removals have none either (its effects and floors are as measured)
REMOVAL_MARGIN_BELOW = 4
# ... but only for a unit whose grown removal lowers its class's probability (mean over the class's sample images)
# by at least this much more than its tokens alone (``margin_gains``, shortcuts.json ``margin_gain``). Why: on a
# 6 x 6 grid a grown token is a quarter of the image; where the cue already sits in the unit's tokens (a fixed
# patch: gains -0.08..+0.05 on dev) growing it adds no cue, only removals that move predictions resting on no cue
# (other classes' p_pred fell 0.10-0.19 more), and the flag lost 0.02-0.07 AUROC; a watermark's token units gained
# +0.17..+0.39 (benchmarks/RESULTS.md dev round 13)
MARGIN_MIN_GAIN = 0.1
# prompt --grow: a neighbouring token joins a grown removal only where it lowers the predicted class this much more
# than the removal so far (the cue runs on there); without it, growth went on into object evidence until some
# removal changed the prediction (dev round 15: the 6 x 6 texts' training-mix average fell 7-8 points).
GROW_MIN_GAIN = 0.1
# the counterfactual gate's removal of every shortcut at once (``CounterfactualMasker``): tested, in an image no
# removal alone changed, only where discovery measured for the predicted class that removing every unit's tokens
# together lowers the class's probability by at least this much more than removing its own units' tokens with as
# many other tokens drawn at random (``together_gains``, shortcuts.json ``together_gain``: the class's cue sits where
# the other classes' shortcuts sit too). Why: a thin frame's cue runs along every border token, each class's claim
# holds 6-16 of them and no claim alone changed most conflicting predictions (the gate fired on 4-27% of them); every
# claim together is the frame. Dev round 34: thin-frame classes gained +0.14..+0.46, most thick-frame classes
# +0.18..+0.60, fixed and random patches and texts <= 0.09 but one text class (0.21). Off by default (prompt
# --gate-together): held-out round 37 raised two thin frames' worst group +3.7 / +0.5 points and a frame's +1.0, but
# cost one thin frame's cue-free accuracy 1.6 points, past its pre-set line (RESULTS.md)
TOGETHER_MIN_GAIN = 0.1
TOGETHER_DRAWS = 4  # random token sets per class the union is measured against
# when the gate tests every shortcut at once (``CounterfactualMasker``): never; in images predicted as a class whose
# cue spreads; or only there where SIFT also finds a unit of the predicted class (in its place, under the default
# drop), the images whose drop the gate relaxes (dev round 34, read after round 37: cue-free touches <= +2.6 points
# instead of <= +5.3, the thin frames' worst-group gain kept; held-out round 38: thin frame +3.7 worst-group points,
# cue-free accuracy -1.6, past its pre-set line, so "off" stays the default)
TOGETHER_MODES = ("off", "spreads", "where_found")


@dataclass
class CausalConfig:
    causal_images: int = 32  # per class: sample of the class's discovery images the units are removed in
    min_class_frequency: float = 0.05  # a candidate word appears in >= this share of the class's images
    min_images: int = 3  # ... and in at least this many of them
    fixed_share: float = 0.5  # token unit: tokens holding the word in >= this share of its images in the class
    max_token_units: int = 4  # per class and family (keypoint, dense words), the most frequent words' token units
    # a word's several places (``_word_places``): tokens holding it in >= this share of its images in the class
    # (specific to the class there) that together hold it in >= fixed_share; >= fixed_share: none
    place_share: float = 0.2
    place_ratio: float = 0.4  # ... and >= this times the share of the word's most frequent token
    # a token unit is also present where another word of the class sits in its tokens, if that word is at
    # least this many times more frequent there in the class's images than in the others'
    gate_specificity: float = 5.0
    n_null: int = 200  # label permutations (0: none)
    n_boot: int = 1000
    evidence_share: float = 0.5  # a word's box: smallest token set carrying this share of its effect
    # region units: per class, the tokens where the decisive SIFT window of each of up to this many class images
    # (outside the causal sample) lies; 0: none
    region_images: int = 16
    region_window: int = 2  # region units: window side in tokens (as flag --window)
    region_windows: str = "sift"  # "sift": windows holding a SIFT keypoint centre; "all": every window (SIFT-free twin)
    control_budget: str = "matched"  # "matched": same forwards as the SIFT units of the class; "full": all images
    # sufficiency (transplant.py): each claimable unit pasted into this many other classes' sample images (0: none)
    transplant_images: int = 32
    # ... and also, per class and claimable family, the top this many significant units above the effect floor
    # whether class-specific or not (a frame's common colours are in many images, yet enough on their own)
    transplant_units: int = 3
    # a shortcut (applied by flag / gated prompt): the class's top causal unit with causal_p <= alpha, an effect
    # above min_effect and class-specific (in >= specificity x as large a share of the class's images as of
    # the others'): "frequent within one class, rare elsewhere or fixed in position" (METHOD.md §4), or sufficient
    # (shortcut_sufficiency, below)
    shortcut_alpha: float = 0.05
    # over the largest unit effect of random-weights models, rounded up to the next 0.01 (RESULTS "Dev round 6"):
    # 0.02 on clean images; 0.03 since random models on planted images reached 0.024 (held-out rounds 27-29).
    # Set on ten-output models; a model with fewer outputs gets it scaled up (``effect_floor``)
    shortcut_min_effect: float = 0.03
    shortcut_specificity: float = 2.0
    # ... or, where the transplant check ran, enough on its own: sufficiency_lo >= this (0: specificity alone)
    shortcut_sufficiency: float = 0.10
    # the same bar for a unit that is not class-specific (a frame's colours); None: ``shortcut_sufficiency`` (the bar
    # of colour casts, which stays). CLI spurious --claim-sufficiency
    unit_sufficiency: float | None = None
    top_shortcuts: int = 1
    # a class's dense claim is applied beside its keypoint claim only where it removes clearly more of the class's
    # evidence: causal_effect >= this x the keypoint claim's (0: both always). Why: a watermark's dense unit
    # (effect within 3% of the keypoint unit's on held-out round 11) adds no cue, only a larger removal (scene
    # colour, 8 tokens) that moves predictions resting on no cue (held-out round 22: aligned images steered to
    # 0.100, cue-free twin 0.226); a frame's dense unit removes 9-17x its keypoint unit's (round 11). 2, not 1.5:
    # on dev round 24 (a text watermark) two classes' dense claims removed 1.7-1.75x their keypoint claims' share
    # and cost aligned images as above; at 2 gated masking's aligned accuracy went 0.132 -> 0.300 (paired CI
    # +0.121..+0.226), the other groups unchanged
    dense_over_keypoint: float = 2.0
    # colour-cast units (cast.py): each class's mean colour beyond the classes' mean, claimed as a global shortcut
    # where, swapped into other classes' images, it takes most of them to the class beyond a random colour shift
    casts: bool = True
    # how a cast is removed from an image (cast.CAST_REMOVALS): "grey_world" (channel gains only) or "levels" (each
    # channel's range stretched to the pixel range: undoes a blend's offset and lost contrast; better flags, but it
    # failed the training-mix clause of held-out round 18b's pre-set line, so it is not the default)
    cast_removal: str = DEFAULT_CAST_REMOVAL
    # colour casts with a place (placed_cast.py): for classes without a claimed cast, the class's colour per cell of a
    # coarse grid, claimed by the same swap test, removed by masking its place (a background tint). Off: held-out round
    # 21's line failed (flag +0.08 / +0.10, steering gain not separable from zero)
    placed_casts: bool = False
    # when a dense word set counts as held by an image, for its class-specificity (f_in, f_out): "any" one token
    # carrying one of its words; "tokens" (the default since held-out round 51) its words on at least
    # ``DENSE_PRESENCE`` of the tokens they fill in the class's median image (``_set_frequency``). Why: a set of 9-12
    # colour words has one of them on some token of 35-61% of the other classes' images, so a background tint's set
    # (29-39 tokens in its class's images, 0-2 in the others') failed 2x in 3 of 10 fine-tuned dev classes
    # (RESULTS.md, dev read after round 49); held out, a background tint and a thin frame went from 4 and 6 classes
    # claimed to 10 and 10, worst group 27% -> 69% and 29% -> 69% of the oracle's headroom (round 51)
    dense_set_presence: str = "tokens"
    batch_size: int = 64
    seed: int = 0

    @property
    def claim_sufficiency(self) -> float:
        """The sufficiency bar of a unit claim (``unit_sufficiency``, else ``shortcut_sufficiency``)."""
        return self.shortcut_sufficiency if self.unit_sufficiency is None else self.unit_sufficiency

    def __post_init__(self) -> None:
        if self.control_budget not in ("matched", "full"):
            raise UserValueError(f"control_budget {self.control_budget!r} is not 'matched' or 'full'")
        if self.cast_removal not in CAST_REMOVALS:
            raise UserValueError(f"cast_removal {self.cast_removal!r} is not one of {', '.join(CAST_REMOVALS)}")
        if self.dense_set_presence not in DENSE_SET_PRESENCES:
            raise UserValueError(f"--dense-set-presence {self.dense_set_presence!r} is not one of "
                                 f"{', '.join(DENSE_SET_PRESENCES)}")
        if self.region_windows not in ("sift", "all"):
            raise UserValueError(f"region_windows {self.region_windows!r} is not 'sift' or 'all'")


# --- forwards with token masks -------------------------------------------------------------------

class _MaskHolder:
    """token_mask_fn that returns the masks set for the current batch."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask


@torch.no_grad()
def masked_probs(lm: LoadedModel, source, layers: list[int], jobs: list[tuple[int, np.ndarray]],
                 batch_size: int = 64, parts: RunParts | None = None, name: str = "masked",
                 columns: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities [J, K] with, for job j = (image index, bool mask [n]), the masked tokens removed
    as keys in ``layers``. Jobs are run in batches; each batch's images are read from ``source`` once.
    ``parts``: where each finished batch is kept (pass ``name``: resume after a kill, torchrun ranks).
    ``columns``: the outputs to keep, in the run's class order (``LabelMap.columns``: the softmax is over all
    outputs, then these are read); None: every output."""
    from ..prompting import SteeredViT

    if not jobs:
        return np.zeros((0, 0))
    device = next(lm.module.parameters()).device
    holder = _MaskHolder()
    parts = parts or RunParts.memory()
    with SteeredViT(lm, "mask_tokens", layers=layers, token_mask_fn=holder) as steered:
        def batch(c: int) -> Part:
            chunk = jobs[c * batch_size:(c + 1) * batch_size]
            idx = [i for i, _ in chunk]
            uniq, inv = np.unique(idx, return_inverse=True)
            x = source.get(uniq)[torch.from_numpy(inv.reshape(-1))]
            holder.mask = torch.from_numpy(np.stack([m for _, m in chunk]).astype(bool))
            p = steered(x.to(device)).float().softmax(-1).cpu().numpy()
            return Part(arrays={"p": p if columns is None else p[:, columns]})

        out = [p.arrays["p"] for p in parts.run(name, -(-len(jobs) // batch_size), batch)]
    return np.concatenate(out).astype(np.float64)


def keypoint_cover(xy: np.ndarray, size: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """bool [n]: tokens holding > COVER of a keypoint footprint (keypoints at pixel ``xy`` [k, 2], diameters)."""
    if not len(size):
        return np.zeros(grid[0] * grid[1], bool)
    kp = Keypoints(np.asarray(xy, np.float64), np.asarray(size, np.float64), np.ones(len(size)),
                   np.zeros(len(size), np.int64))
    return keypoint_mass(kp, grid, patch, "footprint", "unit") > COVER


def token_mask(tokens: Sequence[int], n: int) -> np.ndarray:
    """bool [n]: True at ``tokens``."""
    m = np.zeros(n, bool)
    m[list(tokens)] = True
    return m


def fills_its_tokens(held: int, size: int) -> bool:
    """Whether a dense unit's words, found in ``held`` of its ``size`` own tokens, put it in its place
    (``DENSE_IN_PLACE``); a unit without tokens has no place."""
    return size > 0 and held >= DENSE_IN_PLACE * size


def with_margin(mask: np.ndarray, grid: tuple[int, int], below: int) -> np.ndarray:
    """``mask`` [n] grown by its 8 neighbouring tokens when it holds 1..``below`` tokens (else as it is)."""
    if not 0 < mask.sum() <= below:
        return mask
    return ndimage.binary_dilation(mask.reshape(grid), structure=np.ones((3, 3), bool)).ravel()


def token_box(tokens: Sequence[int], grid: tuple[int, int], cell: tuple[float, float] | None = None
              ) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in [0, 1] of the model input covered by the cells of ``tokens`` (row-major indices).
    ``cell``: the share of the input's height and width one token covers (``TokenLayout.cell``); default 1 / grid,
    which it is when the input is a multiple of the patch (otherwise the grid covers less, or with padding more,
    than the input, and a box in grid shares would sit off the image's pixels)."""
    h, w = grid
    per_h, per_w = (h, w) if cell is None else (1 / cell[0], 1 / cell[1])  # tokens per input side
    r, c = np.divmod(np.asarray(tokens, int), w)
    return tuple(float(min(1.0, v)) for v in (c.min() / per_w, r.min() / per_h, (c.max() + 1) / per_w,
                                              (r.max() + 1) / per_h))


def token_name(tokens: Sequence[int], grid: tuple[int, int]) -> str:
    return "token:" + "+".join(f"{t // grid[1]},{t % grid[1]}" for t in sorted(tokens))


def occlusion_windows(grid: tuple[int, int], window: int) -> np.ndarray:
    """bool [n_windows, n]: every ``window`` x ``window`` square of tokens (stride 1, row-major; a grid
    smaller than the window gives one window of the whole side)."""
    h, w = grid
    wh, ww = min(window, h), min(window, w)
    out = []
    for r in range(h - wh + 1):
        for c in range(w - ww + 1):
            m = np.zeros((h, w), bool)
            m[r:r + wh, c:c + ww] = True
            out.append(m.reshape(-1))
    return np.stack(out)


def keypoint_windows(windows: np.ndarray, kp_xy: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """bool [n_windows]: the windows holding at least one keypoint centre (``kp_xy`` [k, 2] in pixels)."""
    if not len(kp_xy):
        return np.zeros(len(windows), bool)
    col = np.clip((kp_xy[:, 0] // patch).astype(int), 0, grid[1] - 1)
    row = np.clip((kp_xy[:, 1] // patch).astype(int), 0, grid[0] - 1)
    return windows[:, row * grid[1] + col].any(1)


# --- candidate units ------------------------------------------------------------------------------

@dataclass
class Unit:
    kind: str  # word | words (a set of dense words) | token | region
    word: int  # the word (for a token unit: the word whose keypoints define it and gate it; words: the first)
    tokens: tuple[int, ...] = ()  # token units: the fixed tokens
    cls: int = -1  # token units: the class they were found in
    gate_words: tuple[int, ...] = ()  # token units: the class's words whose fixed tokens overlap these; words: the set
    evidence: np.ndarray | None = None  # region units: [n] decisive-window drops per token (where it was found)
    dense: bool = False  # defined by a dense word (``--dense-words``), not a detected keypoint's word

    @property
    def family(self) -> str:
        """The family whose null the unit's causal_p is measured against (see ``FAMILIES``)."""
        return "region" if self.kind == "region" else "dense" if self.dense else "keypoint"

    def name(self, grid: tuple[int, int]) -> str:
        if self.kind == "word":
            return f"word:{self.word}"
        if self.kind == "words":
            return "words:" + "+".join(map(str, self.gate_words))
        return token_name(self.tokens, grid) if self.kind == "token" else "region:" + token_name(self.tokens, grid)[6:]


def candidate_units(kps: pd.DataFrame, labels: np.ndarray, K: int, grid: tuple[int, int], cfg: CausalConfig
                    ) -> tuple[list[Unit], dict[int, list[int]]]:
    """All units and, per class, the indices of its candidates (see the module docstring)."""
    n_k = np.bincount(labels, minlength=K)
    img_cls = labels[kps["image"].to_numpy()]
    per = kps.assign(cls=img_cls).drop_duplicates(["image", "word"])
    freq = per.groupby(["cls", "word"]).size()  # images of the class holding the word
    units: list[Unit] = []
    word_index: dict[int, int] = {}
    cands: dict[int, list[int]] = {k: [] for k in range(K)}
    token_seen: dict[tuple[int, tuple[int, ...]], int] = {}
    # dense words (one per token, ``--dense-words``) sit at every token of every image, so "fixed in position"
    # says nothing about them: they are candidates only where they are also rare elsewhere
    dense_ids = set(kps.loc[kps["dense"].to_numpy(bool), "word"].astype(int)) if "dense" in kps else set()
    per_word = freq.groupby(level=1).sum() if len(freq) else freq
    for k in range(K):
        fk = freq[freq.index.get_level_values(0) == k] if len(freq) else freq
        need = max(cfg.min_images, math.ceil(cfg.min_class_frequency * n_k[k]))
        n_rest = max(int(len(labels) - n_k[k]), 1)
        words = [int(w) for (_, w), c in fk.items() if c >= need and (
            int(w) not in dense_ids
            or c / max(n_k[k], 1) >= cfg.shortcut_specificity * (per_word[w] - c) / n_rest)]
        for w in words:
            if w not in word_index:
                word_index[w] = len(units)
                units.append(Unit("word", w, dense=w in dense_ids))
            cands[k].append(word_index[w])
        # the class's specific dense words together, removed wherever any of them sits in an image: one texture
        # (a frame) falls into several dense words by place and phase, and only removing all of it moves p_k
        dense_k = tuple(sorted(w for w in words if w in dense_ids))
        if len(dense_k) >= 2:
            cands[k].append(len(units))
            units.append(Unit("words", dense_k[0], (), k, dense_k, dense=True))
        # token units: where the class's frequent words sit at a fixed place (or at one of a few places)
        sub = kps[(img_cls == k) & kps["word"].isin(words)].drop_duplicates(["image", "word", "patch"])
        tok_units = []
        for w, g in sub.groupby("word"):
            n_img = g["image"].nunique()
            share = g.groupby("patch")["image"].nunique() / n_img
            fixed = tuple(sorted(int(t) for t in share.index[share.to_numpy() >= cfg.fixed_share]))
            # dense words (a token's colour) fill whole regions: "several places" is a keypoint word's notion
            places = () if int(w) in dense_ids else _word_places(kps, labels, k, g, fixed, grid, cfg)
            for toks in (fixed, places):
                if toks:
                    # the word at these tokens: in how many of the class's images, and of the others'
                    at = kps[(kps["word"] == w).to_numpy() & kps["patch"].isin(toks).to_numpy()]["image"].unique()
                    f_in = (labels[at] == k).sum() / max(n_k[k], 1)
                    f_out = (labels[at] != k).sum() / n_rest
                    tok_units.append((n_img * float(share.max()), int(w), toks, f_in, f_out))
        # per family (keypoint words, dense words) its own most frequent words' units, gated by its own words:
        # adding dense words leaves the keypoint units as they were (and their null, ``_effect_table``)
        top = []
        for dense in (False, True):
            fam = [t for t in tok_units if (t[1] in dense_ids) == dense]
            keep = set(sorted({(-t[0], t[1]) for t in fam})[: cfg.max_token_units])  # a word's units go together
            chosen = sorted((t for t in fam if (-t[0], t[1]) in keep), key=lambda t: (-t[0], t[1], len(t[2])))
            top += chosen
            for _, w, fixed, _, _ in chosen:
                # gate: this word and the family's other words found at these tokens that are specific to the
                # class there
                gate = tuple(sorted({w} | {w2 for _, w2, f2, fi, fo in fam
                                           if set(f2) & set(fixed) and fi >= cfg.gate_specificity * fo}))
                _add_token_unit(units, cands, token_seen, Unit("token", w, fixed, k, gate, dense=dense))
        # one texture over many tokens (a frame) falls into several dense words by where it is (at the border,
        # beside the image content): the class's specific dense words' tokens together, as one more unit
        parts = [(w, fixed) for _, w, fixed, fi, fo in top if w in dense_ids and fi >= cfg.gate_specificity * fo]
        if len(parts) >= 2:
            tokens = tuple(sorted({t for _, fixed in parts for t in fixed}))
            _add_token_unit(units, cands, token_seen, Unit("token", parts[0][0], tokens, k,
                                                           tuple(sorted({w for w, _ in parts})), dense=True))
    return units, cands


def _word_places(kps: pd.DataFrame, labels: np.ndarray, k: int, g: pd.DataFrame, fixed: tuple[int, ...],
                 grid: tuple[int, int], cfg: CausalConfig) -> tuple[int, ...]:
    """The tokens of a word's several places in class k, or (). A cue drawn in one of a few places per image (a
    watermark in one of two or four corners) puts its words at each place in only part of the class's images, so
    no token, or only one place's, reaches ``fixed_share``.

    Candidate tokens hold the word (``g``: its keypoints in class k, one row per image and token; ``fixed``: its
    fixed place)
    in >= ``place_share`` of its images and >= ``place_ratio`` x the share of its most frequent token (a word on a
    fixed cue that sits elsewhere in a minority of its images is not a cue in two places; a dev text watermark's
    second corner held its word in 0.33 of the images against 0.67 for the first), in >= ``min_images`` of them,
    and are specific to class k there (>= ``gate_specificity`` x as large a share of class k's images as of the
    others'). They form places (8-connected groups: a token beside the fixed place is part of it, not another
    place). Starting from the fixed place (or, without one, the place holding the word in most images), a further
    place joins when it holds the word in >= ``place_share`` of its images *that no chosen place holds*: another
    place of the cue is where the word is when it is not at the first. The set must hold the word in >=
    ``fixed_share`` of its images and be more than the fixed place."""
    if cfg.place_share >= cfg.fixed_share:
        return ()
    w = int(g["word"].iloc[0])
    n_k = int((labels == k).sum())
    n_rest = len(labels) - n_k
    n_img = g["image"].nunique()
    share = g.groupby("patch")["image"].nunique() / n_img  # per token, the share of the word's images there
    sh = share.to_numpy()
    cand = [int(t) for t in share.index[(sh >= max(cfg.place_share, cfg.place_ratio * sh.max()))
                                         & (sh * n_img >= cfg.min_images - 1e-9)]]
    hit = kps[(kps["word"] == w).to_numpy() & kps["patch"].isin(cand).to_numpy()].drop_duplicates(["image", "patch"])
    own = labels[hit["image"].to_numpy()] == k
    f_in = hit[own].groupby("patch").size() / max(n_k, 1)
    f_out = hit[~own].groupby("patch").size().reindex(f_in.index, fill_value=0) / max(n_rest, 1)
    specific = {int(t) for t in f_in.index[(f_in >= cfg.gate_specificity * f_out).to_numpy()]}
    mask = np.zeros(grid[0] * grid[1], bool)
    mask[list(specific | set(fixed))] = True
    group_of, _ = ndimage.label(mask.reshape(grid), structure=np.ones((3, 3), int))
    group_of = group_of.ravel()
    images_at = {gid: set(g.loc[g["patch"].isin(np.flatnonzero(group_of == gid)), "image"])
                 for gid in np.unique(group_of[mask])}
    base = {int(group_of[t]) for t in fixed}
    chosen = set(fixed) if fixed else set()
    seen: set = set().union(*(images_at[gid] for gid in base)) if base else set()
    rest = [gid for gid in images_at if gid not in base]
    while rest:
        gain = {gid: len(images_at[gid] - seen) for gid in rest}
        best = max(rest, key=lambda gid: (gain[gid], -gid))
        if gain[best] < cfg.place_share * n_img - 1e-9:
            break
        chosen |= set(np.flatnonzero(group_of == best).tolist()) & specific
        seen |= images_at[best]
        rest.remove(best)
    places = tuple(sorted(int(t) for t in chosen))
    return places if places != tuple(fixed) and len(seen) >= cfg.fixed_share * n_img - 1e-9 else ()


def _add_token_unit(units: list[Unit], cands: dict[int, list[int]], seen: dict, unit: Unit) -> None:
    """Append a token unit as one of its class's candidates, unless the class has one on the same tokens."""
    key = (unit.cls, unit.tokens)
    if key not in seen:
        seen[key] = len(units)
        cands[unit.cls].append(len(units))
        units.append(unit)


def region_units(lm: LoadedModel, source, layers: list[int], labels: np.ndarray, probs: np.ndarray,
                 kps: pd.DataFrame, sample: np.ndarray, K: int, grid: tuple[int, int], patch: int,
                 input_hw: tuple[int, int], cfg: CausalConfig, parts: RunParts | None = None,
                 columns: np.ndarray | None = None) -> tuple[list[Unit], dict[int, int]]:
    """Per class k, one ``region`` unit: where class k's evidence sits image by image, for cues that move or
    that no single word captures. In each of up to ``region_images`` class-k images *outside* the causal sample
    (so the unit's effect is measured on images it was not built from), every ``region_window``-square of tokens
    holding a SIFT keypoint centre is masked alone; the window with the largest drop of p_k is the image's
    decisive window; its smallest part whose removal still gives half that drop (every proper subset of the
    window is tried) gets the drop, shared by its tokens. The unit = the smallest token set carrying
    ``evidence_share`` of those drops. Returns the units and, per class, the forwards spent."""
    n = grid[0] * grid[1]
    H, W = input_hw
    windows = occlusion_windows(grid, cfg.region_window)
    rng = np.random.default_rng([cfg.seed, 23])
    in_sample = np.zeros(len(labels), bool)
    in_sample[sample] = True
    chosen = {}
    for k in range(K):
        pool = np.flatnonzero((labels == k) & ~in_sample)
        chosen[k] = pool if len(pool) <= cfg.region_images else np.sort(rng.choice(pool, cfg.region_images,
                                                                                   replace=False))
    jobs, at = [], []
    detected = kps[~kps["dense"].to_numpy(bool)] if "dense" in kps else kps  # windows that hold a SIFT keypoint
    xy = {int(i): np.stack([g["x"].to_numpy() * W, g["y"].to_numpy() * H], 1) for i, g in detected.groupby("image")}
    for k in range(K):
        for i in chosen[k]:
            use = (keypoint_windows(windows, xy.get(int(i), np.zeros((0, 2))), grid, patch)
                   if cfg.region_windows == "sift" else np.ones(len(windows), bool))
            for v in np.flatnonzero(use):
                jobs.append((int(i), windows[v]))
                at.append((k, int(i), int(v)))
    order = np.argsort([i for i, _ in jobs], kind="stable")
    jobs, at = [jobs[o] for o in order], [at[o] for o in order]
    pm = masked_probs(lm, source, layers, jobs, cfg.batch_size, parts, "region", columns)
    best: dict[tuple[int, int], tuple[float, int]] = {}  # (class, image) -> (drop, window)
    for (k, i, v), p in zip(at, pm):
        d = float(probs[i, k] - p[k])
        if d > best.get((k, i), (0.0, -1))[0]:
            best[(k, i)] = (d, v)
    spent = {k: 0 for k in range(K)}
    for k, _, _ in at:
        spent[k] += 1
    # the decisive window cut to its smallest part that still removes >= half its drop (a cue in one token is
    # that token, a cue straddling the window needs all of it): every proper subset of the window's tokens
    sub_jobs, sub_at = [], []
    for (k, i), (_, v) in best.items():
        toks = np.flatnonzero(windows[v])
        for size in range(1, len(toks)):
            for subset in itertools.combinations(toks.tolist(), size):
                sub_jobs.append((i, token_mask(subset, n)))
                sub_at.append((k, i, subset))
                spent[k] += 1
    pm = masked_probs(lm, source, layers, sub_jobs, cfg.batch_size, parts, "region_parts", columns)
    part: dict[tuple[int, int], tuple[int, ...]] = {(k, i): tuple(np.flatnonzero(windows[v]).tolist())
                                                    for (k, i), (_, v) in best.items()}
    for (k, i, subset), p in zip(sub_at, pm):  # subsets come smallest first: keep the first that suffices
        if len(subset) < len(part[(k, i)]) and probs[i, k] - p[k] >= 0.5 * best[(k, i)][0]:
            part[(k, i)] = subset
    units = []
    for k in range(K):
        heat = np.zeros(n)
        for i in chosen[k]:
            d, v = best.get((k, int(i)), (0.0, -1))
            if v >= 0:
                toks = list(part[(k, int(i))])
                heat[toks] += d / len(toks)
        if heat.sum() > 0:
            toks = tuple(_evidence_tokens(heat, cfg.evidence_share))
            units.append(Unit("region", -1, toks, k, (), heat))
    return units, spent


def sample_images(labels: np.ndarray, K: int, per_class: int, seed: int) -> np.ndarray:
    """Seeded sample of up to ``per_class`` image indices per class, sorted."""
    rng = np.random.default_rng([seed, 13])
    out = []
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        out.append(idx if len(idx) <= per_class else np.sort(rng.choice(idx, per_class, replace=False)))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, int)


# --- the causal ranking ---------------------------------------------------------------------------

@dataclass
class CausalResult:
    units: pd.DataFrame  # one row per (class, candidate unit): causal and attention views, box
    control: pd.DataFrame  # SIFT-free occlusion ranking: one row per (class, token)
    budget: dict  # per class: forwards of the SIFT units and of the control
    unit_list: list[Unit] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)  # (class, unit index) -> [(image, drop)] for exemplar crops
    config: CausalConfig = field(default_factory=CausalConfig)  # what the units were ranked and selected with


def causal_discovery(lm: LoadedModel, source, layers: list[int], labels: np.ndarray, probs: np.ndarray,
                     attn: np.ndarray, kps: pd.DataFrame, grid: tuple[int, int], patch: int, K: int,
                     input_hw: tuple[int, int], cfg: CausalConfig, parts: RunParts | None = None,
                     columns: np.ndarray | None = None) -> CausalResult:
    """Rank every class's candidate units by the counterfactual drop of the class probability; with the
    label-permutation null, bootstrap CIs, attention lift, boxes, and the SIFT-free occlusion control.
    Class k (``labels``, 0..K-1) is model output ``columns[k]`` (``siftlens.label_map``; None: output k):
    ``probs`` [N, K] holds those columns of the softmax over all outputs, and the masked forwards read the same."""
    n = grid[0] * grid[1]
    H, W = input_hw
    units, cands = candidate_units(kps, labels, K, grid, cfg)
    sample = sample_images(labels, K, cfg.causal_images, cfg.seed)
    region_spent = {k: 0 for k in range(K)}
    if cfg.region_images > 0:
        regions, region_spent = region_units(lm, source, layers, labels, probs, kps, sample, K, grid, patch,
                                             input_hw, cfg, parts, columns)
        for u in regions:
            if any(units[j].kind == "token" and units[j].tokens == u.tokens for j in cands[u.cls]):
                continue  # the class's token unit already removes exactly these tokens
            cands[u.cls].append(len(units))
            units.append(u)
    pos = {int(i): j for j, i in enumerate(sample)}
    S, U = len(sample), len(units)
    if S * U * K > 2e8:  # the drops table below holds every class's probability for every (image, unit)
        raise UserValueError(f"causal discovery: {S} sample images x {U} candidate units x {K} classes is too large "
                         f"for the label-permutation null ({S * U * K * 8 / 1e9:.1f} GB); lower --causal-images or "
                         "--words, or use --no-causal")
    kp_s = kps[kps["image"].isin(sample)]
    word_unit = {u.word: j for j, u in enumerate(units) if u.kind == "word"}
    word_sets = [(j, set(u.gate_words)) for j, u in enumerate(units) if u.kind == "words"]

    # jobs: every word unit in the sample images that hold it; every token unit in every sample image
    jobs: list[tuple[int, np.ndarray]] = []
    job_at: list[tuple[int, int]] = []  # (sample position, unit)
    word_masks: dict[tuple[int, int], np.ndarray] = {}

    def add_word_job(i: int, j: int, gw: pd.DataFrame) -> None:  # unit j's keypoints gw in image i
        m = keypoint_cover(np.stack([gw["x"].to_numpy() * W, gw["y"].to_numpy() * H], 1), gw["size"].to_numpy(),
                           grid, patch)
        if m.any():
            word_masks[(pos[i], j)] = np.flatnonzero(m)
            jobs.append((i, m))
            job_at.append((pos[i], j))

    for i, g in kp_s.groupby("image"):
        for w, gw in g.groupby("word"):
            if int(w) in word_unit:
                add_word_job(int(i), word_unit[int(w)], gw)
        for j, ws in word_sets:
            gw = g[g["word"].isin(ws)]
            if len(gw):
                add_word_job(int(i), j, gw)
    for j, u in enumerate(units):
        if u.kind in ("token", "region"):  # fixed tokens: removed in every sample image
            m = token_mask(u.tokens, n)
            for i in sample:
                jobs.append((int(i), m))
                job_at.append((pos[int(i)], j))
    order = np.argsort([i for i, _ in jobs], kind="stable")  # image-major: each batch reads few images
    jobs, job_at = [jobs[o] for o in order], [job_at[o] for o in order]
    pm = masked_probs(lm, source, layers, jobs, cfg.batch_size, parts, "causal", columns)
    drops = np.zeros((S, U, K))
    p0 = probs[sample, :K]
    for (sp, j), p in zip(job_at, pm):
        drops[sp, j] = p0[sp] - p[:K]
    y = labels[sample]

    # budget: forwards spent on class k's own sample images
    budget = {}
    for k in range(K):
        own = set(np.flatnonzero(y == k).tolist())
        n_tok = sum(1 for j in cands[k] if units[j].kind in ("token", "region")) * len(own)
        n_word = sum(1 for (sp, j) in word_masks if sp in own and j in cands[k])
        budget[k] = {"sift_forwards": n_word + n_tok + region_spent[k]}

    cell = lm.layout(input_hw).cell(input_hw)  # boxes in shares of the input (token_box)
    units_df = _effect_table(drops, y, units, cands, K, grid, cell, word_masks, kps, labels, attn, n, cfg)
    if cfg.transplant_images > 0 and len(units_df):
        from .transplant import transplant_check

        def unit_tokens(sp: int, j: int) -> np.ndarray | None:  # unit j's tokens in sample image sp
            toks = list(units[j].tokens) if units[j].kind in ("token", "region") else word_masks.get((sp, j))
            return None if toks is None else token_mask(toks, n)

        tested = {k: sufficiency_candidates(units_df, k, cfg) for k in range(K)}
        units_df = transplant_check(lm, source, units_df, unit_tokens, sample, y, drops, probs, grid, patch, tested,
                                    cfg, parts, columns)
    evidence = {}
    for r in units_df.itertuples():
        own = np.flatnonzero(y == r.cls)
        d = drops[own, r.unit_index, r.cls]
        evidence[(r.cls, r.unit_index)] = [(int(sample[o]), float(v)) for o, v in zip(own, d)]
    control, ctrl_budget = occlusion_control(lm, source, layers, sample, y, probs, K, grid, budget, cfg, parts,
                                             columns, cell)
    for k in range(K):
        budget[k]["control_forwards"] = ctrl_budget[k]
    return CausalResult(units_df, control, budget, units, evidence, cfg)


def _effect_table(drops, y, units, cands, K, grid, cell, word_masks, kps, labels, attn, n, cfg) -> pd.DataFrame:
    rng = np.random.default_rng([cfg.seed, 17])
    onehot = np.eye(K)[y]  # [S, K]
    n_k = np.maximum(onehot.sum(0), 1)

    def effects(oh: np.ndarray) -> np.ndarray:  # [K, U]
        return np.einsum("sk,suk->ku", oh, drops) / n_k[:, None]

    E = effects(onehot)
    rows = []
    # one null per family: a keypoint unit (word or token unit of detected keypoints' words) pays for being the
    # best of the class's keypoint units, a dense unit the best of its dense units, a region unit the best of all
    # its candidates. So adding region or dense units leaves the keypoint units' p-values as they were (64 dense
    # scene colours raised the max and cost a claim: RESULTS held-out round 5b); the claim rule splits alpha
    # between the families a class has (``family_alpha``).
    null_best = None
    if cfg.n_null > 0:
        members = {k: {"keypoint": [j for j in cands[k] if units[j].family == "keypoint"],
                       "dense": [j for j in cands[k] if units[j].family == "dense"],
                       "region": list(cands[k])} for k in range(K)}
        null_best = {f: np.full((cfg.n_null, K), -np.inf) for f in FAMILIES}
        for b in range(cfg.n_null):
            Eb = effects(onehot[rng.permutation(len(y))])
            for k in range(K):
                for f, js in members[k].items():
                    if js:
                        null_best[f][b, k] = Eb[k, js].max()
    img_cls = labels[kps["image"].to_numpy()]
    for k in range(K):
        own = np.flatnonzero(y == k)
        if not cands[k] or not len(own):
            continue
        cj = np.array(cands[k])
        d = drops[own][:, cj, k]  # [n_own, c]
        boot = rng.integers(0, len(own), size=(cfg.n_boot, len(own)))
        bm = d[boot].mean(1)  # [n_boot, c]
        lo, hi = np.quantile(bm, [0.025, 0.975], axis=0)
        class_imgs = np.flatnonzero(labels == k)
        for c, j in enumerate(cj):
            u = units[j]
            f_in, f_out = (_frequency(u, kps, labels, k, cfg.dense_set_presence) if u.kind != "region"
                           else (float("nan"), float("nan")))
            if u.kind == "region":
                toks = list(u.tokens)
                weight = u.evidence  # where it was found, on images outside the sample
                present = float("nan")  # not a keypoint unit: removed in every image
            elif u.kind == "token":
                toks = list(u.tokens)
                weight = np.zeros(n)
                weight[toks] = 1.0  # a token unit is removed whole: its tokens count alike
                present = f_in  # masked in every image; present (a gate word in its tokens) in this share
            else:  # word, words
                weight = _evidence_weight(j, own, d[:, c], word_masks,
                                          kps[(img_cls == k) & kps["word"].isin(_words_of(u))], n)
                toks = _evidence_tokens(weight, cfg.evidence_share)
                present = float(np.mean([(i, j) in word_masks for i in own]))
            # attention view: mean n·a over the unit's tokens in the class's images (1 = uniform attention)
            if u.kind not in ("word", "words"):
                lift = float(n * attn[class_imgs][:, toks].mean()) if len(class_imgs) else float("nan")
            else:
                sub = kps[(img_cls == k) & kps["word"].isin(_words_of(u))]
                lift = float(sub["lift"].mean()) if len(sub) else float("nan")
            # tokens a removal masks, averaged over the class's sample images (a word: 0 where absent): the evidence
            # per token tells a large unit (an object's or the sky's colour words) from a small cue removing as much
            removed = (float(len(u.tokens)) if u.kind in ("token", "region") else
                       float(np.mean([len(word_masks.get((int(o), int(j)), ())) for o in own])))
            region, region_share = main_region(toks, weight, grid)
            x0, y0, x1, y1 = token_box(region, grid, cell)
            rows.append({"cls": k, "unit": u.name(grid), "kind": u.kind, "word": u.word,
                         "tokens": " ".join(map(str, sorted(toks))), "unit_index": int(j),
                         "causal_effect": float(E[k, j]), "causal_lo": float(lo[c]), "causal_hi": float(hi[c]),
                         "family": u.family,
                         "causal_p": (float((1 + (null_best[u.family][:, k] >= E[k, j] - 1e-12).sum())
                                            / (1 + cfg.n_null))
                                      if null_best is not None else float("nan")),
                         "positive_share": float((d[:, c] > 0.01).mean()), "present_share": present,
                         "n_images": len(own), "removed_tokens": removed,
                         "evidence_per_token": float(E[k, j]) / removed if removed > 0 else float("nan"),
                         "f_in": f_in, "f_out": f_out, "attention_lift": lift,
                         "gate_words": " ".join(map(str, u.gate_words or ((u.word,) if u.kind != "region" else ()))),
                         "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1, "box_share": region_share})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["causal_rank"] = parsimonious_rank(df)
    df["family_rank"] = df.groupby(["cls", "family"])["causal_effect"].rank(ascending=False,
                                                                           method="first").astype(int)
    df["attention_rank"] = df.groupby("cls")["attention_lift"].rank(ascending=False, method="first",
                                                                    na_option="bottom").astype(int)
    return df.sort_values(["cls", "causal_rank"]).reset_index(drop=True)


# a smaller unit inside a larger one takes its rank when it removes at least this share of the larger's effect (and
# is inside its CI) with p <= PARSIMONY_P: the CI alone let a unit of 0.008 replace one of 0.041 on the toy test model
PARSIMONY_SHARE = 0.5
PARSIMONY_P = 0.05


def parsimonious_rank(units: pd.DataFrame) -> pd.Series:
    """Per class, the units by effect, except that a unit gives its place to a unit of fewer tokens inside its own
    (``tokens``: a token unit's tokens, a word's evidence tokens) that removes as much: an effect within its 95% CI
    (>= its ``causal_lo``) and at least ``PARSIMONY_SHARE`` of its effect, with a label-permutation p <=
    ``PARSIMONY_P`` (where the null was run); and that one to a smaller one in turn. Why: a colour word or token
    unit that spans the cue and a dozen other tokens removes as much as the cue's token alone, plus a little;
    ranked by effect it came first and its box sat on the dozen (dev: a corner patch at 7,7 boxed on the top rows;
    fine-tuned texts' 19-21-token colour sets). Effects are unchanged; claims keep their own order
    (``by_effect``). Returns 1-based ranks aligned with ``units``."""
    tokens = {i: frozenset(str(t).split()) for i, t in units["tokens"].items()}
    p = units["causal_p"] if "causal_p" in units else pd.Series(np.nan, index=units.index)
    tested = p.isna() | (p <= PARSIMONY_P)
    rank = pd.Series(0, index=units.index, dtype=int)
    for _, group in units.groupby("cls", sort=False):
        left = list(by_effect(group).index)  # largest effect first
        order: list = []
        while left:
            top = left[0]
            while True:  # descend to the smallest unit inside `top` that removes as much (within its CI)
                bar = max(units.at[top, "causal_lo"], PARSIMONY_SHARE * units.at[top, "causal_effect"])
                inside = [i for i in left if tokens[i] and tokens[i] < tokens[top] and tested[i]
                          and units.at[i, "causal_effect"] >= bar]
                if not inside:
                    break
                top = inside[0]  # `left` is by effect: the largest of them
            order.append(top)
            left.remove(top)
        rank[order] = np.arange(1, len(order) + 1)
    return rank


def by_effect(units: pd.DataFrame) -> pd.DataFrame:
    """Units by causal effect, largest first (ties in table order): the order claims take."""
    return units.sort_values("causal_effect", ascending=False, kind="stable")


def _frequency(u: Unit, kps: pd.DataFrame, labels: np.ndarray, k: int, set_presence: str) -> tuple[float, float]:
    """Share of class k's images, and of the other images, holding the unit (a token unit: one of its
    gate words with a keypoint centre in its tokens; a dense word set with ``set_presence="tokens"``:
    ``_set_frequency``)."""
    if u.kind in ("word", "words"):
        hit = kps["word"].isin(_words_of(u)).to_numpy()
        if u.kind == "words" and u.dense and set_presence == "tokens":
            return _set_frequency(kps.loc[hit, ["image", "patch"]], labels, k)
    else:
        hit = kps["word"].isin(u.gate_words).to_numpy() & kps["patch"].isin(u.tokens).to_numpy()
    imgs = np.unique(kps["image"].to_numpy()[hit])
    in_k = labels[imgs] == k
    n_k, n_o = int((labels == k).sum()), int((labels != k).sum())
    return float(in_k.sum() / max(n_k, 1)), float((~in_k).sum() / max(n_o, 1))


def _set_frequency(hits: pd.DataFrame, labels: np.ndarray, k: int) -> tuple[float, float]:
    """(f_in, f_out) of a dense word set, an image holding it where its words sit on at least ``DENSE_PRESENCE`` as
    many tokens as in class k's median image (at least one): the gate's presence test, scaled to what the class
    shows, instead of one token of a common colour. ``hits``: the set's dense keypoints (image, patch)."""
    per_image = hits.groupby("image")["patch"].nunique()
    counts = np.zeros(len(labels))
    counts[per_image.index.to_numpy()] = per_image.to_numpy()
    own = labels == k
    if not own.any():
        return 0.0, 0.0
    held = counts >= max(1.0, DENSE_PRESENCE * float(np.median(counts[own])))
    return float(held[own].mean()), float(held[~own].mean()) if (~own).any() else 0.0


def _words_of(u: Unit) -> tuple[int, ...]:
    """The words whose keypoints make up a word or word-set unit."""
    return u.gate_words if u.kind == "words" else (u.word,)


def _evidence_weight(j, own, d, word_masks, sub_kps, n) -> np.ndarray:
    """[n] where word unit j's effect sits: each image's positive drop shared equally by the tokens masked
    there; no positive drop anywhere: where the word's keypoints sit most often."""
    weight = np.zeros(n)
    for o, i in enumerate(own):
        toks = word_masks.get((int(i), j))
        if toks is not None and d[o] > 0:
            weight[toks] += d[o] / len(toks)
    if weight.sum() <= 0:
        weight = np.bincount(sub_kps["patch"].to_numpy(), minlength=n).astype(float)
    return weight


def _evidence_tokens(weight: np.ndarray, share: float) -> list[int]:
    """The smallest set of tokens carrying >= ``share`` of ``weight`` (every token when there is none)."""
    if weight.sum() <= 0:
        return list(range(len(weight)))
    order = np.argsort(-weight, kind="stable")
    cum = np.cumsum(weight[order]) / weight.sum()
    return sorted(order[: int(np.searchsorted(cum, share - 1e-12)) + 1].tolist())


def main_region(tokens: Sequence[int], weight: np.ndarray, grid: tuple[int, int]) -> tuple[list[int], float]:
    """The 8-connected group of ``tokens`` that carries the most ``weight``, and its share of all the weight.

    A unit's evidence can sit in several places (a word on the cue and elsewhere; a cue in one of four corners):
    the bounding box of all of it would be centred between them, on none. The box reports the main place and
    ``box_share`` says how much of the evidence it holds (1: all of it)."""
    h, w = grid
    grid_mask = np.zeros(h * w, bool)
    grid_mask[list(tokens)] = True
    labels, count = ndimage.label(grid_mask.reshape(h, w), structure=np.ones((3, 3), int))
    labels = labels.ravel()
    if count <= 1:
        group = np.flatnonzero(grid_mask)
    else:
        mass = np.bincount(labels, weights=weight, minlength=count + 1)[1:]
        size = np.bincount(labels, minlength=count + 1)[1:]
        best = int(np.lexsort((-size, -mass))[0]) + 1  # most weight; ties: the larger group
        group = np.flatnonzero(labels == best)
    total = float(weight.sum())
    share = float(weight[group].sum() / total) if total > 0 else 1.0
    return group.tolist(), share


def occlusion_control(lm, source, layers, sample, y, probs, K, grid, budget, cfg, parts: RunParts | None = None,
                      columns: np.ndarray | None = None, cell: tuple[float, float] | None = None
                      ) -> tuple[pd.DataFrame, dict]:
    """SIFT-free control: per class, every token masked alone on m_k of the class's sample images, m_k =
    the SIFT units' forwards on the class / n (same budget; ``control_budget='full'``: all sample images)."""
    n = grid[0] * grid[1]
    rng = np.random.default_rng([cfg.seed, 19])
    jobs, at, used = [], [], {}
    for k in range(K):
        own = np.flatnonzero(y == k)
        if not len(own):
            used[k] = 0
            continue
        m_k = len(own) if cfg.control_budget == "full" else int(np.clip(round(budget[k]["sift_forwards"] / n), 1,
                                                                        len(own)))
        chosen = np.sort(rng.choice(own, m_k, replace=False))
        used[k] = m_k * n
        for sp in chosen:
            for t in range(n):
                jobs.append((int(sample[sp]), token_mask([t], n)))
                at.append((k, int(sample[sp]), t))
    pm = masked_probs(lm, source, layers, jobs, cfg.batch_size, parts, "control", columns)
    rows = []
    if len(at):
        a = pd.DataFrame(at, columns=["cls", "image", "token"])
        a["drop"] = probs[a["image"].to_numpy(), a["cls"].to_numpy()] - pm[np.arange(len(a)), a["cls"].to_numpy()]
        for k, g in a.groupby("cls"):
            piv = g.pivot(index="image", columns="token", values="drop").to_numpy()  # [m_k, n]
            eff = piv.mean(0)
            boot = rng.integers(0, len(piv), size=(cfg.n_boot, len(piv)))
            lo, hi = np.quantile(piv[boot].mean(1), [0.025, 0.975], axis=0)
            order = np.argsort(-eff, kind="stable")
            for rank, t in enumerate(order, 1):
                x0, y0, x1, y1 = token_box([t], grid, cell)
                rows.append({"cls": int(k), "rank": rank, "unit": token_name([t], grid), "token": int(t),
                             "effect": float(eff[t]), "effect_lo": float(lo[t]), "effect_hi": float(hi[t]),
                             "n_images": len(piv), "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1})
    return pd.DataFrame(rows), used


# --- shortcuts for new images ---------------------------------------------------------------------

def _no_causal_run(folder: Path) -> bool:
    """Whether ``folder`` holds a current `siftlens spurious --no-causal` run (its manifest lists no shortcuts and
    no causal budget; older runs' manifests have neither key)."""
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(man, dict) and man.get("command") == "spurious" and man.get("budget") == {} and \
        man.get("shortcuts") == []


class ShortcutFileError(UserValueError):
    """A motifs folder / shortcuts.json that cannot be used with this model."""


def output_probe(lm: LoadedModel, input_hw: tuple[int, int]) -> np.ndarray:
    """The model's outputs, centred, on one fixed seeded noise input [1, 3, H, W]: a fingerprint of its weights that
    does not depend on the file format or name it was loaded from, so that motifs found on one model are not
    applied to another of the same architecture."""
    x = torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lm.forward(x.to(next(lm.module.parameters()).device)).float().cpu()[0].numpy().astype(np.float64)
    return out - out.mean()


# p(1 - p) of a ten-output random model's class probability (p ~ 1/10): the scale the effect floor was set at
FLOOR_SCALE_AT = 0.1 * 0.9


def effect_floor(floor_at_ten: float, num_outputs: int) -> float:
    """The effect floor for a model with ``num_outputs`` outputs: ``floor_at_ten`` (set over random-weights
    models with ten outputs) x max(1, p(1 - p) / 0.09), p = 1 / num_outputs. Why: a random model's class
    probability sits near 1 / C, and a probability moves by about p(1 - p) per unit of logit, so the same random
    perturbation moves it up to 2.8x as far with two outputs (0.25 / 0.09): a random two-output model's
    class-specific unit reached 0.051 on planted text (RESULTS "Calibration by output count"). Never lowered:
    with more outputs a random model's effects only shrink, while a trained model's need not."""
    p = 1.0 / max(int(num_outputs), 1)
    return floor_at_ten * max(1.0, p * (1 - p) / FLOOR_SCALE_AT)


def unit_families(units: pd.DataFrame) -> pd.Series:
    """Each unit's family (motifs.csv ``family``; files from before it: keypoint, region units region)."""
    if "family" in units:
        return units["family"]
    region = units["kind"].to_numpy() == "region" if "kind" in units else np.zeros(len(units), bool)
    return pd.Series(np.where(region, "region", "keypoint"), index=units.index)


def family_alpha(units: pd.DataFrame, k: int, cfg: CausalConfig) -> float:
    """The level of each family's test in class k: ``shortcut_alpha`` split (Bonferroni) between the claimable
    families class k has candidates in, so the chance of any false claim for the class stays at alpha. Without
    dense words a class has one family and the whole alpha."""
    own = units[units["cls"] == k] if len(units) else units
    n = len(set(unit_families(own)) & set(CLAIMABLE_FAMILIES)) if len(own) else 0
    return cfg.shortcut_alpha / max(n, 1)


def shortcut_candidates(units: pd.DataFrame, k: int, cfg: CausalConfig, alpha: float | None = None,
                        sufficiency: bool = True) -> pd.DataFrame:
    """Class k's units that may be applied as a shortcut: a claimable family, an effect above
    ``shortcut_min_effect``, with a null causal_p (against its family's null) <= ``alpha`` (default:
    ``family_alpha``, from all of ``units``), and either

    - class-specific: f_in >= ``shortcut_specificity`` x f_out ("frequent within one class, rare elsewhere"), or
    - (``sufficiency``, where the transplant check ran) enough on its own: sufficiency_lo >=
      ``shortcut_sufficiency``: pasted into other classes' images it raises the class probability by that much
      more than as many random tokens. A frame's colours are in many images of every class, so its unit is not
      specific, yet the model follows it into any image (held-out round 7: +0.16 and +0.21 at the lower bound;
      every unit of the bundled model on clean Imagenette <= 0.032, RESULTS.md dev round 9).

    The label-permutation p alone is not enough: on a trained model any unit that carries some of the evidence
    lowers p_k more in class k's images (where p_k is high) than in others', so generic units get small p too
    (docs/CHOICES.md)."""
    sub = _significant(units, k, cfg, family_alpha(units, k, cfg) if alpha is None else alpha)
    ok = is_specific(sub, cfg)
    if sufficiency and cfg.claim_sufficiency > 0 and "sufficiency_lo" in sub:
        ok |= sub["sufficiency_lo"] >= cfg.claim_sufficiency
    return sub[ok]


def sufficiency_candidates(units: pd.DataFrame, k: int, cfg: CausalConfig) -> list[int]:
    """Unit indices of class k the transplant check tests: its claimable units (before any sufficiency rule) and
    the top ``transplant_units`` of each claimable family with an effect above the floor and causal_p <=
    ``family_alpha``, class-specific or not."""
    sig = _significant(units, k, cfg, family_alpha(units, k, cfg))
    top = by_effect(sig).groupby(unit_families(sig), sort=False).head(cfg.transplant_units)
    specific = sig[is_specific(sig, cfg)]
    return sorted(set(top["unit_index"].tolist()) | set(specific["unit_index"].tolist()))


def claimed_units(units: pd.DataFrame, k: int, cfg: CausalConfig) -> pd.DataFrame:
    """Class k's shortcut claims as ``ShortcutSet.select`` applies them: the ``top_shortcuts`` candidates of
    largest effect of each family (a scene colour and a watermark both), less the dense ones that ``dense_set_aside``
    drops."""
    top = _top_candidates(units, k, cfg)
    return top[~dense_set_aside(top, cfg)]


def _top_candidates(units: pd.DataFrame, k: int, cfg: CausalConfig) -> pd.DataFrame:
    sub = by_effect(shortcut_candidates(units, k, cfg))
    return sub.groupby(unit_families(sub), sort=False).head(cfg.top_shortcuts)


def dense_set_aside(claims: pd.DataFrame, cfg: CausalConfig) -> pd.Series:
    """Per claim of one class: a dense claim that removes less than ``dense_over_keypoint`` x the class's best
    keypoint claim's effect (the smaller, keypoint removal is applied alone); False where the class has no
    keypoint claim or the rule is off."""
    fam = unit_families(claims)
    keypoint = claims.loc[fam == "keypoint", "causal_effect"]
    if not len(keypoint) or cfg.dense_over_keypoint <= 0:
        return pd.Series(False, index=claims.index)
    return (fam == "dense") & (claims["causal_effect"] < cfg.dense_over_keypoint * keypoint.max())


def _significant(units: pd.DataFrame, k: int, cfg: CausalConfig, alpha: float) -> pd.DataFrame:
    """Class k's units of a claimable family with a positive effect above ``shortcut_min_effect`` and, with a
    null, causal_p <= ``alpha``: what a claim needs before specificity or sufficiency."""
    if not len(units):
        return units
    sub = units[(units["cls"] == k) & unit_families(units).isin(CLAIMABLE_FAMILIES)
                & (units["causal_effect"] > max(cfg.shortcut_min_effect, 0.0))]
    return sub[sub["causal_p"] <= alpha] if cfg.n_null > 0 and len(sub) else sub


def _specific_units(units: pd.DataFrame, k: int, cfg: CausalConfig) -> pd.DataFrame:
    """Class k's units with an effect (removing them lowers p_k on average) that are class-specific (f_in >=
    ``shortcut_specificity`` x f_out), before the effect floor and any significance test."""
    if not len(units):
        return units
    return units[(units["cls"] == k) & (units["causal_effect"] > 0) & is_specific(units, cfg)]


def is_specific(units: pd.DataFrame, cfg: CausalConfig) -> pd.Series:
    """Per unit: class-specific, in >= ``shortcut_specificity`` x as large a share of its class's images as of the
    others' (f_in, f_out; NaN for region units: never)."""
    return units["f_in"] >= cfg.shortcut_specificity * units["f_out"]


FAMILY_LABELS = {"keypoint": "keypoint units", "dense": "dense (per-token) units"}


def shortcut_verdict(units: pd.DataFrame, k: int, cfg: CausalConfig) -> str:
    """One line for a user: is a shortcut claimed for class k, which unit, and if not, why not; with dense
    words, one verdict per family (each is tested at ``family_alpha``)."""
    own = units[units["cls"] == k] if len(units) else units
    if not len(own):
        return "no shortcut claimed: no candidate unit"
    fams = [f for f in CLAIMABLE_FAMILIES if (unit_families(own) == f).any()]
    alpha = family_alpha(units, k, cfg)
    if len(fams) <= 1:
        return _family_verdict(own, k, cfg, alpha)
    return "; ".join(f"{FAMILY_LABELS[f]}: {_family_verdict(own[unit_families(own) == f], k, cfg, alpha)}"
                     for f in fams) + f" (alpha {cfg.shortcut_alpha:g} split between the two families)" + \
        _set_aside_words(units, k, cfg)


def _set_aside_words(units: pd.DataFrame, k: int, cfg: CausalConfig) -> str:
    """Class k's dense claim that is not applied (``dense_set_aside``) in words; '' where none is."""
    top = _top_candidates(units, k, cfg)
    aside = top[dense_set_aside(top, cfg)]
    if not len(aside):
        return ""
    kp = top[unit_families(top) == "keypoint"].sort_values("causal_effect").iloc[-1]
    d = aside.iloc[0]
    return (f"; the dense claim {d['unit']} is not applied: it removes {d['causal_effect']:.3f} of the class "
            f"probability, less than {cfg.dense_over_keypoint:g}x the keypoint claim {kp['unit']}'s "
            f"{kp['causal_effect']:.3f}, so flag and prompt use the smaller keypoint removal alone")


def _sufficiency_words(r: pd.Series) -> str:
    """The transplant check of a claimed unit (transplant.py) in words; '' where it was not run."""
    if not np.isfinite(r.get("sufficiency", np.nan)):
        return ""
    ci = f"[{r['sufficiency_lo']:+.3f}, {r['sufficiency_hi']:+.3f}]"
    return (f"; pasted into {int(r['transplant_n'])} other classes' images it raises the class probability by "
            f"{r['transplant_rise']:.3f} ({r['sufficiency']:+.3f} {ci} over as many random tokens of the same images) "
            f"and makes {r['transplant_flip']:.0%} of them this class")


def _family_verdict(own: pd.DataFrame, k: int, cfg: CausalConfig, alpha: float) -> str:
    """The verdict for class k's units ``own`` (one family, or all of the class's units), tested at ``alpha``."""
    own = own.sort_values("causal_rank")
    chosen = by_effect(shortcut_candidates(own, k, cfg, alpha))  # what ShortcutSet.select takes
    if len(chosen):
        r = chosen.iloc[0]
        return (f"shortcut claimed: {r['unit']} (causal rank {int(r['causal_rank'])}, effect {r['causal_effect']:.3f}, "
                f"p={r['causal_p']:.3f}, in {r['f_in']:.0%} of the class's images vs {r['f_out']:.0%} of the others')"
                + _sufficiency_words(r))
    words = own[own["kind"] != "region"]
    specific = _specific_units(own, k, cfg).sort_values("causal_rank")  # regions have no frequency: never here
    large = specific[specific["causal_effect"] > cfg.shortcut_min_effect]
    if not len(specific):
        t = words.iloc[0] if len(words) else own.iloc[0]
        freq = (f"; the top one, {t['unit']}, is in {t['f_in']:.0%} of the class's images and {t['f_out']:.0%} of "
                "the others'" if np.isfinite(t["f_in"]) else "")
        return (f"no shortcut claimed: no unit with an effect is class-specific (>= {cfg.shortcut_specificity:g}x as "
                f"frequent in the class as elsewhere){freq}{_not_enough(own, k, cfg, alpha)}. A small causal_p alone "
                "only says a unit carries some of the class's evidence, as generic texture does in a model trained on "
                "clean data")
    if not len(large):
        top = specific.sort_values("causal_effect", ascending=False).iloc[0]
        return (f"no shortcut claimed: no class-specific unit lowers the class probability by more than the effect "
                f"floor {cfg.shortcut_min_effect:.3g} (largest: {top['unit']}, {top['causal_effect']:.4f}); effects "
                "this small are also found on random-weights models (docs/CHOICES.md)")
    best = large.iloc[0]
    return (f"no shortcut claimed: the class-specific units are not significant (best {best['unit']}, "
            f"p={best['causal_p']:.3f} > {alpha:g})")


def _not_enough(own: pd.DataFrame, k: int, cfg: CausalConfig, alpha: float) -> str:
    """Why no unspecific unit is claimed as sufficient: the best transplant result among the significant units
    above the effect floor, '' where none was tested."""
    if cfg.claim_sufficiency <= 0 or "sufficiency_lo" not in own:
        return ""
    sig = _significant(own, k, cfg, alpha)
    sig = sig[sig["sufficiency_lo"].notna()]
    if not len(sig):
        return ""
    best = sig.loc[sig["sufficiency_lo"].idxmax()]
    return (f"; nor enough on its own (sufficiency lower bound >= {cfg.claim_sufficiency:g}; best {best['unit']}: "
            f"{best['sufficiency']:+.3f} [{best['sufficiency_lo']:+.3f}, {best['sufficiency_hi']:+.3f}])")


def _malformed_fields(d: dict) -> str:
    """The first field of a shortcuts.json (all keys present) that cannot be applied as written, or ''.
    Without this an edited file fails deep in a run, or silently never matches (a word no centroid has)."""
    from .discover import descriptor_dim

    def ints(v, lo: int, hi: int) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and lo <= t < hi for t in v)

    def numbers(v, n: int) -> bool:
        return isinstance(v, list) and len(v) == n and all(isinstance(t, (int, float)) and np.isfinite(t) for t in v)

    grid, weights = d["model"].get("grid"), d["descriptor_weights"]
    if not ints(grid, 1, 1 << 20) or len(grid) != 2:
        return f"model.grid {grid!r}, not [rows, columns]"
    if not numbers(weights, 2) or min(weights) < 0:
        return f"descriptor_weights {weights!r}, not two non-negative numbers"
    try:
        cen = np.asarray(d["centroids"], np.float64)
    except (ValueError, TypeError):  # ragged rows, or not numbers
        return "centroids that are not a table of numbers"
    dim = descriptor_dim(*weights)
    if cen.ndim != 2 or not len(cen) or cen.shape[1] != dim:
        return f"centroids of shape {list(cen.shape)}, not [words, {dim}] (the width descriptor_weights {weights} give)"
    if not isinstance(d["layers"], list) or not all(isinstance(layer, int) for layer in d["layers"]):
        return f"layers {d['layers']!r}, not a list of layer indices"
    n_layers = d["model"].get("num_layers")
    if isinstance(n_layers, int) and not ints(d["layers"], -n_layers, n_layers):
        return f"layers {d['layers']!r}, not layers of its model's {n_layers} attention layers"
    if not isinstance(d["units"], list) or not all(isinstance(u, dict) for u in d["units"]):
        return "units that are not a list of objects"
    n_tokens, n_words, n_classes = grid[0] * grid[1], len(cen), len(d["class_names"])
    for j, u in enumerate(d["units"]):
        where = f"units[{j}] ({u.get('unit')})"
        if not ints([u["cls"]], 0, n_classes):
            return f"{where} cls {u['cls']!r}, not a class index below {n_classes}"
        if not ints(u["tokens"], 0, n_tokens) or not u["tokens"]:
            return f"{where} tokens {u['tokens']!r}: not token indices of the {grid[0]}x{grid[1]} grid"
        if not ints([u["word"]] + list(u.get("gate_words") or []), -1 if u["kind"] == "region" else 0, n_words):
            return f"{where} word {u['word']!r} / gate_words {u.get('gate_words')!r}: not among the {n_words} centroids"
        if not all(numbers(u[k], 4) for k in ("box", "gate_box") if k in u):
            return f"{where} box {u['box']!r} / gate_box {u.get('gate_box')!r}: not [x0, y0, x1, y1]"
        for key in ("margin_gain", "together_gain"):
            if key in u and not numbers([u[key]], 1):
                return f"{where} {key} {u[key]!r}: not a finite number"
    casts = d.get("casts", [])  # files before colour casts: none
    if not isinstance(casts, list) or not all(isinstance(c, dict) for c in casts):
        return "casts that are not a list of objects"
    for j, c in enumerate(casts):
        if not ints([c.get("cls")], 0, n_classes) or not numbers(c.get("cast"), 3):
            return f"casts[{j}] cls {c.get('cls')!r} / cast {c.get('cast')!r}: not a class index and 3 numbers"
    if d.get("cast_removal", "grey_world") not in CAST_REMOVALS:
        return f"cast_removal {d.get('cast_removal')!r}, not one of {', '.join(CAST_REMOVALS)}"
    return ""


@dataclass
class ShortcutSet:
    """The discovered shortcut units and what is needed to find them in new images (shortcuts.json)."""

    model: dict  # name, input_size [H, W], patch_size, grid [h, w], num_classes
    class_names: list[str]
    layers: list[int]
    centroids: np.ndarray  # [W, D]
    descriptor_weights: tuple[float, float]
    units: list[dict]  # cls, class_name, unit, kind, word, tokens, causal_effect, causal_p, box
    # class k (``class_names[k]``, a unit's ``cls``) is model output output_index[k] (siftlens.label_map); files
    # written before it was stored: output k
    output_index: list[int] | None = None
    dense_words: int = 0  # the last this many centroids are dense words (per-token descriptors; 0: none)
    dense_gradient_weight: float = 1.0  # their descriptors' SIFT part (0: colour alone; files before it: 1)
    # claimed colour casts (cast.py): cls, class_name, cast [3] (the class's colour beyond the classes' mean colour,
    # in the normalised input space), cast_effect, cast_sufficiency; files before them: none
    casts: list[dict] = field(default_factory=list)
    cast_removal: str = "grey_world"  # how the casts are removed (cast.CAST_REMOVALS; files before levels: grey world)
    # what removing a present dense words unit masks (DENSE_REMOVALS; a run option, not stored): "found", the tokens
    # where its words are in this image; "with_discovery_tokens", those and the tokens that held its evidence in the
    # class's discovery images (a frame's border tokens whose mean colour falls outside the words here)
    dense_removal: str = "found"
    # where a present fixed-token dense unit is tested (DENSE_TOKEN_TESTS; a run option, not stored): "where_found"
    # (the default since held-out round 45), only where its words fill DENSE_PRESENCE of its tokens, as a dense
    # words unit; "always" (before), in every image the removal test covers (present_units' token_units="always").
    # Dense words are computed at every token, so an image without them has none of the unit's colour: removing its
    # tokens there (up to a whole border) takes object evidence, and the gate keeps whichever removal changes the
    # prediction (dev session 38: a text's 17-token border colour unit was the removal in 67 of 158 steered aligned
    # images; held-out round 45: a text's training-mix average +5.4 points)
    dense_token_test: str = "where_found"
    # where the dense descriptors' colour is read (discover.DENSE_COLOURS; files before it: the token's mean)
    dense_colour: str = "mean"

    @classmethod
    def select(cls, lm: LoadedModel, causal: CausalResult, centroids: np.ndarray, descriptor_weights,
               class_names: list[str], layers: list[int], input_hw: tuple[int, int], cfg: CausalConfig,
               num_outputs: int | None = None, output_index: list[int] | None = None,
               dense_words: int = 0, dense_gradient_weight: float = 1.0, dense_colour: str = "mean") -> ShortcutSet:
        layout = lm.layout(input_hw)
        cell = layout.cell(input_hw)
        chosen = []
        df = causal.units
        for k in range(len(class_names)):
            for r in claimed_units(df, k, cfg).itertuples():
                chosen.append({"cls": int(k), "class_name": class_names[k], "unit": r.unit, "kind": r.kind,
                               "family": str(getattr(r, "family", "keypoint")),
                               "word": int(r.word), "tokens": [int(t) for t in str(r.tokens).split()],
                               "gate_words": [int(w) for w in str(r.gate_words).split()],
                               "causal_effect": float(r.causal_effect), "causal_p": float(r.causal_p),
                               "box": [float(r.box_x0), float(r.box_y0), float(r.box_x1), float(r.box_y1)],
                               # where a word is looked for in a new image: all its evidence tokens, not only
                               # the main place the box reports; a word set anywhere, as it was removed
                               "gate_box": [0.0, 0.0, 1.0, 1.0] if r.kind == "words" else
                               list(token_box([int(t) for t in str(r.tokens).split()], layout.grid, cell))})
        model = {"name": lm.name, "input_size": list(input_hw), "patch_size": int(layout.patch_size),
                 "grid": list(layout.grid), "num_classes": int(num_outputs or len(class_names)),
                 "num_layers": int(lm.num_layers), "prefix_tokens": list(layout.prefix_names),
                 "output_probe": output_probe(lm, input_hw).tolist()}
        return cls(model, list(class_names), list(layers), np.asarray(centroids, np.float64),
                   tuple(map(float, descriptor_weights)), chosen,
                   [int(j) for j in (output_index if output_index is not None else range(len(class_names)))],
                   int(dense_words), float(dense_gradient_weight), dense_colour=dense_colour)

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
                "class_names": self.class_names, "layers": self.layers,
                "descriptor_weights": list(self.descriptor_weights), "centroids": self.centroids.tolist(),
                "units": self.units, "output_index": self.class_outputs(), "dense_words": self.dense_words,
                "dense_gradient_weight": self.dense_gradient_weight, "casts": self.casts,
                "cast_removal": self.cast_removal, "dense_colour": self.dense_colour}

    def class_outputs(self) -> list[int]:
        """Model output of each class (output k where the file predates the stored mapping)."""
        return list(self.output_index) if self.output_index is not None else list(range(len(self.class_names)))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, motifs: str | Path) -> ShortcutSet:
        """From a `siftlens spurious` output folder (or its shortcuts.json); one-line errors for old/foreign files."""
        p = Path(motifs)
        f = p / "shortcuts.json" if p.is_dir() else p
        if not f.is_file():
            old = " (it has shortcut_words.npz: written by an older siftlens; run `siftlens spurious` again)" \
                if (p / "shortcut_words.npz").is_file() else ""
            if _no_causal_run(p):  # today's runs write shortcut_words.npz too
                old = " (the run was made with --no-causal, which selects no shortcuts; run `siftlens spurious` " \
                      "without it)"
            raise ShortcutFileError(f"--motifs {motifs}: no shortcuts.json{old}")
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json is not a siftlens shortcuts file")
        if d.get("format_version") != FORMAT_VERSION:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json has format version {d.get('format_version')}, "
                                    f"this siftlens reads version {FORMAT_VERSION}; run `siftlens spurious` again")
        lacking = [k for k in REQUIRED_KEYS if k not in d]
        lacking += [f"model.{k}" for k in REQUIRED_MODEL_KEYS if k not in (d.get("model") or {})]
        units = d.get("units") if isinstance(d.get("units"), list) else []
        lacking += sorted({f"units[].{k}" for u in units for k in REQUIRED_UNIT_KEYS if k not in u})
        if lacking:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json lacks {', '.join(lacking)} (an incomplete or "
                                    "edited file, or one from an older siftlens); run `siftlens spurious` again")
        bad = _malformed_fields(d)
        if bad:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json has {bad} (an edited or damaged file); run "
                                    "`siftlens spurious` again")
        index = d.get("output_index")
        if index is not None and (not isinstance(index, list) or len(index) != len(d["class_names"])
                                  or not all(isinstance(j, int) and j >= 0 for j in index)):
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json's output_index is not one output index per "
                                    "class (an edited file?); run `siftlens spurious` again")
        dense = d.get("dense_words", 0)  # files before dense words: none
        if not (isinstance(dense, int) and 0 <= dense < len(d["centroids"])):
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json's dense_words {dense!r} is not a count below "
                                    f"its {len(d['centroids'])} centroids (an edited file?); run `siftlens spurious` "
                                    "again")
        gradient = d.get("dense_gradient_weight", 1.0)  # files before it: dense words with their SIFT part
        if isinstance(gradient, bool) or not (isinstance(gradient, (int, float)) and 0 <= gradient < math.inf):
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json's dense_gradient_weight {gradient!r} is not "
                                    "a weight >= 0 (an edited file?); run `siftlens spurious` again")
        colour = d.get("dense_colour", "mean")  # files before it: the token's mean colour
        if colour not in DENSE_COLOURS:
            raise ShortcutFileError(f"--motifs {motifs}: shortcuts.json's dense_colour {colour!r} is not one of "
                                    f"{', '.join(DENSE_COLOURS)} (an edited file, or one from a newer siftlens?); run "
                                    "`siftlens spurious` again")
        return cls(d["model"], d["class_names"], d["layers"], np.asarray(d["centroids"], np.float64),
                   tuple(d["descriptor_weights"]), d["units"], index, dense, float(gradient), d.get("casts", []),
                   d.get("cast_removal", "grey_world"), dense_colour=colour)

    def check_model(self, lm: LoadedModel, num_classes: int | None, source_name: str = ""):
        """One-line error when the shortcuts were discovered on another model (or whose outputs the run's classes
        are not, see ``label_map``); the ``LabelMap`` of the run's classes on ``lm`` when ``num_classes`` is given."""
        layout = lm.layout(tuple(lm.preprocess.input_size))
        here = {"input_size": list(lm.preprocess.input_size), "patch_size": int(layout.patch_size),
                "grid": list(layout.grid)}
        for key, val in here.items():
            if list(np.atleast_1d(self.model[key])) != list(np.atleast_1d(val)):
                raise ShortcutFileError(f"--motifs {source_name}: discovered on a model with {key} {self.model[key]}, "
                                        f"but --model {lm.name} has {key} {val}: motifs from another model")
        # files before num_layers / prefix_tokens were stored: the layers they mask must at least exist
        if max(self.layers, default=-1) >= lm.num_layers or min(self.layers, default=0) < -lm.num_layers or \
                self.model.get("num_layers", lm.num_layers) != lm.num_layers:
            raise ShortcutFileError(f"--motifs {source_name}: discovered on a model with "
                                    f"{self.model.get('num_layers', f'at least {max(self.layers) + 1}')} attention "
                                    f"layers, but --model {lm.name} has {lm.num_layers}: motifs from another model")
        prefix = list(layout.prefix_names)
        if self.model.get("prefix_tokens", prefix) != prefix:
            raise ShortcutFileError(f"--motifs {source_name}: discovered on a model with prefix tokens "
                                    f"{self.model['prefix_tokens']}, but --model {lm.name} has {prefix}: motifs from "
                                    "another model")
        if num_classes is not None and num_classes != self.model["num_classes"]:
            raise ShortcutFileError(f"--motifs {source_name}: discovered on a model with {self.model['num_classes']} "
                                    f"classes, but --model {lm.name} has {num_classes}: motifs from another model")
        probe = self.model.get("output_probe")  # files before it was stored: not checked
        if probe is not None:
            there, here = np.asarray(probe, np.float64), output_probe(lm, tuple(self.model["input_size"]))
            gap = float(np.abs(there - here).max()) if there.shape == here.shape else float("inf")
            if gap > PROBE_RTOL * max(float(there.std()), 1e-6):
                raise ShortcutFileError(
                    f"--motifs {source_name}: discovered on a model whose outputs on a fixed probe input differ from "
                    f"--model {lm.name}'s (largest gap {gap:.3g}, {there.std():.3g} spread): the same architecture "
                    "with other weights, i.e. motifs from another model; run `siftlens spurious` on this model")
        return self.label_map(lm, num_classes, source_name) if num_classes is not None else None

    def label_map(self, lm: LoadedModel, num_outputs: int, source_name: str = ""):
        """The run's classes matched to ``lm``'s outputs as `spurious` matched them (``siftlens.label_map``); a
        one-line error where ``lm`` names its outputs otherwise than the model the motifs were found on."""
        from ..label_map import LabelMap, map_labels

        stored = self.class_outputs()
        try:
            here = map_labels(lm, self.class_names, num_outputs, f"--motifs {source_name}")
        except UserValueError as e:
            raise ShortcutFileError(str(e)) from None
        if here.output_index != stored:
            diff = next(k for k, (a, b) in enumerate(zip(stored, here.output_index)) if a != b)
            raise ShortcutFileError(
                f"--motifs {source_name}: class {self.class_names[diff]!r} was model output {stored[diff]} where the "
                f"motifs were found, but is output {here.output_index[diff]} of --model {lm.name}"
                + ("" if self.output_index is not None else " (a file from before labels were matched to outputs by "
                   "name; run `siftlens spurious` again)") + ": motifs from another model")
        return LabelMap(stored, here.by_name, num_outputs, list(self.class_names), here.display, here.note)

    def present_units(self, lm: LoadedModel, x: torch.Tensor, token_units: str = "gated",
                      info: dict | None = None, margin_below: int = 0, pred: Sequence[int] | None = None
                      ) -> list[list[tuple[int, np.ndarray]] | None]:
        """Per image of a batch: [(unit index, bool mask [n])] of the shortcut units present in it, each mask what
        removing the unit masks (with ``margin_below``: a mask of at most that many tokens grown by its 8
        neighbours, ``with_margin``);
        None for an image without SIFT keypoints where no unit can be tested. ``token_units="always"``:
        a fixed-token unit is listed for every image (tested by removal, keypoints or not; where no cue
        sits there, removing it moves nothing), for scores that do not need SIFT to have seen the cue (a dense one
        only where found when ``dense_token_test`` is "where_found").
        ``info["no_keypoints"]``: the batch positions of images without SIFT keypoints; ``info["keypoints"]``:
        each batch position's keypoints (reused by the flag's window occlusion); ``info["found"]``: per batch
        position, the units found by their words there (what ``"gated"`` lists; ``"always"`` lists more);
        ``info["in_place"]``: those of them found in their place (a dense unit: its words fill
        ``DENSE_IN_PLACE`` of its own tokens; any other found unit is looked for near its place already).
        ``pred``: each image's predicted model output; a placed colour cast (placed_cast.py) is listed only for
        images predicted as its class (and never without ``pred``): a background's place is every class's."""
        from .discover import image_descriptors

        if token_units not in ("gated", "always"):
            raise UserValueError(f"token_units {token_units!r} is not 'gated' or 'always'")
        layout = lm.layout(tuple(x.shape[-2:]))
        grid, p, n = layout.grid, layout.patch_size, layout.num_patches
        ch, cw = layout.cell(tuple(x.shape[-2:]))
        out: list = []
        detected_words = len(self.centroids) - self.dense_words
        superseded = self.superseded_by_casts()
        outputs = self.class_outputs()
        placed = {j: outputs[int(u["cls"])] for j, u in enumerate(self.units) if u.get("family") == PLACED_FAMILY}
        for b in range(len(x)):
            # placed casts of classes other than the predicted one: not tested here
            skip = superseded | {j for j, o in placed.items() if pred is None or o != int(pred[b])}
            _, kp, desc, dense = image_descriptors(lm, x[b], *self.descriptor_weights, dense=self.dense_words > 0,
                                                   dense_gradient_weight=self.dense_gradient_weight,
                                                   dense_colour=self.dense_colour)
            if info is not None:
                info.setdefault("keypoints", {})[b] = kp
                info.setdefault("found", {})[b] = set()
                info.setdefault("in_place", {})[b] = set()
                if not len(desc):  # no SIFT keypoint (dense words, if any, are still looked for)
                    info.setdefault("no_keypoints", []).append(b)
            if not len(desc) and dense is None:
                always = [(j, self.removal(j, token_mask(u["tokens"], n), grid, margin_below))
                          for j, u in enumerate(self.units)
                          if (u["kind"] == "token" or u.get("family") == PLACED_FAMILY) and j not in skip
                          and token_units == "always"]
                out.append(always or None)
                continue
            xy, size = kp.xy, kp.size
            words = (vq(desc.astype(np.float64), self.centroids[:detected_words])[0] if len(desc)
                     else np.zeros(0, np.int32))
            if dense is not None:
                xy, size = np.concatenate([xy, dense[0]]), np.concatenate([size, dense[1]])
                words = np.concatenate([words, self.dense_word_ids(dense[2])])
            found = []
            col = np.clip((xy[:, 0] // p).astype(int), 0, grid[1] - 1)
            row = np.clip((xy[:, 1] // p).astype(int), 0, grid[0] - 1)
            token = row * grid[1] + col
            for j, u in enumerate(self.units):
                if j in skip:
                    continue
                gate = u.get("gate_words") or [u["word"]]
                hit = np.isin(words, gate)
                # a dense word sits at every token, so one token holding it by chance is no sign of the cue:
                # a dense unit is present where its words fill at least half of its tokens
                dense_unit = min(gate) >= detected_words
                need = max(1, math.ceil(DENSE_PRESENCE * len(u["tokens"]))) if dense_unit else 1
                if u["kind"] in ("word", "words"):
                    # where the word's evidence was found (its box grown by one token): a fixed cue's word
                    # is looked for near its place, a moving cue's box is wide
                    x0, y0, x1, y1 = u.get("gate_box", u["box"])  # files before gate_box: box was all of it
                    hit &= (col >= x0 / cw - 1) & (col < x1 / cw + 1) & (row >= y0 / ch - 1) & (row < y1 / ch + 1)
                    cover = keypoint_cover(xy[hit], size[hit], grid, p)
                    if hit.any() and cover.sum() >= need:
                        own = token_mask(u["tokens"], n)
                        if info is not None:
                            info["found"][b].add(j)
                            if not dense_unit or fills_its_tokens((cover & own).sum(), own.sum()):
                                info["in_place"][b].add(j)
                        if dense_unit and self.dense_removal == "with_discovery_tokens":
                            cover = cover | own
                        found.append((j, cover))
                    elif token_units == "always" and u["tokens"] and not dense_unit:
                        # not found here (SIFT misses a watermark's word in most images): its evidence tokens,
                        # where it sat in the class's images, are tested by removal instead. Dense words are
                        # computed at every token, never missed: a dense unit absent here is absent
                        found.append((j, token_mask(u["tokens"], n)))
                else:
                    m = token_mask(u["tokens"], n)
                    # gated: a gate word's keypoint centre in its tokens (dense: in half of them)
                    held = len(np.intersect1d(token[hit], np.flatnonzero(m)))
                    seen = held >= need
                    tested_anyway = token_units == "always" and not (dense_unit and
                                                                     self.dense_token_test == "where_found")
                    if tested_anyway or seen:
                        found.append((j, m))
                    if seen and info is not None:
                        info["found"][b].add(j)
                        if not dense_unit or fills_its_tokens(held, m.sum()):
                            info["in_place"][b].add(j)
            out.append([(j, self.removal(j, m, grid, margin_below)) for j, m in found])
        return out

    def superseded_by_casts(self) -> set[int]:
        """Indices of the colour-only units (``colour_only``) of classes with a claimed colour cast: not applied, the
        cast is. Such a unit is the cast seen token by token, and removing its tokens takes the object's colours too:
        on two dev tints (session 20) flag and gate with both steered aligned images to 0.02-0.11 (the cue-removed
        twin: 0.28-0.37), with the cast alone to 0.21-0.34 (RESULTS.md, dev round 17)."""
        cast_classes = {int(c["cls"]) for c in self.casts}
        return {j for j, u in enumerate(self.units) if int(u["cls"]) in cast_classes and self.colour_only(u)}

    def cast_tests(self, pred: Sequence[int]) -> list[tuple[int, int]]:
        """(batch position b, cast index c) for each image b whose predicted model output ``pred[b]`` is a class with
        a claimed colour cast: where flag and the counterfactual gate test the cast's removal (``cast_removal``)."""
        outputs = self.class_outputs()
        by_output = {outputs[int(c["cls"])]: i for i, c in enumerate(self.casts)}
        return [(b, by_output[int(o)]) for b, o in enumerate(pred) if int(o) in by_output]

    def removal(self, j: int, mask: np.ndarray, grid: tuple[int, int], margin_below: int) -> np.ndarray:
        """What removing unit j masks where it sits at ``mask`` [n]: ``with_margin`` where its discovery measured a
        margin gain of at least ``MARGIN_MIN_GAIN`` (a unit without ``margin_gain`` — older files, units of more than
        ``REMOVAL_MARGIN_BELOW`` tokens — by ``margin_below`` alone), else ``mask``."""
        return with_margin(mask, grid, margin_below) if self.runs_past_its_tokens(j) else mask

    def runs_past_its_tokens(self, j: int) -> bool:
        """Whether unit j may be grown: its discovery measured a margin gain of at least ``MARGIN_MIN_GAIN`` (a unit
        without ``margin_gain`` — older files, units of more than ``REMOVAL_MARGIN_BELOW`` tokens — may)."""
        return self.units[j].get("margin_gain", np.inf) >= MARGIN_MIN_GAIN

    def spreads(self, output: int) -> bool:
        """Whether the cue of the class predicted as model ``output`` spreads over the other classes' shortcut places:
        its discovery measured a ``together_gain`` of at least ``TOGETHER_MIN_GAIN`` (files without one: never)."""
        outputs = self.class_outputs()
        return any(u.get("together_gain", -np.inf) >= TOGETHER_MIN_GAIN for u in self.units
                   if outputs[int(u["cls"])] == int(output))

    def spread_note(self, k: int) -> str:
        """Class k's ``together_gain`` in words for a report ('' where it is below ``TOGETHER_MIN_GAIN`` or absent)."""
        gains = [u["together_gain"] for u in self.units if int(u["cls"]) == k and "together_gain" in u]
        if not gains or max(gains) < TOGETHER_MIN_GAIN:
            return ""
        return ("its cue also sits where the other classes' shortcuts sit (removing every shortcut's tokens lowers "
                f"its probability {max(gains):.3f} more than its own tokens with as many random others: a cue that "
                "spreads, e.g. a frame, of which the claim is one part); prompt --gate-together removes every "
                "shortcut at once in its images where no single removal changes the prediction")

    def colour_only(self, u: dict) -> bool:
        """Whether unit ``u`` is defined by a dense word without its SIFT part (``dense_gradient_weight`` 0): a
        token's colour, so a claim on it is a SIFT-free finding and the report says so), or a placed colour cast."""
        return u.get("family") == PLACED_FAMILY or (self.dense_words > 0 and self.dense_gradient_weight == 0
                                                    and int(u["word"]) >= len(self.centroids) - self.dense_words)

    def dense_word_ids(self, descriptors: np.ndarray) -> np.ndarray:
        """Each token's dense word ([n] from its dense descriptors [n, D]), numbered after the detected words."""
        detected = len(self.centroids) - self.dense_words
        return detected + vq(descriptors.astype(np.float64), self.centroids[detected:])[0]

    def masker(self, lm: LoadedModel, gate: str = DEFAULT_GATE, margin_below: int = 0, min_drop: float = GATE_MIN_DROP,
               grow: int = 0, drop: str = DEFAULT_GATE_DROP, together: str = "off", fired_margin: int = 0
               ) -> GatedMasker | CounterfactualMasker:
        """token_mask_fn for gated steering: ``counterfactual`` (the default, as ``siftlens prompt``'s: removing a unit
        changes the prediction and lowers its probability by at least ``min_drop``) or ``presence`` (a unit's words
        found in the image); each unit's removal as ``present_units(margin_below=...)``; ``drop``: ``min_drop`` in
        probability, as a share of the predicted class's probability, or that share only for units SIFT finds by
        their words (anywhere, or in their place: ``GATE_DROPS``; ``CounterfactualMasker``); ``together``: where no
        removal alone changes the prediction, every shortcut at once for a class whose cue spreads (``spreads``;
        ``TOGETHER_MODES``); ``fired_margin``: a fired removal of at most that many tokens is masked with its 8
        neighbours (``CounterfactualMasker``). A counterfactual
        masker also decides colour-cast removals, which are input edits, not token masks: apply them with its
        ``apply_casts`` before steering (as ``siftlens prompt`` does)."""
        if gate not in GATES:
            raise UserValueError(f"gate {gate!r} is not one of {', '.join(GATES)}")
        if drop not in GATE_DROPS:
            raise UserValueError(f"gate drop {drop!r} is not one of {', '.join(GATE_DROPS)}")
        if together not in TOGETHER_MODES:
            raise UserValueError(f"together {together!r} is not one of {', '.join(TOGETHER_MODES)}")
        if gate == "presence":
            return GatedMasker(lm, self, margin_below)
        return CounterfactualMasker(lm, self, margin_below, min_drop, grow, drop, together, fired_margin)


class GatedMasker:
    """token_mask_fn for steering: per image the union of the present shortcut units' tokens (nothing
    where no shortcut is present, so such an image can be left exactly as it is)."""

    def __init__(self, lm: LoadedModel, shortcuts: ShortcutSet, margin_below: int = 0) -> None:
        self.lm, self.shortcuts, self.margin_below = lm, shortcuts, margin_below
        self.last_present: list = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.lm.layout(tuple(x.shape[-2:])).num_patches
        self.last_present = self.shortcuts.present_units(self.lm, x, margin_below=self.margin_below)
        out = torch.zeros(len(x), n, dtype=torch.bool)
        for b, found in enumerate(self.last_present):
            for _, m in found or []:
                out[b] |= torch.from_numpy(m)
        return out


class CounterfactualMasker:
    """token_mask_fn for steering gated by the flag's own test: per image, of the shortcut units that can be tested
    there (fixed-token units everywhere, word units where present: ``present_units(token_units="always")``), the
    one whose removal changes the predicted class, lowering its probability most (and by at least ``min_drop``);
    nothing where no removal does (such an image is left as it is). Label-free, one masked forward per tested unit.
    Where the presence gate needs SIFT to find the cue's words in the image, this needs the prediction to rest on the
    unit's tokens: the right-for-the-wrong-reason test the flag scores. ``margin_below``: the smallest removal that
    does it — a unit's tokens alone first, then, only in images where no removal alone did, the units grown by
    ``ShortcutSet.removal`` (a grown removal also takes object evidence around the unit, so it is used only where
    the unit alone is not enough). ``grow``: in images where no removal alone (nor a grown one) did, the unit whose
    removal alone lowered the predicted class most, if discovery measured a margin gain for it (the cue runs past its
    tokens), is grown one neighbouring token at a time — the neighbour whose removal with it lowers the predicted
    class most, and only while that lowers it ``GROW_MIN_GAIN`` more than the removal so far — up to ``grow`` tokens,
    firing as soon as a removal changes the prediction: a removal that follows the cue's own shape instead of taking
    every neighbour. ``drop="relative"``: ``min_drop`` is a share of the predicted class's probability (0.5: half of
    it), not a probability: a model that also learned the task is less sure of its predictions, and an absolute 0.5
    is then out of reach of many removals that turn a cue's image to its object (RESULTS.md dev round 31d).
    ``drop="relative_where_found"``: that share for a unit SIFT finds by its words in the image
    (``present_units``'s ``"gated"`` test), ``min_drop`` in probability for the others
    (fixed-token units tested without their words seen, colour casts): where SIFT sees the cue a smaller drop is
    enough; elsewhere the removal alone must show it (dev round 32: cue-free images touched 0-6% instead of
    relative's 2-24%, most of its worst-group gain; held-out round 33: 20 of 26 steering lines, absolute 17).
    ``drop="relative_in_place"`` (the default, ``DEFAULT_GATE_DROP``): that share only for a unit found in its place
    (``present_units``'s ``info["in_place"]``: a dense unit whose words fill its own tokens; a colour that matches a
    frame's on one natural border is found by its words but not in its place; held-out round 35: the same steering
    lines as relative_where_found, cue-free images touched 13.8% in total over four runs against 28.5%).
    ``together="spreads"``: in images no removal alone (nor a grown one) changed, predicted as a class whose cue
    spreads over the other classes' shortcut places (``ShortcutSet.spreads``: a frame), every unit tested there
    removed at once, by the same test; its drop is relaxed as ``drop`` relaxes it for a unit of the predicted class
    among them. ``"where_found"``: only in those of the images where it is relaxed (SIFT finds a unit of the
    predicted class there). ``"off"`` by default (``TOGETHER_MIN_GAIN``'s note: held-out round 37).
    ``fired_margin``: once the gate has decided, a fired removal of one unit of at most that many tokens is masked
    with its 8 neighbouring tokens (``with_margin``), the decision unchanged (``last_present`` keeps the removal
    tested): a few tokens that change the prediction are part of a cue the model also reads in the tokens around
    them (dev text: fired removals held 1.9 tokens where the oracle masks about 3, and a text's remainder still read
    as a cue). 0 (the default): the tested removal as it is."""

    def __init__(self, lm: LoadedModel, shortcuts: ShortcutSet, margin_below: int = 0,
                 min_drop: float = GATE_MIN_DROP, grow: int = 0, drop: str = DEFAULT_GATE_DROP,
                 together: str = "off", fired_margin: int = 0) -> None:
        self.lm, self.shortcuts, self.margin_below, self.min_drop = lm, shortcuts, margin_below, min_drop
        self.grow, self.drop, self.together, self.fired_margin = grow, drop, together, fired_margin
        self.found: dict[int, set[int]] = {}  # per image of the batch: the units SIFT found by their words
        self.in_place: dict[int, set[int]] = {}  # ... and of those, the ones found in their place
        self.last_present: list = []
        # batch positions of the images steered by removing a colour cast (cast.py): an input transform (levels or
        # grey world), not a token mask; the caller re-predicts them on the edited image (``apply_casts``)
        self.last_cast: set[int] = set()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.lm.layout(tuple(x.shape[-2:]))
        out = torch.zeros(len(x), layout.num_patches, dtype=torch.bool)
        self.last_present, self.last_cast = [[] for _ in range(len(x))], set()
        if not self.shortcuts.units and not self.shortcuts.casts:
            return out
        device = next(self.lm.module.parameters()).device
        p0 = self.lm.forward(x.to(device)).float().softmax(-1).cpu().numpy()
        info: dict = {}
        alone = [(b, j, m) for b, found in enumerate(self.shortcuts.present_units(self.lm, x, "always", info=info,
                                                                                  pred=p0.argmax(1)))
                 for j, m in found or []]
        self.found, self.in_place = info.get("found", {}), info.get("in_place", {})
        pm = self._fire(x, p0, alone, out, self.shortcuts.cast_tests(p0.argmax(1)))
        if self.margin_below:  # images no removal alone steered: their units grown, where a unit's gain allows
            grown = []
            for b, j, m in alone:
                g = self.shortcuts.removal(j, m, layout.grid, self.margin_below)
                if not self._steered(b, out) and g.sum() > m.sum():
                    grown.append((b, j, g))
            self._fire(x, p0, grown, out)
        if self.together != "off":
            self._fire_together(x, p0, alone, out)
        if self.grow:
            self._grow(x, p0, alone, pm, layout.grid, out)
        if self.fired_margin:
            self._complete(out, layout.grid)
        return out

    def _complete(self, out: torch.Tensor, grid: tuple[int, int]) -> None:
        """``out`` with each fired removal of one unit of at most ``fired_margin`` tokens grown by its 8 neighbours
        (a cast or a removal of several units at once: as it is)."""
        for b, present in enumerate(self.last_present):
            if len(present) == 1 and present[0][1] is not None and not isinstance(present[0][0], tuple):
                out[b] = torch.from_numpy(with_margin(present[0][1], grid, self.fired_margin))

    def _steered(self, b: int, out: torch.Tensor) -> bool:
        return bool(out[b].any()) or b in self.last_cast

    def apply_casts(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, H, W] with the last call's colour-cast removals applied (the shortcuts' ``cast_removal`` on
        ``last_cast``; the other images as they are)."""
        if not self.last_cast:
            return x
        rows = sorted(self.last_cast)
        out = x.clone()
        out[rows] = remove_cast(x[rows], self.lm, self.shortcuts.cast_removal)
        return out

    def _fire(self, x: torch.Tensor, p0: np.ndarray, tested: list, out: torch.Tensor,
              casts: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """Mask each image at its tested removal (b, unit, mask) that changes the prediction with the largest drop
        (``casts``: colour-cast removals (b, cast) tested beside them, ``ShortcutSet.cast_tests``); return the
        tested removals' probabilities [len(tested), K]."""
        from .source import TensorSource

        if not tested and not casts:
            return np.zeros((0, p0.shape[1]))
        pm = (masked_probs(self.lm, TensorSource(x), self.shortcuts.layers, [(b, m) for b, _, m in tested], 64)
              if tested else np.zeros((0, p0.shape[1])))
        pc = (cast_removal_probs(self.lm, x, [b for b, _ in casts], removal=self.shortcuts.cast_removal) if casts
              else pm[:0])
        images = [b for b, _, _ in tested] + [b for b, _ in casts]
        for b, (_, t) in largest_removal(p0, images, np.concatenate([pm, pc]), must_change=True,
                                         min_drop=self._min_drops(p0, tested, casts)).items():
            if t < len(tested):
                _, j, m = tested[t]
                self.last_present[b] = [(j, m)]
                out[b] = torch.from_numpy(m)
            else:
                _, c = casts[t - len(tested)]
                self.last_present[b] = [(("cast", c), None)]
                self.last_cast.add(b)
        return pm

    def _fire_together(self, x: torch.Tensor, p0: np.ndarray, alone: list, out: torch.Tensor) -> None:
        """Per image not steered yet and predicted as a class whose cue spreads: the union of every removal tested
        there (``alone``), as one removal whose unit is the tuple of their units (see the class docstring)."""
        pred = p0.argmax(1)
        units: dict[int, list] = {}
        for b, j, m in alone:
            if not self._steered(b, out) and self.shortcuts.spreads(pred[b]):
                units.setdefault(b, []).append((j, m))
        tested = [(b, tuple(j for j, _ in jm), np.logical_or.reduce([m for _, m in jm]))
                  for b, jm in units.items() if len(jm) > 1]
        if self.together == "where_found":
            tested = [(b, j, m) for b, j, m in tested if self._relaxes(p0, b, j)]
        self._fire(x, p0, tested, out)

    def _min_drops(self, p0: np.ndarray, tested: list, casts: Sequence[tuple[int, int]]) -> np.ndarray:
        """The minimum drop of each tested removal, then of each cast (``drop``; see the class docstring). A removal
        of several units at once (a tuple) is relaxed where one of them of the predicted class is."""
        rows = [(b, j) for b, j, _ in tested] + [(b, None) for b, _ in casts]
        relative = [self._relaxes(p0, b, j) for b, j in rows]
        return np.array([self.min_drop * (p0[b].max() if r else 1.0) for (b, _), r in zip(rows, relative)])

    def _relaxes(self, p0: np.ndarray, b: int, j) -> bool:
        """Whether image b's removal of unit j (a tuple: several units at once; None: a cast) gets the relative drop."""
        if self.drop == "relative":
            return True
        relaxed = {"relative_where_found": self.found, "relative_in_place": self.in_place}.get(self.drop, {})
        if not isinstance(j, tuple):
            return j in relaxed.get(b, ())
        outputs = self.shortcuts.class_outputs()
        return any(u in relaxed.get(b, ()) and outputs[int(self.shortcuts.units[u]["cls"])] == p0[b].argmax()
                   for u in j)

    def _grow(self, x: torch.Tensor, p0: np.ndarray, alone: list, pm: np.ndarray, grid: tuple[int, int],
              out: torch.Tensor) -> None:
        """Per image not steered yet: its best-dropping growable unit (``alone``'s rows of ``pm``), grown greedily
        (see the class docstring)."""
        rows = [i for i, (b, j, m) in enumerate(alone) if not self._steered(b, out) and m.sum() <= REMOVAL_MARGIN_BELOW
                and self.shortcuts.runs_past_its_tokens(j)]
        seeds = largest_removal(p0, [alone[i][0] for i in rows], pm[rows])
        grow = {b: (d, *alone[rows[t]][1:]) for b, (d, t) in seeds.items()}  # image -> (drop so far, unit, mask)
        for _ in range(self.grow):
            tested = [(b, j, m | token_mask([t], m.size)) for b, (_, j, m) in grow.items()
                      for t in np.flatnonzero(with_margin(m, grid, m.size) & ~m)]
            if not tested:
                return
            pm = self._fire(x, p0, tested, out)
            best = largest_removal(p0, [b for b, _, _ in tested], pm)  # the neighbour to keep, fired or not
            # a neighbour is kept only where it takes GROW_MIN_GAIN more of the class: the cue runs on there
            grow = {b: (d, *tested[t][1:]) for b, (d, t) in best.items()
                    if not self._steered(b, out) and d >= grow[b][0] + GROW_MIN_GAIN}


def margin_gains(lm: LoadedModel, source, units: list[dict], layers: list[int], labels: np.ndarray,
                 probs: np.ndarray, grid: tuple[int, int], cfg: CausalConfig, parts: RunParts | None = None,
                 columns: np.ndarray | None = None) -> list[float | None]:
    """Per shortcut unit (a shortcuts.json ``units`` entry) of at most ``REMOVAL_MARGIN_BELOW`` tokens: the mean, over
    its class's sample images (``sample_images``, as the causal ranking draws them), of how much more removing its
    tokens with their 8 neighbours lowers the class probability than removing its tokens alone; None for a larger
    unit (or a class without sample images): no gain measured, ``ShortcutSet.removal`` follows ``margin_below``.
    ``probs`` [N, K]: the run's classes (``columns`` of the outputs, as in causal_discovery)."""
    n = grid[0] * grid[1]
    sample = sample_images(labels, probs.shape[1], cfg.causal_images, cfg.seed)
    jobs, at = [], []  # at: (unit, image, grown?)
    for j, u in enumerate(units):
        alone = token_mask(u["tokens"], n)
        grown = with_margin(alone, grid, REMOVAL_MARGIN_BELOW)
        if grown.sum() == alone.sum():
            continue
        for i in sample[labels[sample] == u["cls"]]:
            jobs += [(int(i), alone), (int(i), grown)]
            at += [(j, int(i), False), (j, int(i), True)]
    pm = masked_probs(lm, source, layers, jobs, cfg.batch_size, parts, "margin", columns)
    drops: dict[tuple[int, bool], list[float]] = {}  # (unit, grown?) -> drop of p_k per image
    for (j, i, grown), q in zip(at, pm):
        k = int(units[j]["cls"])
        drops.setdefault((j, grown), []).append(float(probs[i, k] - q[k]))
    return [float(np.mean(drops[j, True]) - np.mean(drops[j, False])) if (j, True) in drops else None
            for j in range(len(units))]


def together_gains(lm: LoadedModel, source, units: list[dict], layers: list[int], labels: np.ndarray,
                   probs: np.ndarray, n: int, cfg: CausalConfig, parts: RunParts | None = None,
                   columns: np.ndarray | None = None) -> dict[int, float]:
    """Per class with shortcut units (shortcuts.json ``units``), over its sample images (``sample_images``): the mean
    drop of its probability when every unit's tokens (every class's) are removed together, less the mean drop when
    its own units' tokens are removed with as many other tokens drawn at random (``TOGETHER_DRAWS`` draws, each one
    set for all the class's images): what the other classes' shortcut places hold of the class's cue beyond any
    places (``TOGETHER_MIN_GAIN``). A class whose units are every unit's tokens: none. ``probs`` [N, K]: the run's
    classes (``columns`` of the outputs, as in causal_discovery)."""
    union = sorted(set().union(*(u["tokens"] for u in units)))
    sample = sample_images(labels, probs.shape[1], cfg.causal_images, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 29])
    jobs, at = [], []  # at: (class, random?)
    for k in sorted({int(u["cls"]) for u in units}):
        own = sorted(set().union(*(u["tokens"] for u in units if int(u["cls"]) == k)))
        extra = len(union) - len(own)
        if not extra:
            continue
        rest = np.setdiff1d(np.arange(n), own)
        masks = [(False, token_mask(union, n))] + [
            (True, token_mask(own + rng.choice(rest, extra, replace=False).tolist(), n)) for _ in range(TOGETHER_DRAWS)]
        for i in sample[labels[sample] == k]:
            jobs += [(int(i), m) for _, m in masks]
            at += [(k, r) for r, _ in masks]
    pm = masked_probs(lm, source, layers, jobs, cfg.batch_size, parts, "together", columns)
    drops: dict[tuple[int, bool], list[float]] = {}
    for (k, r), (i, _), q in zip(at, jobs, pm):
        drops.setdefault((k, r), []).append(float(probs[i, k] - q[k]))
    return {k: float(np.mean(drops[k, False]) - np.mean(drops[k, True])) for k, r in drops if not r}


def unsupported_shortcut(p0: np.ndarray, images: Sequence[int], outputs: Sequence[int], pm: np.ndarray
                         ) -> dict[int, tuple[float, int]]:
    """Per image b: (score, t) for the removal t (row t of ``pm`` [T, K], a masked forward of image ``images[t]``
    that takes out a shortcut of the class at model output ``outputs[t]`` = o) with the largest
    (p0[b, o] - pm[t, o]) * (1 - pm[t, o]): what the shortcut adds to its class, times how little the image
    without it supports that class. Why beside the predicted class's drop: on a model that also learned the task,
    an image carrying another class's cue is often still predicted right (the cue moves its own class, not the
    prediction, so the predicted class's drop is 0 there), and an aligned image right for the right reason keeps
    its class without the cue (second factor near 0); an image right for the wrong reason scores as under the
    drop. Images without a removal are left out (score 0)."""
    t, o = np.arange(len(pm)), np.asarray(outputs, int)
    q = pm[t, o] if len(pm) else np.zeros(0)
    return best_per_image(images, (p0[np.asarray(images, int), o] - q) * (1.0 - q))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis, the logs of probabilities clipped at 1e-12 (a class with p = 0 adds 0)."""
    return np.sum(p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), -1)


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) along the last axis, the logs clipped at 1e-12 (a class with p = 0 adds 0): the flag's
    label-free baseline beside 1 - max softmax."""
    return -np.sum(p * np.log(np.clip(p, 1e-12, None)), -1)


def largest_kl(p0: np.ndarray, images: Sequence[int], pm: np.ndarray) -> dict[int, tuple[float, int]]:
    """Per image b: (KL(p0[b] || pm[t]), t) for the removal t that moves the whole prediction most (rows of ``pm`` as
    in ``largest_removal``). Unlike the predicted class's drop it also counts a removal that moves a class other
    than the predicted one, such as another class's cue in an image still predicted right."""
    if not len(pm):
        return {}
    return best_per_image(images, kl_divergence(p0[np.asarray(images, int)], pm))


def largest_removal(p0: np.ndarray, images: Sequence[int], pm: np.ndarray, must_change: bool = False,
                    min_drop: np.ndarray | None = None) -> dict[int, tuple[float, int]]:
    """Per image b: (drop, t) for the removal t (row t of ``pm`` [T, K], a masked forward of image ``images[t]``)
    that lowers b's predicted-class probability (``p0`` [B, K]) most, the first of ties; ``must_change``: only
    removals that change the predicted class; ``min_drop`` [T]: only removals whose drop reaches their own minimum
    (images with no such removal are left out). The flag's score and the counterfactual gate both take this unit."""
    if not len(pm):
        return {}
    t, pred = np.arange(len(pm)), p0[np.asarray(images, int)].argmax(1)
    drop = p0[np.asarray(images, int), pred] - pm[t, pred]
    ok = pm.argmax(1) != pred if must_change else np.ones(len(pm), bool)
    if min_drop is not None:
        ok &= drop >= min_drop
    return best_per_image(images, np.where(ok, drop, -np.inf))


def best_per_image(images: Sequence[int], scores: np.ndarray) -> dict[int, tuple[float, int]]:
    """Per image b: (score, t) of the row t with the largest ``scores[t]`` among the rows of b (``images[t]`` = b),
    the first of ties; images whose rows all score -inf are left out."""
    best: dict[int, tuple[float, int]] = {}
    for t, (b, s) in enumerate(zip(images, scores)):
        if s > best.get(int(b), (-np.inf, -1))[0]:
            best[int(b)] = (float(s), t)
    return best
