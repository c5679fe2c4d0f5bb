"""Cue families of the shortcut suite (issue 11, item 4), their parameter pools and the dev/held-out split.

A *variant* is one cue family with its per-class parameters (colours, patterns, positions, characters)
drawn from a pool with the variant's generator seed. Two pools, fixed here and disjoint in every drawn
quantity, separate the **dev** variants (design and tune the method on these) from the **held-out**
variants (generated and run once, after the method is frozen):

=============  ==========================================  ==========================================
quantity       dev pool                                    held-out pool
=============  ==========================================  ==========================================
hues           0, 40, 80, ..., 320 deg (even 20-deg steps)  20, 60, 100, ..., 340 deg (odd steps)
tint hues, 10+ 9, 45, 81, ..., 333 deg (36-deg steps)         27, 63, 99, ..., 351 deg (36-deg steps)
patch shapes   quadrants, triangle, tshape, lshape          twodots, checker3, diamond, square
fixed cells    token cells (r, c) with (r + c) even         cells with (r + c) odd
random band    top, left                                    bottom, right
stripe angle   0, 45, 90, 135 deg; period 1/2 token         22.5, 67.5, 112.5, 157.5 deg; 3/8, 5/8 token
frame width    1 token                                      3/4 token
tint alpha     0.30                                         0.25, 0.35
bg tint radius 0.34 of the side (untinted centre)           0.30, 0.38
text chars     A-M                                          N-Z, 2-9
text corner    top-left, bottom-right                       top-right, bottom-left
text font      HERSHEY_SIMPLEX                              HERSHEY_DUPLEX, HERSHEY_TRIPLEX
gen. seeds     0-99                                         1000-1199
model seeds    0, 1, 2                                      100, 101, 102
=============  ==========================================  ==========================================

``dev_frames`` (session 11): a second dev pool for the stripe frame only, the dev pool with other stripe periods
(0.3, 0.875 token) and frame widths (0.5, 1.25 token), disjoint from both pools above, so that a frame method is
tuned on more than one stripe design before a held-out round (generator seeds 200-299, dev model seeds).
``dev_thin_frames`` (session 33): the dev pool with frame widths 0.3 and 0.45 token (generator seeds 300-399), thin
frames to design on that no held-out pool draws.
``heldout_more`` (session 35): the held-out pool's parameters with generator seeds 1300-1399, for held-out rounds
after round 39 used the held-out pool's last seeds (a variant names it: ``Variant(..., pool="heldout_more")``).

Geometry is in token units ``u = image_size // 8`` (an 8 x 8 token grid: patch 8 at 64 px from scratch,
patch 16 at 128 px for the fine-tuned bundled model), so a variant is the same cue in both settings.
Cells of the fixed-patch family avoid the outer ring of tokens (SIFT finds no keypoints within ~5 px of
the border) and the central 4 x 4 tokens (where the object usually is).

Every renderer returns the image with the cue and the boolean pixel mask of the cue (what changed,
or for the tint the whole image); the cue box in the metadata is the mask's bounding box.

``bg_tint`` (session 22): the tint blended into the *background* only. Imagenette has no object masks, so the
background is approximated as everything outside a centred circle (where the object usually is; its centre jittered
by up to half a token per image, its edge feathered over ~1/20 of the side): the object keeps its colours, only its
surroundings carry the class's tint. Its per-class parameters are the tint's (hue, alpha) and the circle's radius.
(GrabCut from a centred rectangle was tried first: at 96 px it kept 0-12% of the image as foreground, not an object.)
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import cv2
import numpy as np
from planted.build import CUE_COLOURS, PATCH_SHAPES, patch_pattern, texture_pattern

# the families of rounds 1-19 (their variant lists enumerate these, so their generator seeds never move) and all
FIRST_FAMILIES = ("fixed_patch", "random_patch", "stripe_frame", "tint", "text")
FAMILIES = (*FIRST_FAMILIES, "bg_tint")
GRID = 8  # tokens per side in both model settings


@dataclass(frozen=True)
class Pool:
    """What the variants of one half may draw from (see the module docstring)."""

    name: str
    hues: tuple[float, ...]
    shapes: tuple[str, ...]
    cells: tuple[tuple[int, int], ...]
    bands: tuple[str, ...]
    angles: tuple[float, ...]
    periods: tuple[float, ...]  # stripe period in tokens
    frame_widths: tuple[float, ...]  # in tokens
    tint_alphas: tuple[float, ...]
    # a tint's hues where a variant has more classes than ``hues`` (nine): tints must differ by class, so the
    # ten-class benchmarks (the shape) could not draw a tint from nine hues (session 40)
    tint_hues: tuple[float, ...]
    bg_radii: tuple[float, ...]  # the untinted circle's radius of bg_tint, a fraction of the image side
    chars: str
    corners: tuple[str, ...]
    fonts: tuple[int, ...]
    gen_seeds: range
    model_seeds: tuple[int, ...]


def _cells(parity: int) -> tuple[tuple[int, int], ...]:
    """Token cells in rings 1 of the 8 x 8 grid (not the border ring, not the centre 4 x 4) of a parity."""
    ring = [(r, c) for r in range(1, GRID - 1) for c in range(1, GRID - 1)
            if (r in (1, GRID - 2) or c in (1, GRID - 2))]
    return tuple(rc for rc in ring if (rc[0] + rc[1]) % 2 == parity)


def _border_cells(parity: int) -> tuple[tuple[int, int], ...]:
    """Token cells on the border ring of the 8 x 8 grid of a parity (the issue's cues sit "near the border")."""
    ring = [(r, c) for r in range(GRID) for c in range(GRID) if r in (0, GRID - 1) or c in (0, GRID - 1)]
    return tuple(rc for rc in ring if (rc[0] + rc[1]) % 2 == parity)


DEV = Pool("dev", hues=tuple(float(h) for h in range(0, 360, 40)), shapes=("quadrants", "triangle", "tshape", "lshape"),
           cells=_cells(0), bands=("top", "left"), angles=(0.0, 45.0, 90.0, 135.0), periods=(0.5,),
           frame_widths=(1.0,), tint_alphas=(0.30,),
           tint_hues=tuple(9.0 + 36 * i for i in range(10)), bg_radii=(0.34,), chars="ABCDEFGHIJKLM",
           corners=("tl", "br"),
           fonts=(cv2.FONT_HERSHEY_SIMPLEX,), gen_seeds=range(0, 100), model_seeds=(0, 1, 2))
HELDOUT = Pool("heldout", hues=tuple(float(h) for h in range(20, 360, 40)),
               shapes=("twodots", "checker3", "diamond", "square"), cells=_cells(1), bands=("bottom", "right"),
               angles=(22.5, 67.5, 112.5, 157.5), periods=(0.375, 0.625), frame_widths=(0.75,),
               tint_alphas=(0.25, 0.35),
               tint_hues=tuple(27.0 + 36 * i for i in range(10)), bg_radii=(0.30, 0.38),
               chars="NOPQRSTUVWXYZ23456789",
               corners=("tr", "bl"), fonts=(cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX),
               gen_seeds=range(1000, 1200),
               model_seeds=(100, 101, 102))
DEV_FRAMES = replace(DEV, name="dev_frames", periods=(0.3, 0.875), frame_widths=(0.5, 1.25), gen_seeds=range(200, 300))
# a held-out pool for frames thinner than any held out before (session 27): widths 3/8 and 5/8 of a cue token, new to
# both halves; every other quantity as the held-out pool's; generator seeds 1200-1299
HELDOUT_THIN_FRAMES = replace(HELDOUT, name="heldout_thin_frames", frame_widths=(0.375, 0.625),
                              gen_seeds=range(1200, 1300))
# a dev pool of thin frames (session 33): widths 0.3 and 0.45 of a cue token, between none of the held-out pools'
# (3/8, 5/8, 3/4), so that thin frames can be designed on (held-out rounds 35-36: the 3/8 frame's gate fired little);
# every other quantity as the dev pool's; generator seeds 300-399
DEV_THIN_FRAMES = replace(DEV, name="dev_thin_frames", frame_widths=(0.3, 0.45), gen_seeds=range(300, 400))
# the held-out pool's parameters with new generator seeds (session 35: round 39 took its last seeds, 1197-1199)
HELDOUT_MORE = replace(HELDOUT, name="heldout_more", gen_seeds=range(1300, 1400))
# fixed patches on the border ring (session 36): every fixed patch before sat one ring in, where SIFT finds
# keypoints; on the border ring SIFT's margin leaves few. Dev and held-out cells by parity, as the ring-1 pools.
DEV_BORDER_CELLS = replace(DEV, name="dev_border_cells", cells=_border_cells(0), gen_seeds=range(400, 500))
HELDOUT_BORDER_CELLS = replace(HELDOUT, name="heldout_border_cells", cells=_border_cells(1),
                               gen_seeds=range(1400, 1500))
# dev frames between the thin dev frames and the dev pool's (session 36): widths 0.55 and 0.7 of a cue token, near
# the held-out 5/8 frames whose gate touched 10-12% of cue-free images (rounds 37-39) where no dev frame touched more
# than 2%; every other quantity as the dev pool's; generator seeds 500-599
DEV_MID_FRAMES = replace(DEV, name="dev_mid_frames", frame_widths=(0.55, 0.7), gen_seeds=range(500, 600))
POOLS = {"dev": DEV, "heldout": HELDOUT, "dev_frames": DEV_FRAMES, "heldout_thin_frames": HELDOUT_THIN_FRAMES,
         "dev_thin_frames": DEV_THIN_FRAMES, "heldout_more": HELDOUT_MORE, "dev_border_cells": DEV_BORDER_CELLS,
         "heldout_border_cells": HELDOUT_BORDER_CELLS, "dev_mid_frames": DEV_MID_FRAMES}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    split: str  # dev | heldout
    gen_seed: int
    pool: str = ""  # the pool its parameters are drawn from, when not its split's (dev_frames)


# The fixed variant list. Dev: two per family (generator seeds 0-9). Held-out: one per family with new
# generator seeds; not to be generated before the method is frozen (generate.py refuses without
# --frozen-commit). ``heldout2_*`` (session 6): a second held-out round from the same pool with other
# generator seeds (other colours, shapes, cells, angles, characters), for a method changed after the first
# held-out round had been run and read. ``heldout3_*`` (session 8): a third round, same pool, new generator
# seeds, for the method changed after round 2 had been read. ``heldout4_*`` (session 10): a fourth round,
# same pool, new generator seeds, for the dense words designed on dev after round 3 had been read. ``heldout5_*``
# (session 11): a fifth round, same pool, new generator seeds, for the effect floor and colour-heavier dense words.
# ``heldout6_*`` (session 12): a sixth round, same pool, new generator seeds, for the per-family nulls and claims.
# ``heldout7_*`` (session 13): a seventh round, same pool, the last unused generator seed offset, for token units of
# a word's several places (a watermark in one of two corners).
# ``heldout8_*`` (session 14): an eighth round, same pool; every offset of the ``1000 + 7 j + o`` scheme was used, so
# its generator seeds are 1035 + j (never drawn before), for the defaults chosen in session 14.
# ``heldout9_*`` (session 14): a ninth round, generator seeds 1040 + j, for word units tested at their evidence
# tokens where SIFT misses their word (flag, counterfactual gate), designed on round 8's text after it was read.
# ``heldout10_*`` (session 15): a tenth round, generator seeds 1045 + j, for the flag's margin around small removals,
# and the first held-out runs on the ``scratch_p16`` model setting (a 6 x 6 grid, train.py).
# ``heldout11_*`` (session 15): an eleventh round, generator seeds 1050 + j, the same frozen method as round 10 on
# more families and both scratch settings.
# ``heldout12_*`` (session 16): a twelfth round, generator seeds 1055 + j, the same frozen method on the
# ``scratch_d12`` model setting (12 blocks, the fixed-patch benchmark model).
# ``heldout13_*`` (session 17): a thirteenth round, generator seeds 1060 + j, for the flag's margin decided per unit.
# ``heldout14_*`` (session 18): a fourteenth round, generator seeds 1065 + j, for steering's removal grown by tokens.
# ``heldout15_*`` (session 18): a fifteenth round, generator seeds 1070 + j, the defaults on the other three families.
# ``heldout16_*`` (session 19): a sixteenth round, generator seeds 1075 + j, the centred colour windows.
# ``heldout17_*`` (session 20): a seventeenth round, generator seeds 1080 + j, colour-cast units.
# ``heldout18_*`` (session 21): an eighteenth round, generator seeds 1085 + j, casts removed by levels.
# ``heldout19_*`` (session 21): round 18b, generator seeds 1090 + j, levels against grey world confirmed.
# ``dev_bg_tint_0/1`` (session 22): the background tint's dev variants, generator seeds 10-11.
# ``heldout20_*`` (session 22): a twentieth round, generator seeds 1095 + j over all six families (the held-out pool's
# seeds were extended to 1000-1199 for it).
# ``heldout21_*`` (session 23): a twenty-first round, generator seeds 1101 + j over all six families, for placed casts.
# ``heldout22_*`` (session 24): a twenty-second round, generator seeds 1107 + j over all six families, the frozen
# defaults on the issue's own benchmark shape (ten classes, a 12-block ViT/8 and a 6-block ViT/16).
# ``heldout23_*`` (session 25): a twenty-third round, generator seeds 1113 + j over all six families, for the dense
# claim set aside where it removes no more than the keypoint claim (``CausalConfig.dense_over_keypoint``).
# ``heldout24_*`` (session 26): generator seeds 1119 + j, for ``prompt --dense-removal with_discovery_tokens``.
# ``dev_stripe_frame_2/3`` (session 11): dev frames drawn from the ``dev_frames`` pool.
# ``heldout25_thin_frame_0/1`` (session 27): frames from the ``heldout_thin_frames`` pool, generator seeds 1200-1201,
# for the dense removal at discovery tokens on frames thinner than held-out round 24's.
# ``heldout26_thin_frame_0`` (session 27): generator seed 1202, for ``spurious --dense-colour border_strip``.
# ``heldout27_*`` (session 28): generator seeds 1125 + j over all six families, border_strip against mean on the
# families other than thin frames (to decide the default).
# ``heldout28_*`` (session 28): generator seeds 1131 + j over all six families, for the effect floor 0.03.
# ``heldout29_*`` (session 29): generator seeds 1137 + j over all six families, two-class sets for the effect floor
# scaled by output count.
# ``heldout30_*`` (session 30): generator seeds 1143 + j over all six families, today's defaults on the fine-tuned
# setting at ten classes.
# ``heldout31_*`` (session 30): generator seeds 1149 + j over all six families, for the flag's scores (round 31).
# ``heldout32_*`` (session 31): generator seeds 1155 + j over all six families, for the ranking by evidence per token.
# ``heldout33_*`` (session 32): generator seeds 1161 + j over all six families, for the gate's relative_where_found.
# ``heldout34_*`` (session 32): generator seeds 1167 + j over all six families, a second read of that default.
# ``heldout35_*`` (session 33): generator seeds 1173 + j over all six families, and ``heldout35_thin_frame_0``
# (generator seed 1203, the thin-frame pool), for the gate's relative_in_place.
# ``heldout36_*`` (session 33): generator seeds 1179 + j over all six families, and ``heldout36_thin_frame_0``
# (generator seed 1204), a second read of relative_in_place.
# ``dev_thin_frame_0/1`` (session 33): dev frames drawn from the ``dev_thin_frames`` pool, generator seeds 300-301.
# ``dev_thin_frame_2/3`` (session 34): two more dev thin frames (generator seeds 302-303), to design on after round 37.
# ``heldout38_*`` (session 34): generator seeds 1191 + j over all six families, and ``heldout38_thin_frame_0``
# (generator seed 1207), for ``prompt --gate-together where_found``.
# ``heldout37_*`` (session 34): generator seeds 1185 + j over all six families, and ``heldout37_thin_frame_0/1``
# (generator seeds 1205-1206, the thin-frame pool), for the gate's removal of every shortcut at once.
# ``heldout39_*`` (session 35): generator seeds 1197 + j over the first three families (the last seeds of the
# held-out pool: a next round needs a new pool), and ``heldout39_thin_frame_0/1`` (generator seeds 1208-1209).
# ``heldout40_fixed_patch`` / ``heldout40_text`` (session 36): the first draws of the ``heldout_more`` pool (generator
# seeds 1300-1301), today's defaults on the issue's own two benchmark shapes.
# ``dev_border_patch_0/1`` (session 36): fixed patches on the border ring (``dev_border_cells``, seeds 400-401).
# ``heldout41_border_patch`` (seed 1400, ``heldout_border_cells``), ``heldout41_fixed_patch`` / ``heldout41_text``
# (seeds 1302-1303, ``heldout_more``) (session 36): the parsimonious causal_rank.
# ``dev_mid_frame_0/1`` (session 36): dev frames 0.55 / 0.7 token wide (``dev_mid_frames``, seeds 500-501).
# ``heldout42_border_patch`` (session 36, seed 1401): a border-ring patch on the 12-block ViT-Ti/8.
# ``heldout43_thin_frame_0`` (seed 1210, ``heldout_thin_frames``) and ``heldout43_text`` (seed 1304, ``heldout_more``)
# (session 37): ``--dense-colour both`` against ``mean`` on a new thin frame and a text.
# ``heldout44_text_0/1`` (seeds 1305-1306) and ``heldout44_stripe_frame`` (seed 1307, the pool's 3/4-token frame),
# ``heldout_more`` (session 38): the default ``both`` on texts (round 27's strip cost) and a third mid-width frame.
# ``heldout45_text`` (seed 1308, ``heldout_more``), ``heldout45_border_patch`` (seed 1402, ``heldout_border_cells``)
# and ``heldout45_thin_frame`` (seed 1211, ``heldout_thin_frames``) (session 38): ``--dense-token-test``.
# ``heldout46_text`` (seed 1309), ``heldout46_border_patch`` (seed 1403) and ``heldout46_thin_frame`` (seed 1212)
# (session 39): ``prompt --fired-margin``, and ``--dense-token-test``'s dev cost.
# ``heldout47_text_0/1`` (seeds 1310-1311, ``heldout_more``) (session 39): the fired margin on the 8 x 8 grid.
# ``heldout48_text`` (seed 1312, ``heldout_more``) (session 39): the fired margin on the 12-block ViT/8.
# ``heldout49_tint`` / ``heldout49_bg_tint`` (seeds 1313-1314, ``heldout_more``) (session 40): today's defaults on
# tints at ten classes (the pool's ten tint hues), never run at ten classes before.
# ``heldout51_bg_tint`` / ``heldout51_text`` (seeds 1315-1316, ``heldout_more``), ``heldout51_thin_frame`` (seed 1213,
# ``heldout_thin_frames``), ``heldout51_border_patch`` (seed 1404, ``heldout_border_cells``) (session 41): which
# ``spurious`` configuration should be the default (no dense words, the suite's options, + set presence by tokens).
VARIANTS: tuple[Variant, ...] = tuple(
    [Variant(f"dev_{f}_{i}", f, "dev", 2 * j + i) for j, f in enumerate(FIRST_FAMILIES) for i in range(2)]
    + [Variant(f"heldout_{f}", f, "heldout", 1000 + 7 * j + 3) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout2_{f}", f, "heldout", 1000 + 7 * j + 5) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout3_{f}", f, "heldout", 1000 + 7 * j + 6) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout4_{f}", f, "heldout", 1000 + 7 * j + 1) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout5_{f}", f, "heldout", 1000 + 7 * j + 2) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout6_{f}", f, "heldout", 1000 + 7 * j + 4) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout7_{f}", f, "heldout", 1000 + 7 * j + 0) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout8_{f}", f, "heldout", 1035 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout9_{f}", f, "heldout", 1040 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout10_{f}", f, "heldout", 1045 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout11_{f}", f, "heldout", 1050 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout12_{f}", f, "heldout", 1055 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout13_{f}", f, "heldout", 1060 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout14_{f}", f, "heldout", 1065 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout15_{f}", f, "heldout", 1070 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout16_{f}", f, "heldout", 1075 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout17_{f}", f, "heldout", 1080 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout18_{f}", f, "heldout", 1085 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"heldout19_{f}", f, "heldout", 1090 + j) for j, f in enumerate(FIRST_FAMILIES)]
    + [Variant(f"dev_bg_tint_{i}", "bg_tint", "dev", 10 + i) for i in range(2)]
    + [Variant(f"heldout20_{f}", f, "heldout", 1095 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout21_{f}", f, "heldout", 1101 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout22_{f}", f, "heldout", 1107 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout23_{f}", f, "heldout", 1113 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout24_{f}", f, "heldout", 1119 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"dev_stripe_frame_{i}", "stripe_frame", "dev", 200 + i, pool="dev_frames") for i in (2, 3)]
    + [Variant(f"heldout25_thin_frame_{i}", "stripe_frame", "heldout", 1200 + i, pool="heldout_thin_frames")
       for i in (0, 1)]
    + [Variant("heldout26_thin_frame_0", "stripe_frame", "heldout", 1202, pool="heldout_thin_frames")]
    + [Variant(f"heldout27_{f}", f, "heldout", 1125 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout28_{f}", f, "heldout", 1131 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout29_{f}", f, "heldout", 1137 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout30_{f}", f, "heldout", 1143 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout31_{f}", f, "heldout", 1149 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout32_{f}", f, "heldout", 1155 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout33_{f}", f, "heldout", 1161 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout34_{f}", f, "heldout", 1167 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout35_{f}", f, "heldout", 1173 + j) for j, f in enumerate(FAMILIES)]
    + [Variant("heldout35_thin_frame_0", "stripe_frame", "heldout", 1203, pool="heldout_thin_frames")]
    + [Variant(f"heldout36_{f}", f, "heldout", 1179 + j) for j, f in enumerate(FAMILIES)]
    + [Variant("heldout36_thin_frame_0", "stripe_frame", "heldout", 1204, pool="heldout_thin_frames")]
    + [Variant(f"dev_thin_frame_{i}", "stripe_frame", "dev", 300 + i, pool="dev_thin_frames") for i in range(2)]
    + [Variant(f"heldout37_{f}", f, "heldout", 1185 + j) for j, f in enumerate(FAMILIES)]
    + [Variant(f"heldout37_thin_frame_{i}", "stripe_frame", "heldout", 1205 + i, pool="heldout_thin_frames")
       for i in range(2)]
    + [Variant(f"dev_thin_frame_{i}", "stripe_frame", "dev", 300 + i, pool="dev_thin_frames") for i in (2, 3)]
    + [Variant(f"heldout38_{f}", f, "heldout", 1191 + j) for j, f in enumerate(FAMILIES)]
    + [Variant("heldout38_thin_frame_0", "stripe_frame", "heldout", 1207, pool="heldout_thin_frames")]
    + [Variant(f"heldout39_{f}", f, "heldout", 1197 + j) for j, f in enumerate(FAMILIES[:3])]
    + [Variant(f"heldout39_thin_frame_{i}", "stripe_frame", "heldout", 1208 + i, pool="heldout_thin_frames")
       for i in range(2)]
    + [Variant(f"heldout40_{f}", f, "heldout", 1300 + j, pool="heldout_more")
       for j, f in enumerate(("fixed_patch", "text"))]
    + [Variant(f"dev_border_patch_{i}", "fixed_patch", "dev", 400 + i, pool="dev_border_cells") for i in range(2)]
    + [Variant("heldout41_border_patch", "fixed_patch", "heldout", 1400, pool="heldout_border_cells")]
    + [Variant(f"heldout41_{f}", f, "heldout", 1302 + j, pool="heldout_more")
       for j, f in enumerate(("fixed_patch", "text"))]
    + [Variant(f"dev_mid_frame_{i}", "stripe_frame", "dev", 500 + i, pool="dev_mid_frames") for i in range(2)]
    + [Variant("heldout42_border_patch", "fixed_patch", "heldout", 1401, pool="heldout_border_cells")]
    + [Variant("heldout43_thin_frame_0", "stripe_frame", "heldout", 1210, pool="heldout_thin_frames"),
       Variant("heldout43_text", "text", "heldout", 1304, pool="heldout_more")]
    + [Variant(f"heldout44_text_{i}", "text", "heldout", 1305 + i, pool="heldout_more") for i in range(2)]
    + [Variant("heldout44_stripe_frame", "stripe_frame", "heldout", 1307, pool="heldout_more")]
    + [Variant("heldout45_text", "text", "heldout", 1308, pool="heldout_more"),
       Variant("heldout45_border_patch", "fixed_patch", "heldout", 1402, pool="heldout_border_cells"),
       Variant("heldout45_thin_frame", "stripe_frame", "heldout", 1211, pool="heldout_thin_frames")]
    + [Variant("heldout46_text", "text", "heldout", 1309, pool="heldout_more"),
       Variant("heldout46_border_patch", "fixed_patch", "heldout", 1403, pool="heldout_border_cells"),
       Variant("heldout46_thin_frame", "stripe_frame", "heldout", 1212, pool="heldout_thin_frames")]
    + [Variant(f"heldout47_text_{i}", "text", "heldout", 1310 + i, pool="heldout_more") for i in range(2)]
    + [Variant("heldout48_text", "text", "heldout", 1312, pool="heldout_more")]
    + [Variant("heldout49_tint", "tint", "heldout", 1313, pool="heldout_more"),
       Variant("heldout49_bg_tint", "bg_tint", "heldout", 1314, pool="heldout_more")]
    + [Variant("heldout51_bg_tint", "bg_tint", "heldout", 1315, pool="heldout_more"),
       Variant("heldout51_text", "text", "heldout", 1316, pool="heldout_more"),
       Variant("heldout51_thin_frame", "stripe_frame", "heldout", 1213, pool="heldout_thin_frames"),
       Variant("heldout51_border_patch", "fixed_patch", "heldout", 1404, pool="heldout_border_cells")])
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


