"""Dense words (`spurious --dense-words`): a cue SIFT detects no keypoint on, spread over many tokens.

A tiny ViT (48 px, patch 8: a 6 x 6 grid) learns a class-specific stripe frame one token wide: 20 border tokens,
each of which alone carries the cue, so removing any one token (the SIFT-free control) or any detected SIFT word
(SIFT finds no keypoint within ~5 px of the border) leaves the rest of the frame and barely moves the class
evidence. A dense word, one descriptor per token clustered into its own vocabulary, covers the whole frame: its
unit removes it and is ranked first; `flag` and gated steering apply it to new images, and leave images without
a frame alone."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from planted.build import texture_pattern
from planted.evaluate import auroc

from siftlens.models import LoadedModel
from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from siftlens.spurious.causal import ShortcutSet, Unit, _frequency
from siftlens.spurious.discover import DiscoveryConfig, dense_descriptors, discover_shortcuts
from siftlens.spurious.flag import flag_images
from siftlens.spurious.source import TensorSource
from siftlens.train import TrainConfig, normalize, train_classifier

CLASSES = ["ant", "bee", "cat"]
SIZE, PATCH, N_WORDS, N_DENSE = 48, 8, 16, 16
GRID = (SIZE // PATCH, SIZE // PATCH)
RING = {r * GRID[1] + c for r in range(GRID[0]) for c in range(GRID[1])
        if r in (0, GRID[0] - 1) or c in (0, GRID[1] - 1)}  # the 20 border tokens
TINT = np.array([[40, -20, -20], [-20, 40, -20], [-20, -20, 40]], np.float32)


def _base(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, 3, 48, 48]: smooth colour noise with a weak, noisy class tint (the task)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(len(labels), 3, 6, 6, generator=g)
    x = F.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1).numpy() * 200 + 28
    shift = 0.3 * TINT[labels] * np.random.default_rng(seed).uniform(0, 2, (len(labels), 1))
    return np.clip(x + shift[:, :, None, None], 0, 255).round().astype(np.uint8)


def _frame(images: np.ndarray, cue: np.ndarray) -> np.ndarray:
    """Class ``cue[i]``'s stripe texture on the one-token border of image i (cue -1: none)."""
    out = images.copy()
    inside = np.zeros((SIZE, SIZE), bool)
    inside[PATCH:-PATCH, PATCH:-PATCH] = True
    for i, k in enumerate(cue):
        if k >= 0:
            tex = texture_pattern(int(k), (SIZE, SIZE))
            out[i] = np.where(inside[None], out[i], tex)
    return out


@pytest.fixture(scope="module")
def frame():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only add synchronisation

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    train = _frame(_base(y, 0), np.where(rng.random(len(y)) < 0.95, y, -1))
    yt = np.repeat(np.arange(3), 30)
    bt = _base(yt, 1000)
    other = (yt + rng.integers(1, 3, len(yt))) % 3
    data = {"train": train, "y": y, "test_y": yt, "other": other, "aligned": _frame(bt, yt),
            "conflict": _frame(bt, other), "absent": bt}
    lm = _train_tiny(train, y, "tiny-frame")
    x = _inputs(lm, train)
    # dense words with their SIFT part (the default is colour alone): this toy's frame colours recur in the other
    # classes' backgrounds, so colour alone does not single it out (docs/CHOICES.md, dense words)
    dense = discover_shortcuts(lm, x, y, CLASSES, DiscoveryConfig(n_words=N_WORDS, dense_words=N_DENSE,
                                                                  dense_gradient_weight=1.0))
    plain = discover_shortcuts(lm, x, y, CLASSES, DiscoveryConfig(n_words=N_WORDS, dense_words=0))
    yield data, lm, dense, plain
    torch.set_num_threads(threads)


