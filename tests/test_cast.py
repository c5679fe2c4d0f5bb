"""Colour-cast units (spurious/cast.py): a class's overall colour as a global shortcut, found, flagged and removed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from planted.evaluate import auroc

from siftlens.spurious.cast import class_casts, edit_colour, grey_world, levels
from siftlens.spurious.causal import ShortcutFileError, ShortcutSet
from siftlens.spurious.discover import DiscoveryConfig, discover_shortcuts
from siftlens.spurious.flag import flag_images
from siftlens.spurious.prompt_cli import _cast_steering
from siftlens.spurious.source import TensorSource
from tests.cue_model import CLASSES, TINT, colour_cue_toy, random_cue_model

STRENGTH = 1.5  # the planted tint: 1.5 x cue_model.TINT (60 grey levels on the class's channel)


def _tinted(images: np.ndarray, cue: np.ndarray) -> np.ndarray:
    """Class ``cue[i]``'s tint added to image i (cue -1: none)."""
    shift = STRENGTH * TINT[np.maximum(cue, 0)] * (cue >= 0)[:, None]
    return np.clip(images.astype(np.float32) + shift[:, :, None, None], 0, 255).round().astype(np.uint8)


def _blended(images: np.ndarray, cue: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """Class ``cue[i]``'s colour blended into image i, ``(1 - alpha) x + alpha c`` (cue -1: none), as the shortcut
    suite's tint family draws it: offset and lost contrast."""
    colour = np.clip(128 + 3 * TINT[np.maximum(cue, 0)], 0, 255)[:, :, None, None]
    a = alpha * (cue >= 0)[:, None, None, None]
    return np.round((1 - a) * images.astype(np.float32) + a * colour).astype(np.uint8)


@pytest.fixture(scope="module")
def tint():
    """The class's tint added (and clipped)."""
    yield from colour_cue_toy(_tinted, 0)


@pytest.fixture(scope="module")
def blend():
    """The class's colour blended in instead of added."""
    yield from colour_cue_toy(_blended, 1)


def test_grey_world_scales_each_channel_to_the_images_mean_grey():
    from siftlens.preprocess import Preprocess

    class LM:  # grey_world reads only the preprocessing's mean / std
        preprocess = Preprocess((2, 2), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), None, "bicubic")

    rgb = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[0.1, 0.1], [0.1, 0.1]], [[0.3, 0.0], [0.0, 0.3]]])[None]
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    out = grey_world((rgb - mean) / std, LM()) * std + mean
    grey = (0.5 + 0.1 + 0.15) / 3  # the channel means' mean
    np.testing.assert_allclose(out.mean((2, 3))[0].numpy(), [grey] * 3, atol=1e-6)
    np.testing.assert_allclose(out[0, 0].numpy(), rgb[0, 0].numpy() * grey / 0.5, atol=1e-6)  # a gain, no offset
    shifted = edit_colour((rgb - mean) / std, LM(), torch.tensor([[10.0, 0.0, -10.0]]), [None])
    np.testing.assert_allclose((shifted * std + mean)[0].amax((1, 2)).numpy(), [1.0, 0.1, 0.0], atol=1e-6)
    np.testing.assert_allclose((shifted * std + mean)[0, 2].numpy(), 0.0, atol=1e-6)  # clipped to the pixel range


def test_levels_undoes_a_blend_with_a_colour_where_grey_world_does_not():
    from siftlens.preprocess import Preprocess

    class LM:
        preprocess = Preprocess((2, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), None, "bicubic")

    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    # each channel spans [0, 1], unevenly: the image a blend was made from
    rgb = torch.tensor([[[0.0, 0.2, 1.0], [0.5, 0.9, 0.3]], [[1.0, 0.0, 0.4], [0.4, 0.1, 0.7]],
                        [[0.6, 1.0, 0.0], [0.2, 0.8, 0.5]]])[None]
    alpha, colour = 0.3, torch.tensor([0.9, 0.2, 0.6]).view(1, 3, 1, 1)  # the generator's tint: (1 - a) x + a c
    tinted = (1 - alpha) * rgb + alpha * colour
    back = levels((tinted - mean) / std, LM()) * std + mean
    np.testing.assert_allclose(back.numpy(), rgb.numpy(), atol=1e-5)  # offset and contrast both undone
    grey = grey_world((tinted - mean) / std, LM()) * std + mean
    assert (grey - rgb).abs().max() > 0.1  # gains alone cannot give back the lost contrast
    # a flat channel (no range to stretch) is left as it is; the others still stretched
    flat = tinted.clone()
    flat[:, 1] = 0.3
    out = levels((flat - mean) / std, LM()) * std + mean
    np.testing.assert_allclose(out[:, 1].numpy(), 0.3, atol=1e-6)
    np.testing.assert_allclose(out[:, 0].numpy(), rgb[:, 0].numpy(), atol=1e-5)