def colour_pair(hue: float) -> tuple[np.ndarray, np.ndarray]:
    """(bright, dark) uint8 RGB of a hue: a saturated bright colour and a dark complementary one, so the
    cue has a large luminance gap and SIFT (grey) sees it."""
    bright = colorsys.hsv_to_rgb(hue / 360.0, 0.85, 1.0)
    dark = colorsys.hsv_to_rgb(((hue + 180.0) % 360.0) / 360.0, 0.9, 0.3)
    return (np.round(np.array(bright) * 255).astype(np.uint8), np.round(np.array(dark) * 255).astype(np.uint8))


def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool [size, size]: the bright part of one of planted.py's patch layouts."""
    k = PATCH_SHAPES.index(shape)  # patch_pattern(k) draws layout k in CUE_COLOURS[k % 5]
    bright = np.array(CUE_COLOURS[k % len(CUE_COLOURS)][0], dtype=np.uint8)
    return np.all(patch_pattern(k, size) == bright[:, None, None], axis=0)


def stripe_mask(angle: float, hw: tuple[int, int], period: float, phase: float) -> np.ndarray:
    """bool [H, W]: planted.py's oriented stripes at ``angle`` degrees (bright half of each period)."""
    from planted.build import TEXTURE_ANGLES

    k = TEXTURE_ANGLES.index(angle)
    bright = np.array(CUE_COLOURS[k % len(CUE_COLOURS)][0], dtype=np.uint8)
    return np.all(texture_pattern(k, hw, period, phase) == bright[:, None, None], axis=0)


