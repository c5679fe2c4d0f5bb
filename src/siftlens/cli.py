"""Command line: `siftlens analyze | compare | spurious | prompt | flag | pretrain`.

One parser and one runner per command, and the one place that decides which errors are one-line messages
(hence the length). Every default comes from the command's config dataclass or entry point, every range
from argtypes.py; the configs check the same ranges for library callers."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from .argtypes import (
    DENSE_WORDS,
    MAX_SIDE,
    N_WORDS,
    SEED,
    OneLineErrorParser,
    add_ranges_to_help,
    analyze_option_types,
    finite_float,
    float_range,
    int_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .semantic_maps import MAP_MODES, SiftParams


def _analyze_parser(sub) -> None:
    from .analyze import AnalyzeConfig
    from .stats import NULL_MODES

    d, t = AnalyzeConfig(), analyze_option_types()  # every default and range stated once, in analyze.py / argtypes.py
    p = sub.add_parser("analyze", help="analyse a ViT's attention against SIFT semantic maps and write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--images", default=None, nargs="+",
                   help="image file(s), directory (ImageFolder trees too) or glob; default: bundled images")
    p.add_argument("--out", default="siftlens_out", help="output directory")
    p.add_argument("--input-size", type=int_range(1, MAX_SIDE), nargs=2, metavar=("H", "W"), default=None,
                   help="model input size, e.g. 224 320 for a non-square grid (model must allow it; a whole number "
                   "of patches)")
    p.add_argument("--batch-size", type=t["batch_size"], default=d.batch_size)
    p.add_argument("--workers", type=t["workers"], default=d.workers, help="DataLoader workers (SIFT runs there)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--map-mode", choices=MAP_MODES, default=d.map_mode)
    p.add_argument("--weight", choices=("response", "unit"), default=d.weight,
                   help="keypoint weight: SIFT response or 1")
    p.add_argument("--groups", type=t["groups"], default=d.groups,
                   help="concentration groups G (group 0 = no keypoints)")
    p.add_argument("--null-permutations", type=t["null_permutations"], default=d.null_permutations,
                   help="K null maps per image (swap: K other images' SIFT maps, at most images - 1; 0: no null)")
    p.add_argument("--null-mode", choices=NULL_MODES, default=d.null_mode,
                   help="null for the per-map z/p: swap = other images' SIFT maps (calibrated, default); shift = "
                   "cyclic grid shifts of the image's own map; permute = shuffles over patches (ANTI-CONSERVATIVE: "
                   "~39%% false positives at alpha 0.05 on smooth maps; for comparison only)")
    p.add_argument("--twin", choices=("random-init", "none"), default=d.twin,
                   help="randomised-model sanity check: analyse the same architecture with random weights on "
                   "the first --twin-images images (OUT/twin/); the verdict states an effect only where the "
                   "model beats it")
    p.add_argument("--twin-images", type=t["twin_images"], default=d.twin_images,
                   help="images analysed by the random-weights twin")
    p.add_argument("--limit", type=t["limit"], default=d.limit, help="analyse at most this many images")
    p.add_argument("--seed", type=t["seed"], default=d.seed)
    p.add_argument("--examples", type=t["examples"], default=d.examples,
                   help="images shown in the report's example figure")
    p.add_argument("--keep-full-maps", type=t["keep_full_maps"], default=d.keep_full_maps,
                   help="save full [layers, heads, T, T] attention of this many images (attention_maps.npz)")
    p.add_argument("--sift-contrast-threshold", type=non_negative_float, default=d.sift.contrast_threshold)
    p.add_argument("--sift-edge-threshold", type=positive_float, default=d.sift.edge_threshold)
    p.add_argument("--sift-nfeatures", type=non_negative_int, default=d.sift.nfeatures,
                   help="strongest keypoints kept (0: all)")
    p.add_argument("--sift-octave-layers", type=int_range(1, 16), default=d.sift.n_octave_layers)
    p.add_argument("--sift-sigma", type=positive_float, default=d.sift.sigma)
    p.add_argument("--keypoint-detector", choices=("opencv", "kornia"), default=d.keypoint_detector,
                   help="SIFT implementation: opencv (cv2, per image in the DataLoader workers) or kornia (on each "
                   "batch on --device, e.g. a GPU; pip install \"siftlens[gpu]\"; agreement with OpenCV measured in "
                   "benchmarks/RESULTS.md)")
    p.add_argument("--keypoint-cache", default=d.keypoint_cache, metavar="DIR",
                   help="cache SIFT/ORB keypoints on disk, keyed by the exact model input and parameters")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward pass (GPU)")
    p.add_argument("--no-report", action="store_true", help="write tables only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from .analyze import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(
        map_mode=args.map_mode, weight=args.weight, groups=args.groups, batch_size=args.batch_size,
        workers=args.workers, device=args.device, limit=args.limit,
        null_permutations=args.null_permutations, null_mode=args.null_mode, seed=args.seed, examples=args.examples,
        twin=args.twin, twin_images=args.twin_images,
        keep_full_maps=args.keep_full_maps, report=not args.no_report, progress=not args.quiet,
        keypoint_cache=args.keypoint_cache, keypoint_detector=args.keypoint_detector, amp=args.amp,
        sift=SiftParams(nfeatures=args.sift_nfeatures, n_octave_layers=args.sift_octave_layers,
                        contrast_threshold=args.sift_contrast_threshold,
                        edge_threshold=args.sift_edge_threshold, sigma=args.sift_sigma),
    )
    images = args.images[0] if args.images and len(args.images) == 1 else args.images
    res = analyze(args.model, images, args.out, cfg, checkpoint=args.checkpoint,
                  random_init=args.random_init, input_size=tuple(args.input_size) if args.input_size else None)
    if res is None:  # a torchrun rank other than 0: rank 0 merges and reports
        return 0
    c = res.manifest["counts"]
    print(f"analysed {c['analysed']} images ({c['skipped']} skipped, {c['no_keypoints']} without keypoints) "
          f"-> {res.out}/" + ("report.html" if cfg.report else "per_image.parquet"))
    for s in res.manifest["skipped"]:
        print(f"skipped: {s['reason']}", file=sys.stderr)
    for path in res.manifest["no_keypoints"]:
        print(f"no SIFT keypoints (baselines only, excluded from SIFT ratios): {path}", file=sys.stderr)
    return 0


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare two analyze runs (two models, or two checkpoints of one)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default="siftlens_compare")
    p.add_argument("--stat", default="s_cls", help="s_cls, s_pp, s_ppw, spearman, or any per_image column")
    p.add_argument("--map", default="sift", help="map the ratio is computed against (sift or a baseline)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    table = compare(args.run_a, args.run_b, args.out, stat=args.stat, map_name=args.map)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"-> {args.out}/compare.html")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_tiny_imagenette",
                   help="vit_tiny_imagenette (bundled), timm:NAME, hf:PATH_OR_ID or torchvision:NAME")
    p.add_argument("--checkpoint", default=None, help="local weights (.safetensors, or a torch file loaded "
                   "with weights_only=True) for timm:/hf:/torchvision: models; no download happens")
    p.add_argument("--random-init", action="store_true",
                   help="random weights (no download; for smoke tests and controls), drawn with seed 0; analyze and "
                   "spurious: with --seed")


def _parse_layers(text: str) -> str | list[int]:
    """'late' / 'all' / ... stay names; '3,4,-1' becomes a list of layer indices."""
    if not text.lstrip("-")[:1].isdigit():
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated layer indices, e.g. 3,4,-1") from None


def _defaults(fn) -> dict:
    """The keyword defaults of a library entry point (stated there once)."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}