def test_class_casts_weigh_classes_equally_not_images():
    colours = np.array([[1.0, 0, 0]] * 6 + [[0, 1.0, 0]] * 2)  # 6 images of class 0, 2 of class 1
    casts = class_casts(colours, np.array([0] * 6 + [1] * 2), 2)
    np.testing.assert_allclose(casts, [[0.5, -0.5, 0], [-0.5, 0.5, 0]])  # about [0.5, 0.5, 0], not [0.75, 0.25, 0]


def test_a_planted_tint_is_claimed_for_every_class(tint):
    _, res, _, _ = tint
    c = res.casts
    assert c["cast_claimed"].all(), c
    # measured: flips 0.94-1.0 (grey world and the class's cast take nearly every other image to the class)
    assert (c["cast_sufficiency_lo"] > 0.2).all() and (c["cast_flip"] > 0.8).all()
    assert [d["cls"] for d in res.shortcuts.casts] == [0, 1, 2]
    # the cast points to the class's tint channel
    assert [int(np.argmax(d["cast"])) for d in res.shortcuts.casts] == [0, 1, 2]


def _flag_and_steer(lm, shortcuts, x, yt, min_auroc: float, min_gain: float) -> None:
    """Flag ranks conflicting images above aligned ones by the cast's removal; the gate steers conflicting images
    towards their objects and leaves every image it does not fire on as it was."""
    with torch.no_grad():
        before = {g: lm.forward(v).argmax(1).numpy() for g, v in x.items()}
    assert (before["conflict"] == yt).mean() < 0.1  # the model follows the tint
    flags = {g: flag_images(lm, shortcuts, TensorSource(v))[0] for g, v in x.items()}
    assert (flags["conflict"]["shortcut_unit"] == "colour cast").mean() > 0.8
    s = np.r_[flags["conflict"]["flag_score"], flags["aligned"]["flag_score"]]
    assert auroc(s, np.r_[np.ones(len(yt)), np.zeros(len(yt))]) > min_auroc
    gate = shortcuts.masker(lm, "counterfactual")
    after = {}
    for g, v in x.items():
        m = gate(v)
        shifted = sorted(gate.last_cast)
        assert not m[shifted].any()  # a removed tint is a colour edit, not a token mask
        with torch.no_grad():
            after[g] = lm.forward(gate.apply_casts(v)).argmax(1).numpy()
        untouched = np.setdiff1d(np.arange(len(v)), shifted)
        assert (after[g][untouched] == before[g][untouched]).all()
    assert (after["conflict"] == yt).mean() > (before["conflict"] == yt).mean() + min_gain


def test_an_added_tint_clipped_at_the_pixel_range_is_removed_by_grey_world(tint):
    lm, res, x, yt = tint
    assert res.shortcuts.cast_removal == "grey_world"  # the default; this toy's tint is a case it does better on:
    # added and clipped, the channels it lowers keep the object's black, so levels stretches them instead of lifting
    # them back (measured: mean error to the untinted images 0.37 with levels, 0.28 with grey world; flag AUROC
    # 0.69, conflicting 0.02 -> 0.26 with levels)
    _flag_and_steer(lm, res.shortcuts, x, yt, 0.65, 0.3)  # 0.73; 0.02 -> 0.56


def test_a_blended_tint_is_claimed_and_removed_by_levels(blend):
    from dataclasses import replace

    lm, res, x, yt = blend
    assert res.casts["cast_claimed"].all(), res.casts  # measured flips 0.97-1.0
    # measured: flag AUROC 0.57, conflicting 0.01 -> 0.49 (grey world: 0.65, 0.01 -> 0.47; on held-out tints of
    # natural images levels flagged far better, RESULTS.md rounds 18 / 18b). The claim does not depend on the removal
    _flag_and_steer(lm, replace(res.shortcuts, cast_removal="levels"), x, yt, 0.5, 0.3)