def draw_class_params(variant: Variant, num_classes: int) -> list[dict]:
    """Per-class cue parameters of a variant, drawn from its pool with its generator seed."""
    pool = POOLS[variant.pool or variant.split]
    if variant.gen_seed not in pool.gen_seeds:
        raise ValueError(f"variant {variant.name}: generator seed {variant.gen_seed} is outside the {pool.name} "
                         f"pool's seeds {pool.gen_seeds}")
    rng = np.random.default_rng([variant.gen_seed, 11])
    hues = rng.choice(pool.hues, size=num_classes, replace=len(pool.hues) < num_classes)
    shapes = rng.choice(len(pool.shapes), size=num_classes)
    per_class: list[dict] = []
    if variant.family == "fixed_patch":
        cells = rng.choice(len(pool.cells), size=num_classes, replace=False)
        offsets = rng.integers(0, 4, size=(num_classes, 2)) / 4.0  # sub-token shift: a cue may straddle tokens
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "shape": pool.shapes[shapes[k]],
                              "cell": list(pool.cells[cells[k]]), "offset": offsets[k].tolist()})
    elif variant.family == "random_patch":
        band = str(rng.choice(pool.bands))
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "shape": pool.shapes[shapes[k]], "band": band})
    elif variant.family == "stripe_frame":
        angles = rng.choice(pool.angles, size=num_classes)
        period, width = float(rng.choice(pool.periods)), float(rng.choice(pool.frame_widths))
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "angle": float(angles[k]), "period": period, "width": width})
    elif variant.family == "tint":
        alpha = float(rng.choice(pool.tint_alphas))
        hues = _tint_hues(pool, num_classes, rng)
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "alpha": alpha})
    elif variant.family == "bg_tint":
        alpha, radius = float(rng.choice(pool.tint_alphas)), float(rng.choice(pool.bg_radii))
        hues = _tint_hues(pool, num_classes, rng)
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "alpha": alpha, "radius": radius})
    elif variant.family == "text":
        font = int(rng.choice(pool.fonts))
        words: list[str] = []
        while len(words) < num_classes:
            w = "".join(rng.choice(list(pool.chars), size=2))
            if w not in words:
                words.append(w)
        for k in range(num_classes):
            per_class.append({"hue": float(hues[k]), "text": words[k], "font": font,
                              "corners": list(pool.corners)})
    else:
        raise ValueError(f"unknown cue family {variant.family!r}; one of {FAMILIES}")
    return per_class