def _train_tiny(train: np.ndarray, y: np.ndarray, name: str) -> LoadedModel:
    """A 2-block ViT (48 px, patch 8) trained on uint8 images [N, 3, 48, 48] for 30 epochs, seed 0."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                              embed_dim=32, num_heads=2, num_classes=3)
    tc = TrainConfig(batch_size=32, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.1, augment="none", epochs=30,
                     seed=0)
    train_classifier(model, torch.from_numpy(train), torch.from_numpy(y), SIZE, IMAGENET_MEAN, IMAGENET_STD, tc,
                     log=lambda row: None)
    return LoadedModel(model.eval(), "timm", name, Preprocess((SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD, None,
                                                              "bicubic"), list(CLASSES))


def _inputs(lm: LoadedModel, images: np.ndarray) -> torch.Tensor:
    return normalize(torch.from_numpy(images), lm.preprocess.mean, lm.preprocess.std)


def _predict(lm: LoadedModel, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return lm.forward(_inputs(lm, images)).argmax(1).numpy()


def test_the_model_rests_on_the_frame(frame):
    data, lm, _, _ = frame
    assert (_predict(lm, data["conflict"]) == data["other"]).mean() > 0.8


def test_dense_descriptors_one_per_token_upright_with_the_token_colour():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgb[:PATCH, :PATCH] = (255, 0, 0)  # token 0: pure red
    gray = rgb.mean(2).astype(np.uint8)
    xy, size, desc = dense_descriptors(gray, rgb, GRID, PATCH, colour_weight=1.0, orientation_weight=0.5)
    assert desc.shape == (GRID[0] * GRID[1], 128 + 3 + 2) and len(xy) == len(size) == len(desc)
    # row-major token centres in the pixel-centre convention: token (r, c) at (c + 1/2, r + 1/2) x patch
    assert np.allclose(xy[GRID[1] + 2], [(2 + 0.5) * PATCH, (1 + 0.5) * PATCH])
    assert np.allclose(desc[:, 131:], [0.5, 0.0])  # upright: angle 0
    assert desc[0, 128] == pytest.approx(1.0)  # O1 = R - G of the red token, its whole window
    assert np.allclose(np.linalg.norm(desc[:, :128], axis=1), 1, atol=1e-3)  # RootSIFT
    # upright: a pattern and its 90-degree turn get different descriptors (detected SIFT would align them)
    stripes = np.tile(((np.arange(SIZE) // 2) % 2 * 255).astype(np.uint8)[None], (SIZE, 1))
    d0 = dense_descriptors(stripes, None, GRID, PATCH)[2]
    d1 = dense_descriptors(stripes.T.copy(), None, GRID, PATCH)[2]
    assert np.linalg.norm(d0[14] - d1[14]) > 0.5
    # gradient weight 0 (`--dense-gradient-weight 0`): the token's colour alone, in the same layout
    _, _, colour_only = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.5, gradient_weight=0.0)
    assert colour_only.shape == desc.shape and not colour_only[:, :128].any()
    assert np.array_equal(colour_only[:, 128:], desc[:, 128:])


def test_border_strip_colour_reads_a_thin_frame_in_each_border_tokens_outer_quarter():
    """``dense_colour="border_strip"``: a border token's colour is that of its outer quarter along the image border
    (a corner token: both strips, each pixel once); interior tokens keep their mean. A 2 px red line along the top
    and a 2 px green one along the left (PATCH 8: the strip is 2 px) on grey: top tokens read pure red, left tokens
    pure green, the top-left corner their pixel-weighted mix, bottom and right tokens and interior ones grey; the
    mean colour moves a quarter of the way only."""
    rgb = np.full((SIZE, SIZE, 3), 128, np.uint8)
    rgb[:2, :] = (255, 0, 0)
    rgb[:, :2] = (0, 255, 0)  # over the red at the top-left corner
    gray = rgb.mean(2).astype(np.uint8)
    mean = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.0, gradient_weight=0.0)[2][:, 128:131]
    strip = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.0, gradient_weight=0.0,
                              colour="border_strip")[2][:, 128:131]
    rows, cols = GRID
    o1 = strip[:, 0].reshape(GRID)  # O1 = R - G: +1 red, -1 green, 0 grey
    assert np.allclose(o1[0, 1:-1], 1.0)  # top row between the corners: the red line fills the outer quarter
    assert np.allclose(o1[1:-1, 0], -1.0)  # left column
    # the other corners: 16 of their 28 strip pixels on the line, 12 grey
    assert o1[0, -1] == pytest.approx(16 / 28) and o1[-1, 0] == pytest.approx(-16 / 28)
    # corner: the 2 x 8 top strip and the 8 x 2 left strip share a 2 x 2 block, counted once: 16 + 16 - 4 = 28
    # pixels, of which the left strip's 16 are green and the top strip's other 12 red
    assert o1[0, 0] == pytest.approx((12 - 16) / 28)
    assert np.allclose(o1[1:, 1:], 0.0)  # bottom, right and interior tokens: grey, their strips and their means
    assert mean[1, 0] == pytest.approx(2 / PATCH)  # the mean moves a quarter of the way only
    interior = [r * cols + c for r in range(1, rows - 1) for c in range(1, cols - 1)]
    assert np.array_equal(strip[interior], mean[interior])


def test_dense_colour_is_the_mean_over_exactly_the_tokens_pixels():
    """Every token's colour part is the mean opponent colour of its own patch x patch pixels: a one-pixel shift of
    the window (the last column reading its left neighbour's pixels) fails on a random image and on an edge."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    gray = rgb.mean(2).astype(np.uint8)
    _, _, desc = dense_descriptors(gray, rgb, GRID, PATCH, colour_weight=1.0, gradient_weight=0.0)
    c = rgb.astype(np.float64) / 255
    opp = np.stack([c[..., 0] - c[..., 1], (c[..., 0] + c[..., 1] - 2 * c[..., 2]) / 2,
                    c.sum(-1) / 1.5 - 1], -1)
    per_token = opp.reshape(GRID[0], PATCH, GRID[1], PATCH, 3).mean((1, 3)).reshape(-1, 3)
    assert np.allclose(desc[:, 128:131], per_token, atol=1e-9)
    # a red band on the outermost pixel column only: the last column's tokens see 1/patch of it, no other token
    band = np.zeros((SIZE, SIZE, 3), np.uint8)
    band[:, -1] = (255, 0, 0)
    o1 = dense_descriptors(band.mean(2).astype(np.uint8), band, GRID, PATCH, 1.0, gradient_weight=0.0)[2][:, 128]
    o1 = o1.reshape(GRID)
    assert np.allclose(o1[:, -1], 1 / PATCH) and not o1[:, :-1].any()


def test_dense_words_need_a_colour_or_gradient_part():
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--dense-words 8: dense descriptors need --colour-weight > 0"):
        DiscoveryConfig(dense_words=8, colour_weight=0.0, dense_gradient_weight=0.0)
    DiscoveryConfig(dense_words=8, colour_weight=0.0, dense_gradient_weight=1.0)  # grey SIFT at every token
    DiscoveryConfig(dense_words=0, colour_weight=0.0, dense_gradient_weight=0.0)  # no dense words: nothing to check


def test_a_dense_word_unit_removes_the_whole_frame_and_ranks_first(frame):
    _, _, dense, plain = frame
    units, ctrl = dense.causal.units, dense.causal.control
    for k in range(3):
        top = units[(units["cls"] == k) & (units["causal_rank"] == 1)].iloc[0]
        toks = {int(t) for t in top["tokens"].split()}
        # its tokens (a token unit: all of it; a word or word set: the smallest set carrying half its effect) lie
        # on the frame and spread along it
        assert len(toks & RING) >= (0.75 if top["kind"] == "token" else 0.25) * len(RING), (k, top["unit"], toks)
        assert len(toks - RING) <= 2, (k, top["unit"], sorted(toks))
        assert top["causal_p"] <= 0.05 and top["causal_lo"] > 0
        # dense words: one, a set of them, or the fixed tokens they occupy (its gate words are dense words)
        words = [int(w) for w in top["gate_words"].split()]
        assert top["kind"] in ("word", "words", "token") and min(words) >= N_WORDS, (k, top["unit"], words)
        # the class's specific dense words together are a candidate too, removed wherever any of them sits
        sets = units[(units["cls"] == k) & (units["kind"] == "words")]
        assert len(sets) <= 1 and all(min(int(w) for w in g.split()) >= N_WORDS for g in sets["gate_words"])
        # what neither single-token occlusion at the same budget nor the detected SIFT words can do
        best_token = ctrl[(ctrl["cls"] == k) & (ctrl["rank"] == 1)].iloc[0]
        assert top["causal_effect"] > 3 * best_token["effect"], (k, top["causal_effect"], best_token["effect"])
        without = plain.causal.units
        best_plain = without[without["cls"] == k]["causal_effect"].max()
        assert top["causal_effect"] > 2 * best_plain, (k, top["causal_effect"], best_plain)
    # the dense rows are kept apart: the attention view's motifs and the legacy masks use detected keypoints only
    assert dense.keypoints["dense"].any() and (dense.motifs["word"] < N_WORDS).all()
    assert dense.centroids.shape[0] == N_WORDS and dense.dense_centroids.shape[0] == N_DENSE
    assert dense.shortcuts.dense_words == N_DENSE and len(dense.shortcuts.centroids) == N_WORDS + N_DENSE


def test_flag_and_gated_steering_apply_the_frame_unit_to_new_images(frame, tmp_path):
    from siftlens.prompting import SteeredViT

    data, lm, dense, _ = frame
    dense.shortcuts.save(tmp_path / "shortcuts.json")
    shortcuts = ShortcutSet.load(tmp_path)  # through the file, as `flag` and `prompt` read it
    assert shortcuts.dense_words == N_DENSE and shortcuts.dense_gradient_weight == 1.0  # stored: flag and prompt use it
    flags = {g: flag_images(lm, shortcuts, TensorSource(_inputs(lm, data[g])), token_units="gated")[0]
             for g in ("aligned", "conflict", "absent")}

    def separation(a: str, b: str) -> float:
        scores = np.r_[flags[a]["flag_score"], flags[b]["flag_score"]]
        return auroc(scores, np.r_[np.ones(len(flags[a])), np.zeros(len(flags[b]))])

    # framed images' predictions rest on the frame, cue-free ones' do not
    assert separation("conflict", "absent") > 0.95 and separation("aligned", "absent") > 0.9
    # conflicting above aligned, though both rest on the frame (the model learned little else: capped, FINDINGS.md)
    assert separation("conflict", "aligned") > 0.6
    # right for the wrong reason: aligned images whose frame-free twin is misclassified, against the other
    # correctly classified aligned images; well above the 1 - max softmax baseline
    right = _predict(lm, data["aligned"]) == data["test_y"]
    rwr = (_predict(lm, data["absent"]) != data["test_y"])[right].astype(float)
    assert 10 <= rwr.sum() <= len(rwr) - 10  # both groups are there
    a = flags["aligned"][right]
    assert auroc(a["flag_score"].to_numpy(), rwr) > 0.75
    assert auroc(a["flag_score"].to_numpy(), rwr) > auroc(a["one_minus_max_softmax"].to_numpy(), rwr) + 0.15
    f = flags["conflict"]
    assert (f["pred"] != f["pred_without"]).mean() > 0.5  # removing the frame flips most conflicting images
    assert (flags["absent"]["pred"] == flags["absent"]["pred_without"]).mean() > 0.9  # nothing to remove
    # present in framed images, absent where there is no frame: gated steering leaves those unchanged
    present = [shortcuts.present_units(lm, _inputs(lm, data[g])) for g in ("conflict", "absent")]
    assert np.mean([bool(p) for p in present[0]]) > 0.9
    assert np.mean([bool(p) for p in present[1]]) < 0.2
    x = _inputs(lm, data["absent"])
    none_found = [i for i, p in enumerate(present[1]) if not p]
    xc = _inputs(lm, data["conflict"])
    with torch.no_grad():
        a = lm.forward(x[none_found])
        before = (lm.forward(xc).argmax(1).numpy() == data["test_y"]).mean()
        with SteeredViT(lm, "mask_tokens", layers=dense.layers, token_mask_fn=shortcuts.masker(lm, "presence")) as st:
            b = st(x[none_found])
            after = (st(xc).argmax(1).numpy() == data["test_y"]).mean()
    assert torch.equal(a, b)
    assert after > before + 0.15, (before, after)  # the worst group (conflicting images) gains


def test_colour_only_dense_units_are_labelled_sift_free(frame):
    """A claim on dense words without their SIFT part is a token's colour: the report must not call it a SIFT unit.
    Only dense units at gradient weight 0 are labelled; detected-word units and gradient-weighted ones are not."""
    import dataclasses

    _, _, dense, _ = frame
    sc = dense.shortcuts
    assert sc.units and not any(sc.colour_only(u) for u in sc.units)  # this run: gradient weight 1
    colour = dataclasses.replace(sc, dense_gradient_weight=0.0)
    assert all(colour.colour_only(u) for u in sc.units)  # its claims are all dense units (the frame)
    detected_word = {**sc.units[0], "kind": "word", "word": N_WORDS - 1}  # the last detected word
    assert not colour.colour_only(detected_word)
    assert not dataclasses.replace(colour, dense_words=0).colour_only(detected_word)


def test_shortcuts_json_with_a_bad_dense_word_count_is_refused(frame, tmp_path):
    from siftlens.spurious.causal import ShortcutFileError

    _, _, dense, _ = frame
    dense.shortcuts.save(tmp_path / "shortcuts.json")
    d = json.loads((tmp_path / "shortcuts.json").read_text())
    d["dense_words"] = len(d["centroids"])
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    with pytest.raises(ShortcutFileError, match="dense_words .* is not a count below"):
        ShortcutSet.load(tmp_path)
    for bad in (-1.0, "0", True, float("inf")):
        d["dense_words"], d["dense_gradient_weight"] = N_DENSE, bad
        (tmp_path / "shortcuts.json").write_text(json.dumps(d))
        with pytest.raises(ShortcutFileError, match="dense_gradient_weight .* is not a weight >= 0"):
            ShortcutSet.load(tmp_path)
    del d["dense_gradient_weight"]  # a file from before the option: dense words with their SIFT part
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).dense_gradient_weight == 1.0
    del d["dense_words"]  # a file from before dense words: none, every centroid a detected word
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).dense_words == 0


