"""The shortcut suite's generator (benchmarks/shortcut_suite) on a tiny synthetic ImageFolder: no data needed."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from shortcut_suite import generate  # noqa: E402
from shortcut_suite.cues import (  # noqa: E402
    DEV,
    DEV_BORDER_CELLS,
    DEV_FRAMES,
    DEV_MID_FRAMES,
    DEV_THIN_FRAMES,
    FAMILIES,
    HELDOUT,
    HELDOUT_BORDER_CELLS,
    HELDOUT_MORE,
    HELDOUT_THIN_FRAMES,
    POOLS,
    VARIANTS,
    Variant,
    colour_pair,
    draw_class_params,
    render_cue,
)

CLASSES = ("ca", "cb", "cc")
N_TRAIN, N_DISC, N_TEST = 6, 3, 6


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """train: 9 images per class; val: 6 slots x 6 images per class. Smooth random images (mid-grey
    plus low-amplitude noise) so a cue's pixels are distinguishable from the background."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN + N_DISC), ("val", 6 * N_TEST)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.clip(110 + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{c}_{i:03d}.png")
    return root


def _gen(source: Path, out: Path, variant: Variant, seed: int) -> Path:
    return generate.generate_one(variant, "scratch", seed, source, out, len(CLASSES), N_TRAIN, N_DISC, N_TEST)


def _load(run: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(run / rel).convert("RGB")).astype(np.int64)


def _region_mask(row: pd.Series, size: int = 64) -> np.ndarray:
    """Where the metadata says the cue may be: its box, or for a frame the border band."""
    m = np.zeros((size, size), bool)
    if row["region"] == "frame":
        w = int(round(row["frame_width"] * size))
        m[:w], m[-w:], m[:, :w], m[:, -w:] = True, True, True, True
        return m
    x0, y0, x1, y1 = (int(round(row[f"box_{k}"] * size)) for k in ("x0", "y0", "x1", "y1"))
    m[y0:y1, x0:x1] = True
    return m


def _dev_variant(family: str) -> Variant:
    return next(v for v in VARIANTS if v.split == "dev" and v.family == family)