def _spurious_parser(sub) -> None:
    from .models import TWIN_SEED_OFFSET
    from .spurious.cast import CAST_REMOVALS
    from .spurious.causal import DENSE_COLOURS, DENSE_SET_PRESENCES, CausalConfig
    from .spurious.discover import DECISIVE, DiscoveryConfig
    from .spurious.run import run_spurious

    d, c, r = DiscoveryConfig(), CausalConfig(), _defaults(run_spurious)
    p = sub.add_parser("spurious", help="find keypoint motifs a classifier's decisive attention relies on",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--images", required=True, help="ImageFolder directory (labels from class folders) or files")
    p.add_argument("--labels", default=r["labels"], help="CSV with columns path,label (default: ImageFolder classes)")
    p.add_argument("--out", default="siftlens_spurious")
    p.add_argument("--layers", type=_parse_layers, default=d.layers,
                   help="all | late | middle | early | comma-separated layer indices")
    p.add_argument("--decisive", choices=DECISIVE, default=d.decisive,
                   help="decisive attention: CLS row averaged over --layers, or attention rollout up to the last")
    p.add_argument("--words", type=N_WORDS, default=d.n_words,
                   help="visual words (k-means clusters of motif descriptors)")
    p.add_argument("--dense-words", type=DENSE_WORDS, default=d.dense_words,
                   help="also describe every token at its centre and cluster those descriptors into this many dense "
                   "words, candidate units for cues SIFT detects no keypoint on (a border frame, fine texture); 0: "
                   "none")
    p.add_argument("--dense-gradient-weight", type=non_negative_float, default=d.dense_gradient_weight,
                   help="weight of the SIFT (gradient) part of the dense descriptors; 0: dense words are the token's "
                   "colour alone")
    p.add_argument("--dense-colour", choices=DENSE_COLOURS, default=d.dense_colour,
                   help="the dense descriptors' colour: the token's mean, or for a token on the image border the mean "
                   "of its outer quarter (a frame thinner than a token fills it: held-out round 26, a 4 px frame, "
                   "3%% -> 85%% of the oracle's worst-group headroom; on a text and a 9 px frame it cost 6 and 26 "
                   "points of training-mix accuracy, round 27; a random-weights model got false claims with it at "
                   "floor 0.02); both (default since round 43): every token by its mean and each border token also "
                   "by its strip, so a frame thinner than a token and a mark inside a border token both keep a "
                   "reading")
    p.add_argument("--colour-weight", type=non_negative_float, default=d.colour_weight,
                   help="weight of the keypoint window's mean opponent colour in the motif descriptor (0: grey SIFT)")
    p.add_argument("--orientation-weight", type=non_negative_float, default=d.orientation_weight,
                   help="weight of the keypoint's absolute orientation in the motif descriptor (0: rotation-invariant)")
    p.add_argument("--min-per-class", type=positive_int, default=r["min_per_class"])
    p.add_argument("--causal-images", type=positive_int, default=c.causal_images,
                   help="per class, images the candidate units are removed in (causal ranking)")
    p.add_argument("--control-budget", choices=("matched", "full"), default=c.control_budget,
                   help="SIFT-free occlusion control: as many forward passes as the SIFT units (matched) or every "
                   "token on every sampled image (full)")
    p.add_argument("--region-images", type=non_negative_int, default=c.region_images,
                   help="per class, images (outside the causal sample) whose decisive SIFT window builds the class's "
                   "region unit, for cues that move or that no single word captures (0: no region units)")
    p.add_argument("--region-windows", choices=("sift", "all"), default=c.region_windows,
                   help="region units search the windows holding a SIFT keypoint, or every window (the SIFT-free twin)")
    p.add_argument("--min-effect", type=non_negative_float, default=c.shortcut_min_effect,
                   help="effect floor of a shortcut claim: its unit must lower the class probability by more than "
                   "this on average over the class's images (calibrated on ten-output random-weights models, on clean "
                   "and on planted images: largest 0.024); for a model with C < 10 outputs it is scaled by "
                   "(1/C)(1-1/C)/0.09 (two outputs: 2.8x), as a random model's probabilities move further there")
    p.add_argument("--dense-set-presence", choices=DENSE_SET_PRESENCES, default=c.dense_set_presence,
                   help="with --dense-words: a dense colour-word set counts as held by an image, for its "
                   "class-specificity, where one token carries one of its words (any), or where its words sit on at "
                   "least half as many tokens as in its class's median image (tokens: a background tint's or frame's "
                   "set is then specific where any-token presence puts it in half the other images; the default since "
                   "held-out round 51)")
    p.add_argument("--claim-sufficiency", type=non_negative_float, default=c.claim_sufficiency,
                   help="a significant unit above the effect floor that is not class-specific (a frame's colours are "
                   "in many classes' images) is claimed when, pasted into other classes' images, it raises the class "
                   "probability by at least this much more than as many random tokens (lower CI bound); the clean "
                   "bundled model's units reached 0.032 and 0.059 on two 200-image samples, where 0.05 added two "
                   "claims (0: specificity alone)")
    p.add_argument("--dense-over-keypoint", type=non_negative_float, default=c.dense_over_keypoint,
                   help="with --dense-words: a class's dense claim is applied beside its keypoint claim only where it "
                   "removes at least this many times the keypoint claim's share of the class probability (a frame's "
                   "colours); one that removes less (a watermark's colour around its letters) is reported but not "
                   "applied, so flag and prompt use the smaller keypoint removal; 0: both always")
    p.add_argument("--no-casts", action="store_true",
                   help="no colour-cast units (a class's overall colour tested as a global shortcut; they cost one "
                   "more read of every image and, per class, 5 forwards per --causal-images image and 2 per image "
                   "the cast is swapped into)")
    p.add_argument("--cast-removal", choices=tuple(CAST_REMOVALS), default=c.cast_removal,
                   help="how a colour cast is taken out of an image: grey world (channel gains only) or levels (each "
                   "channel's range stretched to the pixel range: undoes a blended tint's offset and lost contrast; "
                   "far better right-for-the-wrong-reason flags on held-out tints, but it steers aligned images as "
                   "the cue-free twin would, lowering the training-mix average)")
    p.add_argument("--placed-casts", action="store_true",
                   help="also test, for classes without a claimed colour cast, a colour cast with a place (the class's "
                   "colour per cell of a 4 x 4 grid, e.g. a background tint), claimed by the same swap test and "
                   "removed by masking its place in images predicted as its class. Off by default: on two held-out "
                   "background tints it raised the right-for-the-wrong-reason flag by 0.08-0.10 but its steering gain "
                   "(+0.03, +0.06) was not separable from zero and cost 17-18 aligned points")
    p.add_argument("--no-causal", action="store_true", help="attention ranking only (no counterfactual forwards)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--device", default=r["device"])
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.add_argument("--twin", choices=("none", "random-init"), default="none",
                   help="random-init: run the same discovery on the architecture with fresh weights (seed --seed + "
                   f"{TWIN_SEED_OFFSET}) on the same images and report its largest claimable effect and its claims "
                   "beside the floor, the claims' null on your own model shape and images (twice the time)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_spurious)


def _run_spurious(args: argparse.Namespace) -> int:
    from .spurious.causal import CausalConfig, shortcut_verdict
    from .spurious.discover import DiscoveryConfig
    from .spurious.run import run_spurious, unsearched_note

    causal = None if args.no_causal else CausalConfig(causal_images=args.causal_images,
                                                      control_budget=args.control_budget,
                                                      region_images=args.region_images,
                                                      region_windows=args.region_windows,
                                                      shortcut_min_effect=args.min_effect,
                                                      dense_over_keypoint=args.dense_over_keypoint,
                                                      unit_sufficiency=args.claim_sufficiency,
                                                      casts=not args.no_casts,
                                                      cast_removal=args.cast_removal,
                                                      placed_casts=args.placed_casts,
                                                      dense_set_presence=args.dense_set_presence)
    cfg = DiscoveryConfig(layers=args.layers, decisive=args.decisive, n_words=args.words, seed=args.seed,
                          colour_weight=args.colour_weight, orientation_weight=args.orientation_weight,
                          batch_size=args.batch_size, causal=causal, dense_words=args.dense_words,
                          dense_gradient_weight=args.dense_gradient_weight, dense_colour=args.dense_colour)
    res = run_spurious(args.model, args.images, args.out, labels=args.labels, min_per_class=args.min_per_class,
                       cfg=cfg, checkpoint=args.checkpoint, random_init=args.random_init, device=args.device,
                       progress=not args.quiet, twin=args.twin)
    if res is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    for k, name in enumerate(res.class_names):
        top = res.motifs[res.motifs["cls"] == k].head(1)
        if len(top):
            r = top.iloc[0]
            ctrl = (f" [{r['lift_lo']:.2f}, {r['lift_hi']:.2f}], label-permutation p={r['p_label_null']:.3f}"
                    if "p_label_null" in r else "")
            print(f"{name}: top motif word {int(r['word'])} score {r['score']:.3f} (lift {r['lift']:.2f}{ctrl}, "
                  f"in-class {r['f_in']:.0%}, elsewhere {r['f_out']:.0%}, at x={r['mean_x']:.2f} y={r['mean_y']:.2f})")
        if res.causal is not None and len(res.causal.units):
            cu = res.causal.units[res.causal.units["cls"] == k].head(1)
            if len(cu):
                c = cu.iloc[0]
                print(f"{name}: top causal unit {c['unit']} effect {c['causal_effect']:.3f} "
                      f"[{c['causal_lo']:.3f}, {c['causal_hi']:.3f}], label-permutation p={c['causal_p']:.3f}, box "
                      f"({c['box_x0']:.2f}, {c['box_y0']:.2f})-({c['box_x1']:.2f}, {c['box_y1']:.2f})")
            spread = res.shortcuts.spread_note(k) if res.shortcuts is not None else ""
            print(f"{name}: {shortcut_verdict(res.causal.units, k, res.causal.config)}"
                  + (f"; {spread}" if spread else ""))
    if res.shortcuts is not None:
        sift_free = " (colour only: SIFT-free)"
        named = [f"{u['class_name']} {u['unit']}{sift_free if res.shortcuts.colour_only(u) else ''}"
                 for u in res.shortcuts.units]
        named += [f"{c['class_name']} colour cast (SIFT-free)" for c in res.shortcuts.casts]
        print(f"shortcuts for flag / gated prompt: {named}")
    if note := unsearched_note(res):
        print(note)
    if res.twin is not None and "not_run" in res.twin:
        print(f"random-weights twin not run: {res.twin['not_run']}")
    elif res.twin is not None:
        t, best = res.twin, res.twin["largest_claimable"]
        print(f"random-weights twin (seed {t['seed']}): largest claimable effect "
              f"{best['effect']:.4f} ({best['class']} {best['unit']})" if best else
              f"random-weights twin (seed {t['seed']}): no claimable unit", end="")
        print(f", effect floor {t['floor']:.3g}, claims {t['claims'] or 'none'}"
              + (" -- WARNING: the floor does not hold here; raise --min-effect" if t["claims"] else ""))
    print(f"-> {args.out}/spurious.html")
    return 0


def _prompt_parser(sub) -> None:
    from .prompting import METHODS
    from .spurious.causal import DENSE_REMOVALS, DENSE_TOKEN_TESTS, GATE_DROPS, GATES, TOGETHER_MODES
    from .spurious.prompt_cli import run_prompt

    r = _defaults(run_prompt)
    p = sub.add_parser("prompt", help="steer attention at inference (no retraining) and compare predictions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--images", required=True, help="ImageFolder directory (labels from class folders) or files")
    p.add_argument("--labels", default=r["labels"],
                   help="CSV path,label; default: ImageFolder classes; 'none': no labels")
    p.add_argument("--method", default=r["method"], choices=METHODS)
    p.add_argument("--layers", type=_parse_layers, default=r["layers"],
                   help="late | middle | early | all | comma-separated indices")
    p.add_argument("--beta", type=finite_float, default=r["beta"], help="steering strength")
    p.add_argument("--motifs", default=r["motifs"],
                   help="output dir of `siftlens spurious` (for mask_tokens, random_mask, edge_mask: gated, only "
                   "images where one of its shortcuts is present are steered)")
    p.add_argument("--gate", default=r["gate"], choices=GATES,
                   help="with --motifs: steer where a shortcut's words are found in the image (presence), or where "
                   "removing a shortcut unit changes the prediction (counterfactual: the flag's test, one masked "
                   "forward per unit tested)")
    p.add_argument("--margin", type=non_negative_int, default=r["margin"],
                   help="with --motifs: a unit of at most this many tokens is tested and masked with its 8 "
                   "neighbours where discovery measured that this removes more of its class's evidence "
                   "(shortcuts.json margin_gain); 0: its tokens alone")
    p.add_argument("--gate-min-drop", type=finite_float, default=r["gate_min_drop"],
                   help="counterfactual gate: a removal must also lower the predicted class's probability this much "
                   "(0: any removal that changes the prediction; held-out round 13b: 0.5 left 0-2%% of cue-free "
                   "images touched instead of 4-24%%)")
    p.add_argument("--gate-drop", choices=GATE_DROPS, default=r["gate_drop"],
                   help="counterfactual gate: --gate-min-drop as a share of the predicted class's probability for "
                   "a unit SIFT finds by its words in its place in the image (a dense unit: its words fill its own "
                   "tokens) and in probability for the others (relative_in_place; held-out round 35: as many "
                   "steering lines as relative_where_found, half as many cue-free images touched), the same "
                   "wherever the unit's words are found (relative_where_found, the default of rounds 33-34; 20 of 26 "
                   "lines, absolute 17), in probability for every unit (absolute), or as a share for every unit "
                   "(relative: touched 19-36%% of cue-free images on dev models)")
    p.add_argument("--grow", type=non_negative_int, default=r["grow"],
                   help="counterfactual gate: where no unit's removal changes the prediction, the unit that lowered "
                   "it most (one with a margin gain in shortcuts.json) is grown by its neighbouring tokens one at a "
                   "time, each the one that lowers the predicted class most (while it lowers it >= 0.1 more), up to "
                   "this many; 0: never")
    p.add_argument("--fired-margin", type=non_negative_int, default=r["fired_margin"],
                   help="counterfactual gate: a removal the gate fired on, of at most this many tokens (default: 4), "
                   "is masked with its 8 neighbouring tokens, the gate's decision unchanged (held-out round 46: a "
                   "text's aligned images +3.7 points, training mix +3.4; a border patch +1.6; a frame's larger "
                   "removals unchanged); 0: the removal as tested (the default before session 39)")
    p.add_argument("--gate-together", nargs="?", const="spreads", choices=TOGETHER_MODES, default=r["together"],
                   help="counterfactual gate: where no unit's removal changes the prediction and the predicted "
                   "class's cue spreads over the other classes' shortcut places (a frame: shortcuts.json "
                   "together_gain >= 0.1), every unit tested in the image is removed at once, by the same test "
                   "(spreads, the value without one), or only where SIFT also finds a unit of the predicted class "
                   "(where_found: fewer cue-free images touched on dev). Off by default: held-out rounds 37 / 38 "
                   "raised thin frames' worst group (+3.7 / +0.5, +3.7 points) but cost a thin frame's cue-free "
                   "accuracy 1.6 points each time, past their pre-set lines")
    p.add_argument("--no-gate-together", dest="gate_together", action="store_const", const="off",
                   default=argparse.SUPPRESS, help="--gate-together off")
    p.add_argument("--dense-removal", choices=DENSE_REMOVALS, default=r["dense_removal"],
                   help="with --motifs: removing a present dense words unit masks the tokens where its words are in "
                   "the image (found), or those and the tokens that held its evidence in discovery (a frame's border "
                   "tokens whose colour falls outside the words here; helped a thin frame on dev data, not a wider "
                   "one on held-out round 24)")
    p.add_argument("--dense-token-test", choices=DENSE_TOKEN_TESTS, default=r["dense_token_test"],
                   help="with --motifs, counterfactual gate: a fixed-token dense unit (a colour over fixed tokens, "
                   "e.g. a frame's or a border's) is tested by removal only where its colour words fill its tokens "
                   "(where_found: an image without its colour keeps those tokens; held-out round 45: a text's "
                   "training-mix average +5.4 points), or in every image (always, the default before session 38)")
    p.add_argument("--batch-size", type=positive_int, default=r["batch_size"])
    p.add_argument("--out", default="siftlens_prompt")
    p.add_argument("--seed", type=SEED, default=r["seed"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_prompt)


def _run_prompt(args: argparse.Namespace) -> int:
    from .spurious.prompt_cli import run_prompt

    summary = run_prompt(args.model, args.images, args.out, method=args.method,
                         layers=args.layers, beta=args.beta,
                         motifs=args.motifs, labels=args.labels, batch_size=args.batch_size, seed=args.seed,
                         checkpoint=args.checkpoint, random_init=args.random_init, gate=args.gate,
                         margin=args.margin, gate_min_drop=args.gate_min_drop, grow=args.grow,
                         dense_removal=args.dense_removal, gate_drop=args.gate_drop, together=args.gate_together,
                         dense_token_test=args.dense_token_test, fired_margin=args.fired_margin,
                         progress=not args.quiet)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(json.dumps(summary, indent=1))
    return 0


def _flag_parser(sub) -> None:
    from .spurious.cast import CAST_REMOVALS
    from .spurious.causal import DENSE_REMOVALS, DENSE_TOKEN_TESTS
    from .spurious.flag import OCCLUSION_MODES, run_flag

    r = _defaults(run_flag)
    p = sub.add_parser("flag", help="flag new, unlabelled images whose prediction rests on a discovered shortcut",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--motifs", required=True, help="output dir of `siftlens spurious` (its shortcuts.json)")
    p.add_argument("--images", required=True, help="image file(s), directory or glob (no labels needed)")
    p.add_argument("--out", default="siftlens_flag")
    p.add_argument("--batch-size", type=positive_int, default=r["batch_size"])
    p.add_argument("--device", default=r["device"])
    p.add_argument("--top", type=positive_int, default=r["top"], help="most-flagged images listed in flags.html")
    p.add_argument("--token-units", choices=("always", "gated"), default=r["token_units"],
                   help="fixed-token shortcut units: tested by removal in every image (always), or only where one "
                   "of their words' keypoints sits in them (gated; images without keypoints are then skipped)")
    p.add_argument("--margin", type=non_negative_int, default=r["margin"],
                   help="a shortcut unit's removal of at most this many tokens takes their 8 neighbouring tokens too "
                   "(a drawn cue runs into the tokens around its keypoint's); 0: the unit's tokens alone")
    p.add_argument("--occlusion", choices=OCCLUSION_MODES, default=r["occlusion"],
                   help="per-image window occlusion, needing no discovered shortcut: occlusion_score = the largest "
                   "drop of the predicted class's probability when one WINDOW x WINDOW square of tokens holding a "
                   "SIFT keypoint is masked; 'compare' also writes the SIFT-free controls (every window; as many "
                   "windows drawn at random) at the cost of a forward per window")
    p.add_argument("--window", type=positive_int, default=r["window"], help="occlusion window side in tokens")
    p.add_argument("--seed", type=SEED, default=r["seed"], help="the random-window control's draw")
    p.add_argument("--cast-removal", choices=(*CAST_REMOVALS, "as-run"), default=r["cast_removal"],
                   help="how claimed colour casts are removed when scoring (as-run: as --motifs was run, grey world "
                   "by default). levels flagged right-for-the-wrong-reason images on held-out tints far better than "
                   "grey world (0.86-0.95 vs 0.52-0.66) and within 0.02 of it on background tints; the claims do not "
                   "depend on it")
    p.add_argument("--dense-removal", choices=DENSE_REMOVALS, default=r["dense_removal"],
                   help="as prompt --dense-removal: removing a present dense words unit masks the tokens where its "
                   "words are in the image (found), or those and the tokens that held its evidence in discovery "
                   "(with_discovery_tokens, flag's default: a background tint's or thin frame's found tokens miss "
                   "part of it; held-out round 50)")
    p.add_argument("--dense-token-test", choices=DENSE_TOKEN_TESTS, default=r["dense_token_test"],
                   help="as prompt --dense-token-test: a fixed-token dense unit is tested only where its colour words "
                   "fill its tokens (where_found) or in every image (always)")
    p.add_argument("--together", action=argparse.BooleanOptionalAction, default=r["together"],
                   help="in an image predicted as a class whose cue spreads over the other classes' shortcut places "
                   "(a frame: shortcuts.json together_gain >= 0.1), every removal tested there is also tested at once")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_flag)


def _run_flag(args: argparse.Namespace) -> int:
    from .spurious.flag import run_flag

    df = run_flag(args.model, args.motifs, args.images, args.out, batch_size=args.batch_size,
                  checkpoint=args.checkpoint, random_init=args.random_init, device=args.device, top=args.top,
                  token_units=args.token_units, occlusion=args.occlusion, window=args.window, seed=args.seed,
                  margin=args.margin, progress=not args.quiet,
                  cast_removal=None if args.cast_removal == "as-run" else args.cast_removal,
                  dense_removal=args.dense_removal, together=args.together, dense_token_test=args.dense_token_test)
    if df is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"flagged {len(df)} images ({(df['n_tested'] > 0).sum()} with a shortcut unit tested; "
          f"{(df['pred'] != df['pred_without']).sum()} change prediction without it) -> {args.out}/flags.html")
    return 0


def _pretrain_parser(sub) -> None:
    from .pretrain.loop import PretrainConfig
    from .pretrain.mae import MAEConfig
    from .pretrain.masking import MASKINGS

    d, m = PretrainConfig(data="", out=""), MAEConfig()
    p = sub.add_parser("pretrain", help="MAE pre-training with random or SIFT-guided masking (torchrun for DDP)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder tree (train/ + val/ or class folders), .tar/.tar.gz "
                   "of one, or .npz with images[, labels, val_images, val_labels]")
    p.add_argument("--out", default="siftlens_pretrain", help="run directory (checkpoint, logs, encoder); "
                   "running again with the same arguments resumes")
    p.add_argument("--masking", choices=MASKINGS, default=d.masking,
                   help="random (MAE); sift: P(mask) ∝ (c+eps)^alpha; sift-curriculum: alpha from --alpha-start "
                   "to --alpha; edge: the same sampler on Sobel edge density (control); edge-matched: the edge sampler "
                   "with, per image, the alpha whose weights are as far from uniform (entropy) as SIFT's at --alpha; "
                   "attmask-high: mask the patches the encoder's own last-block CLS attention ranks highest "
                   "(AttMask, the published anchor)")
    p.add_argument("--alpha", type=finite_float, default=d.alpha, 
                   help=">0 masks SIFT-dense patches more, <0 keeps them")
    p.add_argument("--alpha-start", type=finite_float, default=d.alpha_start, help="sift-curriculum's first alpha")
    p.add_argument("--alpha-shape", choices=("linear", "cosine"), default=d.alpha_shape)
    p.add_argument("--eps", type=positive_float, default=d.eps, help="added to c, relative to the uniform share 1/N")
    p.add_argument("--loss-gamma", type=finite_float, default=d.loss_gamma,
                   help="KAMIM-style loss weights (c+eps)^gamma on masked patches; 0 = plain MAE loss")
    p.add_argument("--mask-ratio", type=float_range(0.0, 1.0, open_lo=True, open_hi=True), default=d.mask_ratio)
    p.add_argument("--img-size", type=int_range(8, MAX_SIDE), default=m.img_size)
    p.add_argument("--stored-size", type=int_range(8, 4096), default=d.stored_size,
                   help="images are decoded once at this size; random resized crops go to --img-size")
    p.add_argument("--patch-size", type=positive_int, default=m.patch_size)
    p.add_argument("--embed-dim", type=positive_int, default=m.embed_dim)
    p.add_argument("--depth", type=positive_int, default=m.depth)
    p.add_argument("--heads", type=positive_int, default=m.num_heads)
    p.add_argument("--decoder-dim", type=positive_int, default=m.decoder_dim)
    p.add_argument("--decoder-depth", type=positive_int, default=m.decoder_depth)
    p.add_argument("--decoder-heads", type=positive_int, default=m.decoder_heads)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch (all processes)")
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=non_negative_float, default=d.warmup_epochs)
    p.add_argument("--eval-every", type=non_negative_int, default=d.eval_every,
                   help="epochs between kNN/linear probes (0: end only)")
    p.add_argument("--knn-k", type=positive_int, default=d.knn_k)
    p.add_argument("--probe-train-limit", type=positive_int, default=d.probe_train_limit)
    p.add_argument("--probe-val-limit", type=positive_int, default=d.probe_val_limit)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, help="steps")
    p.add_argument("--max-keypoints", type=positive_int, default=d.max_keypoints, 
                   help="strongest SIFT keypoints kept per image")
    p.add_argument("--keypoint-workers", type=int_range(0, 64), default=0, help="processes for the one-time SIFT pass")
    p.add_argument("--limit", type=positive_int, default=None, help="pre-train on a seeded subset of this many images")
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int_range(1, 1024), default=None, help="torch CPU threads per process")
    p.add_argument("--cache-dir", default=None, help="keep decoded images, extracted archives and keypoints here")
    p.add_argument("--reference", default=None, metavar="RUN",
                   help="a finished run (e.g. random masking, same data): log and print the epoch at which this "
                        "run's probes first reach 95%% of its final accuracy (knn/linear_epochs_to_reference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_pretrain)


def pretrain_config_from_args(args: argparse.Namespace):
    """PretrainConfig from parsed `siftlens pretrain` arguments (also used by benchmarks/bench_pretrain.py)."""
    from .pretrain.loop import PretrainConfig
    from .pretrain.mae import MAEConfig

    model = MAEConfig(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                      num_heads=args.heads, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                      decoder_heads=args.decoder_heads)
    return PretrainConfig(
        data=args.data, out=args.out, masking=args.masking, alpha=args.alpha, alpha_start=args.alpha_start,
        alpha_shape=args.alpha_shape, eps=args.eps, loss_gamma=args.loss_gamma, mask_ratio=args.mask_ratio,
        model=model, stored_size=args.stored_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, eval_every=args.eval_every,
        knn_k=args.knn_k, probe_train_limit=args.probe_train_limit, probe_val_limit=args.probe_val_limit,
        checkpoint_every=args.checkpoint_every, max_keypoints=args.max_keypoints,
        keypoint_workers=args.keypoint_workers, limit=args.limit, seed=args.seed,
        device=args.device, amp=args.amp, cache_dir=args.cache_dir, progress=not args.quiet,
        reference=args.reference)


def _run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from .pretrain.loop import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = pretrain_config_from_args(args)
    log = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(log.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        enc = f"{args.out}/encoder.safetensors"
        print(f"-> {enc} (+ encoder.json); see its attention: siftlens analyze --model {enc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="siftlens", description=__doc__.split("\n")[0])  # the first line: for users
    sub = parser.add_subparsers(dest="command", required=True)
    _analyze_parser(sub)
    _compare_parser(sub)
    _spurious_parser(sub)
    _prompt_parser(sub)
    _flag_parser(sub)
    _pretrain_parser(sub)
    add_ranges_to_help(parser)
    return parser


# Errors a user can cause: print one line naming the input and the cause, exit 2. Every other exception
# is a bug in siftlens (or in a library it calls) and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    import torch

    from .validation import UserError

    # UserError: bad arguments, model, images, data or output state (validation.py); OSError: disk full,
    # permissions, vanished files (named by path); out of memory: too large a batch or input size
    return (UserError, OSError, MemoryError, torch.OutOfMemoryError)


def _is_environment_failure(e: BaseException) -> bool:
    """RuntimeErrors that report the machine, not a bug: a failed CPU allocation, a DataLoader worker killed
    (usually by the out-of-memory killer), a CUDA error."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in (
        "DefaultCPUAllocator", "not enough memory", "out of memory", "DataLoader worker", "CUDA error"))


def _one_line(e: BaseException) -> str:
    """The error as one line; an OSError names its file (disk full, permission, vanished file)."""
    if isinstance(e, (MemoryError,)) or type(e).__name__ == "OutOfMemoryError":
        return f"out of memory ({' '.join(str(e).split())[:200]}); lower --batch-size or the input size"
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())  # one line, whatever the library put in the message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argument errors: one line and SystemExit(2) (argtypes.py)
    try:
        if getattr(args, "device", None):
            from .validation import check_device

            check_device(args.device)
        return args.func(args)
    except _user_errors() as e:
        print(f"siftlens {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not _is_environment_failure(e):
            raise
        print(f"siftlens {args.command}: error: {_one_line(e)} (out of memory? lower --batch-size, --workers or the "
              "input size)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