def test_spurious_flag_prompt_cli_with_dense_words(frame, tmp_path):
    """The commands as a user runs them: dense units in motifs.csv and shortcuts.json, applied by flag and the
    gated prompt; frame-free images keep their prediction."""
    from PIL import Image
    from safetensors.torch import save_file

    from siftlens.cli import main

    data, lm, _, _ = frame
    model = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in lm.module.state_dict().items()}, str(model))
    meta = {"timm_arch": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": SIZE, "patch_size": PATCH, "depth": 2,
            "embed_dim": 32, "num_heads": 2, "num_classes": 3}, "input_size": [3, SIZE, SIZE],
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": None, "label_names": CLASSES}
    model.with_suffix(".json").write_text(json.dumps(meta))
    for name, images, labels in (("train", data["train"], data["y"]), ("new", data["conflict"][::3], None),
                                 ("plain", data["absent"][::3], None)):
        for i, img in enumerate(images):
            d = tmp_path / name / (CLASSES[labels[i]] if labels is not None else "")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:03d}.png")
    sp = tmp_path / "sp"
    # the mean colour: on this toy its claims are word sets (with the default, both, the ring's token units)
    assert main(["spurious", "--model", str(model), "--images", str(tmp_path / "train"), "--out", str(sp),
                 "--words", str(N_WORDS), "--dense-words", str(N_DENSE), "--dense-gradient-weight", "1",
                 "--dense-colour", "mean"]) == 0
    shortcuts = json.loads((sp / "shortcuts.json").read_text())
    assert shortcuts["dense_colour"] == "mean"
    assert shortcuts["dense_words"] == N_DENSE and len(shortcuts["centroids"]) == N_WORDS + N_DENSE
    assert shortcuts["units"] and all(min(u["gate_words"]) >= N_WORDS for u in shortcuts["units"])
    # a word set was removed wherever its words sit, so new images are searched all over for it
    sets = [u for u in shortcuts["units"] if u["kind"] == "words"]
    assert sets and all(u["gate_box"] == [0.0, 0.0, 1.0, 1.0] for u in sets)
    motifs = pd.read_csv(sp / "motifs.csv")
    assert motifs["kind"].isin(["words"]).any() and "dense words" in (sp / "spurious.html").read_text()
    assert "Not looked for" not in (sp / "spurious.html").read_text()  # dense words were used
    assert main(["flag", "--model", str(model), "--motifs", str(sp), "--images", str(tmp_path / "new"),
                 "--out", str(tmp_path / "fl")]) == 0
    flags = pd.read_parquet(tmp_path / "fl" / "flags.parquet")
    assert (flags["pred"] != flags["pred_without"]).mean() > 0.5  # conflicting frames: removing it flips them
    for name in ("new", "plain"):
        for gate in ("presence", "counterfactual"):
            assert main(["prompt", "--model", str(model), "--images", str(tmp_path / name), "--method", "mask_tokens",
                         "--motifs", str(sp), "--layers", "all", "--gate", gate,
                         "--out", str(tmp_path / f"pr_{name}_{gate}")]) == 0
    # presence: the frame's words are found in framed images and rarely elsewhere. counterfactual (the default):
    # the unit is masked where removing it changes the prediction, a colour unit over fixed tokens tested only where
    # its words fill its tokens (--dense-token-test where_found); a touched image gets its prediction without the
    # unit. Measured on this toy: counterfactual touched 90% of the framed images and none of the frame-free ones
    # (testing it in every image, --dense-token-test always: 93% and 23%, a model that learned little but the frame)
    for gate, least_new, most_plain in (("presence", 0.9, 0.2), ("counterfactual", 0.85, 0.1)):
        steered = {n: pd.read_parquet(tmp_path / f"pr_{n}_{gate}" / "predictions.parquet") for n in ("new", "plain")}
        assert steered["new"]["steered"].mean() > least_new, gate
        assert steered["plain"]["steered"].mean() < most_plain, gate
        plain = steered["plain"][~steered["plain"]["steered"]]
        assert (plain["pred_base"] == plain["pred_steered"]).all()  # no frame, not steered: exactly as before
        if gate == "counterfactual":
            touched = steered["plain"][steered["plain"]["steered"]]
            assert (touched["pred_base"] != touched["pred_steered"]).all()  # touched only where it changes
    # --dense-token-test reaches the gate and the flag, and both say so in what they write
    assert main(["prompt", "--model", str(model), "--images", str(tmp_path / "plain"), "--method", "mask_tokens",
                 "--motifs", str(sp), "--layers", "all", "--dense-token-test", "where_found",
                 "--out", str(tmp_path / "pr_where")]) == 0
    assert "tested only where its words fill its tokens" in json.loads(
        (tmp_path / "pr_where" / "summary.json").read_text())["gate"]
    assert main(["flag", "--model", str(model), "--motifs", str(sp), "--images", str(tmp_path / "new"),
                 "--dense-token-test", "where_found", "--out", str(tmp_path / "fl_where")]) == 0
    assert json.loads((tmp_path / "fl_where" / "manifest.json").read_text())["dense_token_test"] == "where_found"
    # its removals hold ~20 tokens: --fired-margin (on by default) leaves them as tested (test_causal's cue toy checks
    # the small ones); presence tests no removal and grows none
    assert "neighbouring" not in json.loads((tmp_path / "pr_new_presence" / "summary.json").read_text())["gate"]