def _tint_hues(pool: Pool, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A different hue per class for a tint: the pool's hues where there are enough (every variant drawn before
    session 40 keeps its colours), else its ``tint_hues``."""
    hues = pool.hues if num_classes <= len(pool.hues) else pool.tint_hues
    if num_classes > len(hues):
        raise ValueError(f"a tint needs a hue per class: pool {pool.name!r} has {len(hues)}, asked for {num_classes}")
    return rng.choice(hues, size=num_classes, replace=False)


def render_cue(image: np.ndarray, family: str, params: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plant one cue into uint8 HWC ``image``; returns (image with cue, bool HW mask of the cue region).

    ``rng`` draws what varies per image (random-patch position, stripe phase, text corner)."""
    h, w = image.shape[:2]
    u = h // GRID
    out = image.copy()
    mask = np.zeros((h, w), dtype=bool)
    bright, dark = colour_pair(params["hue"])
    if family in ("fixed_patch", "random_patch"):
        if family == "fixed_patch":
            r, c = params["cell"]
            y0, x0 = int(round((r + params["offset"][0]) * u)), int(round((c + params["offset"][1]) * u))
            y0, x0 = min(y0, h - u), min(x0, w - u)  # a border-ring cell's shift stays inside (ring 1: no change)
        else:
            y0, x0 = _band_position(params["band"], h, w, u, rng)
        on = shape_mask(params["shape"], u)
        out[y0:y0 + u, x0:x0 + u] = np.where(on[..., None], bright, dark)
        mask[y0:y0 + u, x0:x0 + u] = True
    elif family == "stripe_frame":
        width = max(1, int(round(params["width"] * u)))
        mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
        on = stripe_mask(params["angle"], (h, w), params["period"] * u, float(rng.random()))
        out[mask] = np.where(on[mask][:, None], bright, dark)
    elif family == "tint":
        tinted = (1 - params["alpha"]) * image.astype(np.float64) + params["alpha"] * bright.astype(np.float64)
        out = np.clip(np.round(tinted), 0, 255).astype(np.uint8)
        mask[:] = True
    elif family == "bg_tint":
        weight = background_weight((h, w), params["radius"], rng.uniform(-0.5, 0.5, size=2) * u)
        tinted = image.astype(np.float64) + params["alpha"] * weight[..., None] * (
            bright.astype(np.float64) - image.astype(np.float64))
        out = np.clip(np.round(tinted), 0, 255).astype(np.uint8)
        mask = weight > 0
    elif family == "text":
        out, mask = _draw_text(image, params, str(rng.choice(params["corners"])), bright, dark, u)
    else:
        raise ValueError(f"unknown cue family {family!r}")
    return out, mask


