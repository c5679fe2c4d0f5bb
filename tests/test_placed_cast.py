"""Colour casts with a place (spurious/placed_cast.py): a background tint, claimed by swapping cast maps, its place
the tinted ring, flagged and steered by masking that place in images predicted as its class."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from planted.evaluate import auroc

from siftlens.spurious.causal import CausalConfig, ShortcutSet, sample_images
from siftlens.spurious.discover import DiscoveryConfig, discover_shortcuts
from siftlens.spurious.flag import flag_images
from siftlens.spurious.placed_cast import (
    FAMILY,
    class_cast_maps,
    image_cells,
    map_edit_probs,
    placed_cast_check,
    placed_cast_unit,
)
from siftlens.spurious.placed_cast import cast_place as place_of
from siftlens.spurious.source import TensorSource
from tests.cue_model import CLASSES, SIZE, TINT, colour_cue_toy, random_cue_model

RING = np.ones((4, 4), bool)
RING[1:3, 1:3] = False  # the 12 border tokens of the 4 x 4 grid; the objects sit in the centre 2 x 2
CONFIG = DiscoveryConfig(n_words=16, causal=CausalConfig(placed_casts=True))


def _bg_blended(images: np.ndarray, cue: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Class ``cue[i]``'s colour blended into image i outside its centre 16 x 16 pixels (cue -1: none)."""
    colour = np.clip(128 + 3 * TINT[np.maximum(cue, 0)], 0, 255)[:, :, None, None]
    a = np.zeros((len(cue), 1, SIZE, SIZE), np.float32)
    a[:, :, :8], a[:, :, 24:], a[:, :, :, :8], a[:, :, :, 24:] = alpha, alpha, alpha, alpha
    a *= (cue >= 0)[:, None, None, None]
    return np.round((1 - a) * images.astype(np.float32) + a * colour).astype(np.uint8)


@pytest.fixture(scope="module")
def bg():
    """A model that rests on a background tint (95% of training images), its discovery, test groups and labels, and
    its training inputs and labels."""
    yield from colour_cue_toy(_bg_blended, 2, CONFIG, with_train=True)


def test_cast_maps_weigh_classes_equally_per_cell():
    cells = np.zeros((8, 3, 4, 4))
    cells[:6, 0, 0, 0] = 1.0  # 6 images of class 0, red in the top-left cell; 2 of class 1, none
    maps = class_cast_maps(cells, np.array([0] * 6 + [1] * 2), 2)
    assert maps[0, 0, 0, 0] == pytest.approx(0.5) and maps[1, 0, 0, 0] == pytest.approx(-0.5)  # not 0.25 / -0.75
    assert np.abs(maps[:, :, 1:, :]).max() == 0 and np.abs(maps[:, 1:]).max() == 0


def test_the_place_is_where_the_map_is_strong():
    ring = np.zeros((3, 4, 4))
    ring[2][RING] = 1.0
    assert (place_of(ring, (4, 4), (32, 32)) == RING.reshape(-1)).all()
    corner = np.zeros((3, 4, 4))
    corner[0, 0, 0], corner[1, 0, 1] = 1.0, -0.3  # strong top-left cell, a weak neighbour
    got = place_of(corner, (8, 8), (32, 32)).reshape(8, 8)
    # the strong cell's tokens (its corner one interpolated just under 1/2 towards the empty cells), none far away
    assert got[0, 0] and got[0, 1] and got[1, 0] and 3 <= got.sum() <= 6 and not got[3:].any() and not got[:, 3:].any()
    assert not place_of(np.zeros((3, 4, 4)), (4, 4), (32, 32)).any()


def test_map_edits_add_the_map_where_it_sits(bg):
    lm, _, x, _, _, _ = bg
    delta = np.zeros((3, 4, 4))
    delta[0, 0, 0] = 0.5
    p = map_edit_probs(lm, TensorSource(x["absent"][:2]), [(0, delta), (1, np.zeros((3, 4, 4)))])
    with torch.no_grad():
        p0 = lm.forward(x["absent"][:2]).softmax(-1).numpy()
    np.testing.assert_allclose(p[1], p0[1], atol=1e-6)  # a zero map changes nothing
    assert not np.allclose(p[0], p0[0], atol=1e-4)