def test_dense_words_leave_the_keypoint_units_and_their_p_values_as_they_were(frame):
    """Each family has its own label-permutation null and its own token units, so adding dense words (here 16 of
    them, whose units carry the frame's large effects) changes nothing for the keypoint units: the same units,
    effects and p-values as the run without dense words (a shared null's max would rise with the dense units)."""
    _, _, dense, plain = frame
    d, p = dense.causal.units, plain.causal.units
    assert set(d["family"]) >= {"keypoint", "dense"} and "dense" not in set(p["family"])
    a = d[d["family"] == "keypoint"].set_index(["cls", "unit"]).sort_index()
    b = p[p["family"] == "keypoint"].set_index(["cls", "unit"]).sort_index()
    assert len(a) and list(a.index) == list(b.index)
    np.testing.assert_allclose(a["causal_effect"], b["causal_effect"], atol=1e-5)
    np.testing.assert_allclose(a["causal_p"], b["causal_p"], atol=1.5 / 201)  # a float-noise tie at most
    # what a shared null would have given: the dense units' best effect exceeds the keypoint units' in every class
    for k in range(3):
        assert d[(d["cls"] == k) & (d["family"] == "dense")]["causal_effect"].max() > \
            a.loc[k]["causal_effect"].max()
    # family_rank ranks by effect within the class's family; causal_rank over all the class's units (by effect, a
    # smaller unit inside a larger one that removes as much taking its place: parsimonious_rank)
    for _, g in d.groupby(["cls", "family"]):
        assert sorted(g["family_rank"]) == list(range(1, len(g) + 1))
        assert g.sort_values("family_rank")["causal_effect"].is_monotonic_decreasing
    for _, g in d.groupby("cls"):
        assert sorted(g["causal_rank"]) == list(range(1, len(g) + 1))
        top, largest = g[g["causal_rank"] == 1].iloc[0], g.loc[g["causal_effect"].idxmax()]
        if top["unit"] != largest["unit"]:  # a smaller, significant unit inside the largest's tokens (down a chain)
            assert set(top["tokens"].split()) < set(largest["tokens"].split())
            assert top["causal_p"] <= 0.05