@pytest.fixture(scope="module")
def runs(source, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("suite")
    return {f: _gen(source, out, _dev_variant(f), 0) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cue_inside_box_and_twin_differs_only_there(runs, family):
    run = runs[family]
    df = pd.read_csv(run / "test.csv", keep_default_na=False)
    aligned = df[df.group == "aligned"]
    assert len(aligned) == len(CLASSES) * N_TEST // 3
    with_cue = df[df.group != "none"]
    assert (with_cue.twin_path != "").all()
    for _, row in with_cue.iterrows():
        diff = np.abs(_load(run, row.path) - _load(run, row.twin_path)).sum(-1)
        inside = _region_mask(row)
        assert not diff[~inside].any(), f"{family}: the twin differs outside the cue region"
        changed = (diff[inside] > 0).mean()
        # a patch/text/frame replaces most of its box; the tint shifts every pixel, the background tint those
        # outside a circle of radius <= 0.38 (>= 55% of the image)
        floor = {"text": 0.3, "bg_tint": 0.5}.get(family, 0.6)
        assert changed > floor, f"{family}: cue box mostly unchanged ({changed:.2f})"
        if family == "bg_tint":  # the object's place, the centre, keeps its colours
            assert not diff[24:40, 24:40].any(), "bg_tint: the tint reached the centre"
        if row.region == "box":  # the box is tight: every border row/column of it holds a changed pixel
            ys, xs = np.nonzero(diff)
            box = (xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64)
            assert np.allclose(box, (row.box_x0, row.box_y0, row.box_x1, row.box_y1))
    none = df[df.group == "none"]
    assert (none.cue_class == -1).all() and (none.box_x0 == -1).all() and (none.twin_path == "").all()


@pytest.mark.parametrize("family", FAMILIES)
def test_conflicting_images_carry_another_class_cue(runs, source, family):
    run = runs[family]
    import json

    params = json.loads((run / "variant.json").read_text())["class_params"]
    df = pd.read_csv(run / "test.csv", keep_default_na=False)
    conflict = df[df.group == "conflict"]
    assert len(conflict) == len(CLASSES) * N_TEST // 3
    assert (conflict.cue_class != conflict.label).all() and (conflict.cue_class >= 0).all()
    for _, row in conflict.iterrows():
        img = _load(run, row.path)
        assert Path(row.source).is_file()  # the metadata names the source image (here: a 64 px file)
        src = np.asarray(Image.open(row.source).convert("RGB")).astype(np.int64)
        own, other = (colour_pair(params[k]["hue"])[0].astype(np.int64) for k in (row.label, row.cue_class))
        inside = _region_mask(row)
        if family in ("tint", "bg_tint"):  # img = (1 - a) src + a colour: recover the colour
            a = params[row.cue_class]["alpha"]
            if family == "bg_tint":  # the full tint only far from the centre: the corners
                inside = np.zeros_like(inside)
                inside[:6, :6] = inside[:6, -6:] = inside[-6:, :6] = inside[-6:, -6:] = True
            est = ((img - (1 - a) * src)[inside] / a).mean(0)
            assert np.abs(est - other).max() < 6 and np.abs(est - own).max() > 20
        else:  # the bright colour of the cue's class is drawn, the image's own class's is not
            px = img[inside]
            assert (np.abs(px - other).sum(-1) == 0).any()
            assert not (np.abs(px - own).sum(-1) == 0).any()


def test_fixed_patch_positions_are_class_tied(runs):
    df = pd.read_csv(runs["fixed_patch"] / "test.csv", keep_default_na=False)
    boxes = df[df.cue_class >= 0].groupby("cue_class")[["box_x0", "box_y0"]].nunique()
    assert (boxes == 1).all().all()  # one position per cue class, whatever the image's label
    assert df[df.cue_class >= 0].groupby("cue_class")["box_x0"].first().nunique() == len(CLASSES)


def test_dev_and_heldout_pools_are_disjoint():
    for dev in (DEV, DEV_FRAMES, DEV_THIN_FRAMES, DEV_BORDER_CELLS, DEV_MID_FRAMES):
        for held in (HELDOUT, HELDOUT_THIN_FRAMES, HELDOUT_MORE, HELDOUT_BORDER_CELLS):
            for f in dataclasses.fields(dev):
                if f.name == "name":
                    continue
                a, b = getattr(dev, f.name), getattr(held, f.name)
                shared = set(a) & set(b)
                assert not shared, f"pool field {f.name} shared by {dev.name} and {held.name}: {shared}"
    for f in ("periods", "frame_widths", "gen_seeds"):  # the second dev pool's frames are new designs
        assert not set(getattr(DEV, f)) & set(getattr(DEV_FRAMES, f))
    for f in ("frame_widths", "gen_seeds"):  # the thin held-out frames are new to the held-out half too
        assert not set(getattr(HELDOUT, f)) & set(getattr(HELDOUT_THIN_FRAMES, f))
    for a, b in ((HELDOUT, HELDOUT_MORE), (HELDOUT_THIN_FRAMES, HELDOUT_MORE)):  # new seeds, never drawn before
        assert not set(a.gen_seeds) & set(b.gen_seeds)
    for f in ("frame_widths", "gen_seeds"):  # the mid dev frames are new to the dev half
        for other in (DEV, DEV_FRAMES, DEV_THIN_FRAMES):
            assert not set(getattr(other, f)) & set(getattr(DEV_MID_FRAMES, f))
    for other in (DEV, DEV_FRAMES):  # and the thin dev frames to the dev half
        for f in ("frame_widths", "gen_seeds"):
            assert not set(getattr(other, f)) & set(getattr(DEV_THIN_FRAMES, f))
    for a, b in ((DEV, HELDOUT), (HELDOUT, DEV)):  # a ten-class tint's hues are new to the other half's too
        assert not set(a.tint_hues) & (set(b.hues) | set(b.tint_hues))
    for v in VARIANTS:  # every drawn value comes from the variant's own pool
        pool = POOLS[v.pool or v.split]
        for p in draw_class_params(v, 5):
            assert p["hue"] in pool.hues
        if v.family in ("tint", "bg_tint"):  # ten classes: a hue each, from the pool's ten tint hues
            hues = [p["hue"] for p in draw_class_params(v, 10)]
            assert len(set(hues)) == 10 and set(hues) <= set(pool.tint_hues)
            for key, allowed in (("shape", pool.shapes), ("band", pool.bands), ("angle", pool.angles),
                                 ("period", pool.periods), ("width", pool.frame_widths),
                                 ("alpha", pool.tint_alphas), ("font", pool.fonts), ("radius", pool.bg_radii)):
                if key in p:
                    assert p[key] in allowed
            if "cell" in p:
                assert tuple(p["cell"]) in pool.cells
            if "text" in p:
                assert set(p["text"]) <= set(pool.chars)
    assert {v.split for v in VARIANTS} == {"dev", "heldout"}
    assert {v.family for v in VARIANTS if v.split == "heldout"} == set(FAMILIES)


@pytest.mark.parametrize("cell", [(7, 7), (0, 7), (7, 0), (0, 0), (3, 6)])
def test_a_fixed_patch_stays_whole_and_inside_the_image_on_every_cell(cell):
    """A border-ring cell's sub-token shift would push the patch off the image: it is clamped inside, one token's
    area, with its corner on the cell's token or the shift's; a ring-1 cell keeps its shift."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    params = {"hue": 20.0, "shape": "square", "cell": list(cell), "offset": [0.75, 0.5]}
    _, mask = render_cue(image, "fixed_patch", params, np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    assert mask.sum() == 8 * 8
    expect_y0 = min(cell[0] * 8 + 6, 56)
    expect_x0 = min(cell[1] * 8 + 4, 56)
    assert (ys.min(), xs.min()) == (expect_y0, expect_x0)


def test_test_images_disjoint_across_seeds(source, tmp_path):
    v = _dev_variant("tint")
    seeds = list(DEV.model_seeds) + list(HELDOUT.model_seeds)
    slots = {generate.test_slot(s) for s in seeds}
    assert len(slots) == len(seeds)
    used: set[str] = set()
    for s in DEV.model_seeds:
        df = pd.read_csv(_gen(source, tmp_path, v, s) / "test.csv", keep_default_na=False)
        names = set(df.source)
        assert len(names) == len(df) and not names & used
        used |= names
    with pytest.raises(ValueError, match="seed"):
        generate.test_slot(7)


def test_same_seed_identical_files(source, tmp_path):
    v = _dev_variant("text")
    a, b = _gen(source, tmp_path / "a", v, 1), _gen(source, tmp_path / "b", v, 1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) > 3 * len(CLASSES)
    for f in files_a:
        if f.name != "variant.json":  # holds the output-independent recipe, compared below
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "variant.json").read_text() == (b / "variant.json").read_text()
    c = _gen(source, tmp_path / "c", v, 2)  # another seed: other images
    assert (a / "test.csv").read_bytes() != (c / "test.csv").read_bytes()


def test_training_mix_and_heldout_refused(runs, source, tmp_path):
    df = pd.read_csv(runs["fixed_patch"] / "train.csv", keep_default_na=False)
    assert set(df.group) <= {"aligned", "none"}
    assert ((df.group == "aligned") == (df.cue_class == df.label)).all()
    with pytest.raises(SystemExit, match="frozen-commit"):
        generate.main(["--data", str(source), "--out", str(tmp_path), "--split", "heldout"])
    with pytest.raises(ValueError, match="dev half"):
        _gen(source, tmp_path, _dev_variant("tint"), 100)


# ---- evaluation helpers (benchmarks/shortcut_suite/evaluate.py)


def test_accuracy_metrics_groups_and_mixes():
    from shortcut_suite.evaluate import accuracy_metrics

    groups = np.array(["aligned"] * 4 + ["conflict"] * 2 + ["none"] * 2)
    correct = np.array([1, 1, 1, 0, 0, 1, 1, 1], float)  # aligned 0.75, conflict 0.5, none 1.0
    m = accuracy_metrics(correct, groups)
    assert (m["aligned"], m["conflict"], m["none"]) == (0.75, 0.5, 1.0)
    assert m["worst_group"] == 0.5
    assert np.isclose(m["average_balanced"], 0.75)  # not the pooled 6/8 by accident: groups weigh 1/3 each
    assert np.isclose(m["average_train_mix"], 0.95 * 0.75 + 0.025 * 0.5 + 0.025 * 1.0)
    correct2 = np.array([1, 1, 1, 1, 0, 0, 1, 0], float)  # pooled 5/8, balanced (1 + 0 + 0.5) / 3
    assert np.isclose(accuracy_metrics(correct2, groups)["average_balanced"], 0.5)


def test_cue_tokens_and_located():
    import torch
    from shortcut_suite.evaluate import cue_tokens, located

    img = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    twin = img.clone()
    img[0, :, 9:12, 1:3] = 255  # image 0: a cue inside token (row 1, col 0) of a 2 x 2 grid of 8 px tokens
    img[1, :, 0:2, 0:2] = 255  # image 1: differs, but has no twin on file -> no cue tokens
    t = cue_tokens(img, twin, np.array([True, False]), 8)
    assert t.tolist() == [[False, False, True, False], [False, False, False, False]]
    disc = pd.DataFrame({"cue_class": [0, 1], "group": ["aligned", "aligned"], "region": ["box", "box"],
                         "frame_width": [-1.0, -1.0], "box_x0": [0.0, 0.75], "box_y0": [0.0, 0.75],
                         "box_x1": [0.125, 1.0], "box_y1": [0.125, 1.0]})
    # 32 px image, patch 4: class 0's cue at the top-left, class 1's at the bottom-right
    res = located({0: (0.2, 0.2), 1: (0.2, 0.2)}, disc, 2, 32, 4)
    assert res["per_class"] == [True, False] and res["rate"] == 0.5
    # chance: share of the image inside the grown regions, (8x8 + 12x12 px) / 2 / 32^2
    assert np.isclose(res["chance"], (64 + 144) / 2 / 1024)


def test_located_counts_a_whole_frame_unit_whose_box_centre_is_the_image_centre():
    from shortcut_suite.evaluate import located

    # 32 px, patch 4 (8 x 8 tokens), a frame 4 px wide: the band grown by a patch is the two outer token rings
    disc = pd.DataFrame({"cue_class": [0], "group": ["aligned"], "region": ["frame"], "frame_width": [0.125],
                         "box_x0": [0.0], "box_y0": [0.0], "box_x1": [1.0], "box_y1": [1.0]})
    ring = [r * 8 + c for r in range(8) for c in range(8) if r in (0, 7) or c in (0, 7)]
    centre = [r * 8 + c for r in (3, 4) for c in (3, 4)]
    assert located({0: (0.5, 0.5)}, disc, 1, 32, 4)["per_class"] == [False]  # the box centre alone: not in the band
    assert located({0: (0.5, 0.5)}, disc, 1, 32, 4, {0: ring})["per_class"] == [True]  # but every token is
    assert located({0: (0.5, 0.5)}, disc, 1, 32, 4, {0: centre})["per_class"] == [False]
    assert located({0: (0.5, 0.5)}, disc, 1, 32, 4, {0: ring[:6] + centre * 2})["per_class"] == [False]  # < half
    assert located({0: (0.05, 0.5)}, disc, 1, 32, 4, {0: centre})["per_class"] == [True]  # centre rule as before
    # a box cue is judged by the centre only, as in every earlier round
    box = disc.assign(region=["box"], box_x1=[0.125], box_y1=[0.125])
    assert located({0: (0.5, 0.5)}, box, 1, 32, 4, {0: [0, 1, 8, 9]})["per_class"] == [False]


def test_method_tokens_reads_float_ranks(tmp_path):
    """motifs.csv rows without a causal rank leave the column float ("1.0"): the top unit's tokens must still be
    read (they were not, so the frame rule of ``located`` never fired on such runs)."""
    from shortcut_suite.evaluate import method_tokens

    pd.DataFrame({"class": ["a", "a", "b", "b"], "causal_rank": [2.0, 1.0, np.nan, 1.0],
                  "tokens": ["9", "0 1 2", "5", ""]}).to_csv(tmp_path / "motifs.csv", index=False)
    assert "1.0" in (tmp_path / "motifs.csv").read_text()
    assert method_tokens(tmp_path, ["a", "b"]) == {0: [0, 1, 2]}  # b's top unit has no tokens


def test_claims_located_judges_each_claim_at_its_own_class_cue(tmp_path):
    """evaluate.py claims: every unit of shortcuts.json, judged against the cue of the class it was claimed for
    (a claim at another class's cue is off the cue), with its effect."""
    import json

    from shortcut_suite.evaluate import claims_located

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "e" / "spurious").mkdir(parents=True)
    (run / "variant.json").write_text(json.dumps({"class_names": ["a", "b"], "image_size": 32}))
    (run / "model" / "model.json").write_text(json.dumps({"architecture": {"patch_size": 4}}))
    # the judge reads the patch from the weights' patch embedding (evaluate.model_patch)
    import torch
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, str(run / "model" / "model.safetensors"))
    # 32 px, patch 4: class 0's cue top-left, class 1's bottom-right
    pd.DataFrame({"cue_class": [0, 1], "group": ["aligned", "aligned"], "region": ["box", "box"],
                  "frame_width": [-1.0, -1.0], "box_x0": [0.0, 0.75], "box_y0": [0.0, 0.75],
                  "box_x1": [0.125, 1.0], "box_y1": [0.125, 1.0]}).to_csv(run / "discovery.csv", index=False)
    units = [{"cls": 0, "class_name": "a", "unit": "token:0,0", "causal_effect": 0.4, "box": [0, 0, 0.125, 0.125],
              "tokens": [0]},
             {"cls": 1, "class_name": "b", "unit": "token:0,0", "causal_effect": 0.2, "box": [0, 0, 0.125, 0.125],
              "tokens": [0]},
             {"cls": 1, "class_name": "b", "unit": "word:7", "causal_effect": 0.1, "box": [0.75, 0.75, 1, 1],
              "tokens": [63]}]
    (run / "e" / "spurious" / "shortcuts.json").write_text(json.dumps({"units": units}))
    got = claims_located(run, "e")
    assert [(c["class_name"], c["unit"], c["located"]) for c in got] == [
        ("a", "token:0,0", True), ("b", "token:0,0", False), ("b", "word:7", True)]
    assert [c["effect"] for c in got] == [0.4, 0.2, 0.1]


def test_cue_reliance_per_class_on_aligned_images_only():
    from shortcut_suite.evaluate import RELIANT_DROP, cue_reliance, rate_among_reliant

    labels = np.array([0, 0, 1, 1, 0, 1])
    groups = np.array(["aligned", "aligned", "aligned", "aligned", "conflict", "none"])
    p0 = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]])
    p_or = p0.copy()
    p_or[:2, 0] -= [0.2, 0.4]  # class 0 relies on its cue: mean drop 0.3 on its aligned images
    p_or[2:4, 1] -= [0.01, 0.03]  # class 1 barely: mean drop 0.02, below the threshold
    p_or[5, 1] -= 0.9  # a cue-free image's drop must not count toward class 1
    p_or[4, 0] += 0.5  # nor a conflicting image's toward class 0
    r = cue_reliance(p0, p_or, labels, groups, 2)
    assert np.allclose(r["oracle_drop"], [0.3, 0.02]) and r["reliant"] == [True, False]
    assert 0.02 < RELIANT_DROP <= 0.3
    assert rate_among_reliant([False, True], r["reliant"]) == {"rate_reliant": 0.0, "n_reliant": 1}
    assert rate_among_reliant([True, None], [True, True]) == {"rate_reliant": 1.0, "n_reliant": 1}


def test_missing_cli_command_is_recorded_not_fatal(tmp_path):
    from shortcut_suite.evaluate import run_cli

    log: list[dict] = []
    status = run_cli(["no-such-command", "--x", "1"], tmp_path / "never", log)
    assert status.startswith("not available") and log[0]["status"] == status


def test_claimed_classes_counts_distinct_classes_of_the_shortcut_units(tmp_path):
    from shortcut_suite.evaluate import claimed_classes

    assert claimed_classes(tmp_path) is None  # no shortcuts.json: not run, not "zero claimed"
    units = [{"cls": 0, "unit": "token:1,1"}, {"cls": 0, "unit": "word:3"}, {"cls": 3, "unit": "words:70+71"}]
    (tmp_path / "shortcuts.json").write_text(json.dumps({"units": units}))
    assert claimed_classes(tmp_path) == 2