def _placed_check(bg):
    """The placed cast check of the toy's discovery for every class (the run itself skips the classes whose
    whole-image cast it claims: on this toy all three), as ``spurious --placed-casts`` runs it."""
    lm, _, _, _, train_x, y = bg
    cfg = replace(CONFIG.causal, seed=0)
    sample = sample_images(y, 3, cfg.causal_images, 0)
    with torch.no_grad():
        probs = lm.forward(train_x).softmax(-1).numpy().astype(np.float64)
    maps = class_cast_maps(image_cells(TensorSource(train_x), len(y), 64), y, 3)
    return placed_cast_check(lm, TensorSource(train_x), maps, sample, y[sample], probs, cfg, (4, 4))


def test_a_background_tint_is_claimed_at_its_ring(bg):
    assert "place_claimed" in bg[1].casts  # the run tested placed casts
    placed = _placed_check(bg)
    assert placed["place_claimed"].all(), placed
    assert (placed["place_flip"] > 0.8).all() and (placed["place_sufficiency_lo"] > 0.2).all()
    for r in placed.itertuples():
        tokens = {int(t) for t in r.place_tokens.split()}
        assert tokens <= set(np.flatnonzero(RING)) and len(tokens) >= 8, (r.cls, tokens)  # the ring, not the centre


def _placed_only(placed, shortcuts: ShortcutSet, grid=(4, 4)) -> ShortcutSet:
    """``shortcuts`` with the placed casts of ``placed`` (``_placed_check``) in place of every other unit and cast."""
    units = [placed_cast_unit(r, CLASSES[int(r.cls)], grid) for r in placed.itertuples() if r.place_n > 0]
    return replace(shortcuts, units=units, casts=[])


def test_flag_and_gate_mask_the_place_in_images_predicted_as_its_class(bg):
    lm, res, x, yt, _, _ = bg
    shortcuts = _placed_only(_placed_check(bg), res.shortcuts)
    assert shortcuts.units and all(u["family"] == FAMILY for u in shortcuts.units)
    with torch.no_grad():
        before = {g: lm.forward(v).argmax(1).numpy() for g, v in x.items()}
    assert (before["conflict"] == yt).mean() < 0.2  # the model follows the background
    present = shortcuts.present_units(lm, x["conflict"], "always", pred=before["conflict"])
    for b, found in enumerate(present):  # only the predicted class's placed cast is tested
        assert [shortcuts.units[j]["cls"] for j, _ in found] == [before["conflict"][b]]
    assert all(not f for f in shortcuts.present_units(lm, x["conflict"], "always"))  # no prediction: none
    flags = {g: flag_images(lm, shortcuts, TensorSource(v), occlusion="off")[0] for g, v in x.items()}
    s = np.r_[flags["conflict"]["flag_score"], flags["absent"]["flag_score"]]
    assert auroc(s, np.r_[np.ones(len(yt)), np.zeros(len(yt))]) > 0.7
    gate = shortcuts.masker(lm, "counterfactual")
    from siftlens.prompting import SteeredViT

    after = {}
    for g, v in x.items():
        m = gate(v)
        assert not gate.last_cast
        with torch.no_grad(), SteeredViT(lm, "mask_tokens", layers=shortcuts.layers,
                                         token_mask_fn=lambda _, m=m: m) as st:
            after[g] = st(v).argmax(1).numpy()
        untouched = ~m.any(1).numpy()
        assert (after[g][untouched] == before[g][untouched]).all()
        assert m[~untouched].sum(1).min() >= 8  # a steered image has its ring masked
    assert (after["conflict"] == yt).mean() > (before["conflict"] == yt).mean() + 0.2


def test_shortcuts_json_keeps_a_placed_cast(bg, tmp_path):
    _, res, _, _, _, _ = bg
    shortcuts = _placed_only(_placed_check(bg), res.shortcuts)
    shortcuts.save(tmp_path / "shortcuts.json")
    d = json.loads((tmp_path / "shortcuts.json").read_text())  # standard JSON: no NaN
    assert all(u["causal_p"] is None and u["word"] == -1 for u in d["units"])
    back = ShortcutSet.load(tmp_path)
    assert [u["tokens"] for u in back.units] == [u["tokens"] for u in shortcuts.units]
    assert all(back.colour_only(u) for u in back.units)  # SIFT-free, and the report says so


def test_a_random_weights_model_claims_no_placed_cast(bg):
    lm, _, x, _, _, _ = bg
    rand = random_cue_model(lm.preprocess)
    images = torch.cat([x["aligned"], x["conflict"]])
    labels = np.r_[np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 30)]
    out = discover_shortcuts(rand, images, labels, CLASSES, CONFIG)
    assert not out.casts["place_claimed"].any(), out.casts
    assert not any(u.get("family") == FAMILY for u in out.shortcuts.units)