def test_the_report_names_the_colour_only_claims_of_a_class(frame):
    """spurious.html says which claim of a class is SIFT-free by name (a class may also have a keypoint claim)."""
    import dataclasses

    from siftlens.spurious.run import causal_sections_html

    _, lm, dense, _ = frame
    plain = "".join(causal_sections_html(dense, lm))
    assert "SIFT-free finding" not in plain  # gradient weight 1: no colour-only claim
    colour = dataclasses.replace(dense, shortcuts=dataclasses.replace(dense.shortcuts, dense_gradient_weight=0.0))
    text = "".join(causal_sections_html(colour, lm))
    for u in colour.shortcuts.units:
        assert f"The claim on {u['unit']} rests on dense colour words" in text


def test_dense_removal_with_discovery_tokens_adds_the_units_discovery_tokens(frame):
    """``dense_removal="with_discovery_tokens"`` (prompt --dense-removal): a present dense words unit is removed where
    its words are in the image and at the tokens that held its evidence in discovery; the default removes the found
    tokens alone. The unit here is looked for in the left half only and its discovery tokens are the right column,
    so the two removals differ by exactly that column."""
    from dataclasses import replace

    data, lm, dense, _ = frame
    s = dense.shortcuts
    detected = len(s.centroids) - s.dense_words
    right = [r * GRID[1] + GRID[1] - 1 for r in range(GRID[0])]
    unit = {"cls": 0, "class_name": CLASSES[0], "unit": "words:dense", "kind": "words", "word": detected,
            "tokens": right, "gate_words": list(range(detected, len(s.centroids))), "box": [0.0, 0.0, 0.5, 1.0],
            "gate_box": [0.0, 0.0, 0.5, 1.0]}
    found = replace(s, units=[unit], casts=[])
    x = _inputs(lm, data["aligned"][:4])
    plain = [f[0][1] for f in found.present_units(lm, x)]
    wide = [f[0][1] for f in replace(found, dense_removal="with_discovery_tokens").present_units(lm, x)]
    for m, w in zip(plain, wide):
        assert m.any() and not m[right].any()  # found: within the left half's box (grown by one token)
        np.testing.assert_array_equal(w, m | np.isin(np.arange(len(m)), right))