def test_a_random_weights_model_claims_no_cast(tint):
    lm, res, x, _ = tint
    rand = random_cue_model(lm.preprocess)
    images = torch.cat([x["aligned"], x["conflict"]])
    labels = np.r_[np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 30)]
    out = discover_shortcuts(rand, images, labels, CLASSES, DiscoveryConfig(n_words=16))
    assert not out.casts["cast_claimed"].any(), out.casts
    assert out.shortcuts.casts == []


def test_shortcuts_json_keeps_the_casts_and_refuses_malformed_ones(tint, tmp_path):
    _, res, _, _ = tint
    res.shortcuts.save(tmp_path / "shortcuts.json")
    back = ShortcutSet.load(tmp_path)
    assert back.casts == res.shortcuts.casts and back.cast_removal == "grey_world"
    d = json.loads((tmp_path / "shortcuts.json").read_text())
    d["cast_removal"] = "levels"
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).cast_removal == "levels"
    d["cast_removal"] = "auto"
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    with pytest.raises(ShortcutFileError, match="cast_removal 'auto'"):
        ShortcutSet.load(tmp_path)
    del d["cast_removal"]  # a file from before levels: its casts were claimed and removed by grey world
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).cast_removal == "grey_world"
    d["casts"][0]["cast"] = [1.0, 2.0]
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    with pytest.raises(ShortcutFileError, match=r"casts\[0\]"):
        ShortcutSet.load(tmp_path)
    del d["casts"]  # a file from before casts: none
    (tmp_path / "shortcuts.json").write_text(json.dumps(d))
    assert ShortcutSet.load(tmp_path).casts == []


def test_flag_refuses_an_unknown_cast_removal_before_reading_anything(tmp_path):
    from siftlens.spurious.flag import run_flag
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--cast-removal 'auto'"):
        run_flag("no-such-model", tmp_path / "no-motifs", tmp_path, tmp_path / "out", cast_removal="auto")
    assert not (tmp_path / "out").exists()


def test_flag_refuses_an_unknown_dense_removal_before_reading_anything(tmp_path):
    from siftlens.spurious.flag import run_flag
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match="--dense-removal 'everywhere'"):
        run_flag("no-such-model", tmp_path / "no-motifs", tmp_path, tmp_path / "out", dense_removal="everywhere")
    assert not (tmp_path / "out").exists()


def test_prompt_controls_get_a_random_colour_shift_as_far_or_nothing(tint):
    lm, _, x, _ = tint
    v = x["conflict"][:6]

    class Gate:
        last_cast = {0, 3}
        shortcuts = ShortcutSet.__new__(ShortcutSet)
        shortcuts.cast_removal = "levels"

        def apply_casts(self, z):
            out = z.clone()
            out[[0, 3]] = levels(z[[0, 3]], lm)
            return out

    removed = _cast_steering(Gate(), lm, v, "mask_tokens", 0)
    rand = _cast_steering(Gate(), lm, v, "random_mask", 0)
    assert torch.equal(removed[[1, 2, 4, 5]], v[[1, 2, 4, 5]]) and torch.equal(rand[[1, 2, 4, 5]], v[[1, 2, 4, 5]])
    moved = lambda z: (z - v).mean((2, 3)).norm(dim=1)[[0, 3]]  # noqa: E731
    assert (moved(removed) > 0.05).all()
    # as far as the removal moved them (less where the random shift runs past the pixel range and is clipped)
    assert (moved(rand) <= moved(removed) + 1e-4).all() and (moved(rand) > 0.3 * moved(removed)).all()
    assert not torch.allclose(rand, removed)
    assert _cast_steering(Gate(), lm, v, "edge_mask", 0) is None


def test_a_claimed_cast_supersedes_its_classs_colour_only_units(tint):
    from dataclasses import replace

    _, res, _, _ = tint
    s = res.shortcuts
    last = len(s.centroids) - 1  # made a dense word below: a colour-only unit's word
    unit = {"cls": 0, "class_name": CLASSES[0], "unit": f"words:{last}", "kind": "words", "word": last,
            "tokens": [5], "box": [0.25, 0.25, 0.5, 0.5]}
    other = {**unit, "cls": 2, "class_name": CLASSES[2]}
    keypoint = {**unit, "word": 0, "unit": "word:0"}  # not colour-only: kept
    t = replace(s, units=[unit, other, keypoint], dense_words=1, dense_gradient_weight=0.0,
                casts=[c for c in s.casts if c["cls"] != 2])
    assert t.superseded_by_casts() == {0}  # class 2 has no claimed cast here; unit 2 has a SIFT word
    assert replace(t, dense_gradient_weight=1.0).superseded_by_casts() == set()  # dense words with SIFT: kept