def background_weight(hw: tuple[int, int], radius: float, shift: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1]: 0 inside a centred circle of ``radius`` (a fraction of the side) moved by ``shift``
    (dy, dx) pixels, 1 outside, a linear ramp over 0.05 of the side between: how much of bg_tint's tint a pixel
    takes."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    d = np.hypot((yy - h / 2 - shift[0]) / h, (xx - w / 2 - shift[1]) / w)  # in fractions of the side
    return np.clip((d - radius) / 0.05, 0.0, 1.0)


def _band_position(band: str, h: int, w: int, u: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a random-position patch inside a 3-token band along one edge, kept half a token
    off the border (SIFT finds nothing on the border)."""
    m = u // 2
    along = int(rng.integers(m, w - m - u + 1))
    across = int(rng.integers(m, 3 * u - u + 1))
    if band == "top":
        return across, along
    if band == "bottom":
        return h - u - across, along
    if band == "left":
        return along, across
    if band == "right":
        return along, w - u - across
    raise ValueError(f"unknown band {band!r}")


def _draw_text(image: np.ndarray, params: dict, corner: str, bright: np.ndarray, dark: np.ndarray,
               u: int) -> tuple[np.ndarray, np.ndarray]:
    """A two-character watermark about one token tall in a corner: dark outline, bright fill."""
    font, text = params["font"], params["text"]
    scale = u / cv2.getTextSize(text, font, 1.0, 1)[0][1]  # cap height ~ one token
    thick = max(1, u // 8)
    (tw, th), base = cv2.getTextSize(text, font, scale, thick + 2)
    m = u // 2
    x = m if corner in ("tl", "bl") else image.shape[1] - m - tw
    y = m + th if corner in ("tl", "tr") else image.shape[0] - m - base
    canvas = np.zeros(image.shape[:2], dtype=np.uint8)  # where the drawing lands: 1 outline, 2 fill
    cv2.putText(canvas, text, (x, y), font, scale, 1, thick + 2, cv2.LINE_8)
    cv2.putText(canvas, text, (x, y), font, scale, 2, thick, cv2.LINE_8)
    out = image.copy()
    out[canvas == 1] = dark
    out[canvas == 2] = bright
    return out, canvas > 0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in [0, 1] of a mask's bounding box (exclusive ends / size); -1s when empty."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return (-1.0, -1.0, -1.0, -1.0)
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def region_kind(family: str) -> str:
    """How "the cue is located" is judged: a box (patch, text), a border frame, or n/a (a global tint)."""
    return {"stripe_frame": "frame", "tint": "global", "bg_tint": "global"}.get(family, "box")


__all__ = ["FAMILIES", "FIRST_FAMILIES", "POOLS", "DEV", "DEV_FRAMES", "HELDOUT", "VARIANTS", "VARIANTS_BY_NAME",
           "Variant", "Pool", "draw_class_params", "render_cue", "background_weight", "mask_box", "region_kind",
           "colour_pair"]