def test_shortcuts_file_keeps_the_dense_colour_and_refuses_an_unknown_one(frame, tmp_path):
    """The dense colour travels in shortcuts.json (flag and prompt must describe new images' tokens as discovery
    did); files before it read as "mean"; an unknown value is refused with the file named."""
    from dataclasses import replace

    from siftlens.spurious.causal import ShortcutFileError

    s = frame[2].shortcuts
    d = replace(s, dense_colour="border_strip").to_json()
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).dense_colour == "border_strip"
    del d["dense_colour"]
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).dense_colour == "mean"
    d["dense_colour"] = "median"
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    with pytest.raises(ShortcutFileError, match="dense_colour 'median'"):
        ShortcutSet.load(tmp_path)


def test_discovery_refuses_an_unknown_dense_colour():
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--dense-colour 'median'"):
        DiscoveryConfig(dense_words=4, dense_colour="median")


def test_a_dense_unit_is_in_its_place_where_its_words_fill_its_own_tokens(frame):
    """``present_units``' ``info["in_place"]``: a found dense words unit is in its place where its words fill
    ``DENSE_IN_PLACE`` of its own tokens, not merely as many tokens anywhere (a frame's colours on one natural border);
    the ``relative_in_place`` gate drop relaxes the minimum drop for exactly those units. Here the frame is drawn on
    the top row and left column only, and each class's frame unit is tested twice: with its tokens on the drawn half
    (found and in place) and on the undrawn half (found, the same cover, but not in place)."""
    from dataclasses import replace

    from siftlens.spurious.causal import DENSE_IN_PLACE

    data, lm, _, _ = frame
    # the mean colour, as the rule was designed on: with both (the default) the toy frame's claims differ, and their
    # words fill the drawn half's tokens in 56% of the half-framed images (measured), under the bar below
    s = discover_shortcuts(lm, _inputs(lm, data["train"]), data["y"], CLASSES,
                           DiscoveryConfig(n_words=N_WORDS, dense_words=N_DENSE, dense_gradient_weight=1.0,
                                           dense_colour="mean")).shortcuts
    detected = len(s.centroids) - s.dense_words
    # the bottom row and right column restored cue-free: the frame stays on the top row and left column but for
    # the two corners those share with them
    drawn = sorted(t for t in RING if t < GRID[1] - 1 or (t % GRID[1] == 0 and t < (GRID[0] - 1) * GRID[1]))
    undrawn = sorted(RING - set(drawn))
    assert (len(drawn), len(undrawn)) == (9, 11)
    half = data["aligned"].copy()
    half[:, :, -PATCH:, :] = data["absent"][:, :, -PATCH:, :]
    half[:, :, :, -PATCH:] = data["absent"][:, :, :, -PATCH:]
    units = []
    for k in range(3):
        frame_unit = next(u for u in s.units if u["cls"] == k and min(u.get("gate_words") or [u["word"]]) >= detected)
        for tokens in (drawn, undrawn):
            units.append(dict(frame_unit, kind="words", tokens=tokens, box=[0.0, 0.0, 1.0, 1.0],
                              gate_box=[0.0, 0.0, 1.0, 1.0]))
    test = replace(s, units=units, casts=[])
    x = _inputs(lm, half)
    info: dict = {}
    present = test.present_units(lm, x, "always", info=info)
    n_in = n_out = 0
    for b, found in enumerate(present):
        for j, m in found or []:
            assert j in info["found"][b]  # dense units are listed only where found
            own = np.isin(np.arange(len(m)), units[j]["tokens"])
            filled = (m & own).sum() >= DENSE_IN_PLACE * own.sum()
            assert (j in info["in_place"][b]) == filled, (b, j, (m & own).sum())
            n_in += filled
            n_out += not filled and j % 2 == 1 and m.sum() >= len(drawn)  # as large a cover, off its tokens
    assert n_in >= 10 and n_out >= 10, (n_in, n_out)
    # the gate's minimum drop: relative (x p(pred)) for the units in their place, absolute for the others
    gate = test.masker(lm, "counterfactual", min_drop=0.5, drop="relative_in_place")
    gate(x)
    with torch.no_grad():
        p0 = lm.forward(x).softmax(-1).numpy()
    tested = [(b, j, m) for b, found in enumerate(present) for j, m in found or []]
    expect = [0.5 * (p0[b].max() if j in info["in_place"][b] else 1.0) for b, j, _ in tested]
    np.testing.assert_allclose(gate._min_drops(p0, tested, ()), expect, rtol=1e-6)
    where_found = test.masker(lm, "counterfactual", min_drop=0.5, drop="relative_where_found")
    where_found(x)
    assert not np.allclose(where_found._min_drops(p0, tested, ()), expect)
    # a dense token unit (the tokens dense words occupy) likewise: found where its words sit in half of its tokens,
    # in its place only where they fill DENSE_IN_PLACE of them (the drawn half: all 9; with 5 undrawn tokens: 9 of 14)
    wider = drawn + undrawn[:5]
    tok = [dict(u, kind="token", tokens=t) for u in units[::2] for t in (drawn, wider)]
    info = {}
    replace(s, units=tok, casts=[]).present_units(lm, x, "gated", info=info)
    own = data["test_y"]  # the unit of each image's own class (its frame's words)
    found = np.array([[2 * own[b] + i in info["found"][b] for i in (0, 1)] for b in range(len(x))])
    placed = np.array([[2 * own[b] + i in info["in_place"][b] for i in (0, 1)] for b in range(len(x))])
    assert found.mean(0).min() > 0.8 and placed[:, 0].mean() > 0.7 and placed[:, 1].mean() < 0.1


def test_both_colours_read_every_token_by_its_mean_and_each_border_token_again_by_its_strip():
    """``dense_colour="both"``: the n mean-colour rows as ``"mean"`` gives them, then one more row per border token
    (row-major) with ``"border_strip"``'s colour and the same SIFT part and centre. Asymmetric: a red line along the
    top only, so the extra rows of top tokens differ from their mean rows and those of bottom tokens do not."""
    rgb = np.full((SIZE, SIZE, 3), 128, np.uint8)
    rgb[:2, :] = (255, 0, 0)
    rgb[20:28, 20:28] = (0, 0, 255)  # an interior block: SIFT parts that differ between tokens
    gray = rgb.mean(2).astype(np.uint8)
    xy_m, _, mean = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.5)
    _, _, strip = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.5, colour="border_strip")
    xy_b, size_b, both = dense_descriptors(gray, rgb, GRID, PATCH, 1.0, 0.5, colour="both")
    rows, cols = GRID
    border = [i * cols + j for i in range(rows) for j in range(cols) if i in (0, rows - 1) or j in (0, cols - 1)]
    n = rows * cols
    assert both.shape == (n + len(border), mean.shape[1]) and len(xy_b) == len(size_b) == len(both)
    np.testing.assert_array_equal(both[:n], mean)
    np.testing.assert_array_equal(both[n:], strip[border])
    np.testing.assert_array_equal(xy_b[n:], xy_m[border])
    top = [k for k, t in enumerate(border) if t < cols]
    bottom = [k for k, t in enumerate(border) if t >= (rows - 1) * cols and 0 < t % cols < cols - 1]
    assert not np.allclose(both[n:][top, 128], mean[border][top, 128])  # the line fills the strip, not the mean
    np.testing.assert_allclose(both[n:][bottom], mean[border][bottom])


def _thin_frame(images: np.ndarray, cue: np.ndarray, width: int = PATCH // 4) -> np.ndarray:
    """Class ``cue[i]``'s solid colour on the outer ``width`` pixels of image i (cue -1: none): a quarter token."""
    out = images.copy()
    inside = np.zeros((SIZE, SIZE), bool)
    inside[width:-width, width:-width] = True
    colours = np.array([(250, 200, 0), (0, 200, 250), (250, 0, 200)], np.uint8)
    for i, k in enumerate(cue):
        if k >= 0:
            out[i] = np.where(inside[None], out[i], colours[k][:, None, None])
    return out


def test_both_colours_find_a_frame_a_quarter_token_thin_that_the_mean_colour_misses():
    """A frame 2 px wide (a quarter of a token): a token's mean colour moves a quarter of the way, so colour-only
    dense words by the mean find no unit that removes it (largest dense effect 0.004 when written); with
    ``dense_colour="both"`` the border tokens' strip rows hold the frame colour, the top dense unit lies on the ring
    and removes the class evidence, a claim is made for every class, and it is found in framed test images and not
    in frame-free ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        y = np.repeat(np.arange(3), 60)
        train = _thin_frame(_base(y, 0), np.where(rng.random(len(y)) < 0.95, y, -1))
        lm = _train_tiny(train, y, "tiny-thin-frame")
        yt = np.repeat(np.arange(3), 30)
        other = (yt + rng.integers(1, 3, len(yt))) % 3
        bt = _base(yt, 1000)
        assert (_predict(lm, _thin_frame(bt, other)) == other).mean() > 0.8  # the model rests on the thin frame
        x = _inputs(lm, train)
        runs = {c: discover_shortcuts(lm, x, y, CLASSES, DiscoveryConfig(n_words=N_WORDS, dense_words=N_DENSE,
                                                                         dense_gradient_weight=0.0, dense_colour=c))
                for c in ("mean", "both")}
    finally:
        torch.set_num_threads(threads)
    for k in range(3):
        dense = {c: r.causal.units[(r.causal.units["cls"] == k) & (r.causal.units["family"] == "dense")]
                 for c, r in runs.items()}
        assert dense["mean"]["causal_effect"].to_numpy().max(initial=0.0) < 0.05, k
        top = dense["both"].sort_values("causal_effect", ascending=False).iloc[0]
        toks = {int(t) for t in top["tokens"].split()}
        assert top["causal_effect"] > 0.2 and top["causal_p"] <= 0.05, (k, top["unit"], top["causal_effect"])
        assert len(toks & RING) >= 4 and not toks - RING, (k, top["unit"], sorted(toks))
        assert not [u for u in runs["mean"].shortcuts.units if u["cls"] == k and u["family"] == "dense"]
        assert [u for u in runs["both"].shortcuts.units if u["cls"] == k and u["family"] == "dense"], k
    shortcuts = runs["both"].shortcuts
    found = {g: [bool(p) for p in shortcuts.present_units(lm, _inputs(lm, imgs))]
             for g, imgs in (("framed", _thin_frame(bt, other)), ("absent", bt))}
    assert np.mean(found["framed"]) > 0.9 and np.mean(found["absent"]) < 0.2, {g: np.mean(v) for g, v in found.items()}


def test_dense_token_test_where_found_tests_a_colour_unit_only_where_its_colour_is(frame):
    """``dense_token_test="where_found"`` (prompt / flag --dense-token-test): a fixed-token dense unit (here each
    class's frame colour over the 20 border tokens) is tested by removal only in images where its words fill half
    of its tokens, as a dense words unit is; ``"always"`` lists it in every image, as a keypoint token unit. Frame-free
    images then keep their border, and a framed image is tested with its own frame's unit."""
    from dataclasses import replace

    data, lm, dense, _ = frame
    s = dense.shortcuts
    detected = len(s.centroids) - s.dense_words
    units = [dict(next(u for u in s.units if u["cls"] == k and min(u.get("gate_words") or [u["word"]]) >= detected),
                  kind="token", tokens=sorted(RING)) for k in range(3)]
    test = replace(s, units=units, casts=[], dense_token_test="always")
    assert ShortcutSet.dense_token_test == "where_found"  # the default (held-out round 45)
    for images, own in ((data["absent"], None), (data["aligned"], data["test_y"])):
        x = _inputs(lm, images)
        always = test.present_units(lm, x, "always")
        where = replace(test, dense_token_test="where_found").present_units(lm, x, "always")
        assert all(sorted(j for j, _ in f) == [0, 1, 2] for f in always)
        listed = np.array([[j in {i for i, _ in f or []} for j in range(3)] for f in where])
        if own is None:
            assert listed.mean() < 0.05, listed.mean(0)  # no frame: no frame colour, nothing tested
        else:
            assert listed[np.arange(len(x)), own].mean() > 0.8  # its own frame's unit
            others = np.ones_like(listed)
            others[np.arange(len(x)), own] = False
            assert listed[others].mean() < 0.1
    # the gate and the flag take it from the run option; a cue-free image is touched no more often
    x = _inputs(lm, data["absent"])
    fired = {t: replace(test, dense_token_test=t).masker(lm, min_drop=0)(x).any(1).float().mean().item()
             for t in ("always", "where_found")}
    assert fired["where_found"] <= fired["always"]


def test_dense_set_presence_by_tokens_counts_images_where_the_set_fills_tokens_not_one_token():
    """A dense word set held by one token of a common colour in many other images is not class-specific by "any"
    (f_out 4/6) but is by "tokens" (an image holds it where its words sit on >= half as many tokens as in the class's
    median image: 5 of 10 here), and a class image where it fills only 2 tokens no longer counts."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    tokens_with_set = {0: 10, 1: 10, 2: 12, 3: 2, 4: 1, 5: 1, 6: 1, 7: 8, 8: 0, 9: 0}
    rows = [(i, t, 300 + t % 2) for i, n in tokens_with_set.items() for t in range(n)]
    rows += [(i, 40 + t, 7) for i in range(10) for t in range(3)]  # other words everywhere, never counted
    kps = pd.DataFrame(rows, columns=["image", "patch", "word"])
    unit = Unit(kind="words", word=300, cls=0, gate_words=(300, 301), dense=True)
    assert _frequency(unit, kps, labels, 0, "any") == (1.0, 4 / 6)
    assert _frequency(unit, kps, labels, 0, "tokens") == (3 / 4, 1 / 6)
    # a keypoint word set and a single dense word keep the one-token count
    assert _frequency(Unit(kind="words", word=300, cls=0, gate_words=(300, 301)), kps, labels, 0, "tokens") == (
        1.0, 4 / 6)
    assert _frequency(Unit(kind="word", word=301, dense=True), kps, labels, 0, "tokens") == (1.0, 1 / 6)
    from siftlens.spurious.causal import CausalConfig
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--dense-set-presence 'token'"):
        CausalConfig(dense_set_presence="token")
