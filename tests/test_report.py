"""report.py: the report of an `analyze` run is one self-contained page whose tables carry the run's own
numbers (and only the baselines it computed)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch
from PIL import Image

import siftlens
from siftlens.preprocess import Preprocess
from siftlens.report import overview_layers, verdict_table
from siftlens.verdict import layer_verdicts
from tests.bad_files import blocks, save, write
from tests.test_verdict import _table


def test_overview_layers():
    assert overview_layers(1) == [0]
    assert overview_layers(2) == [0, 1]
    assert overview_layers(12) == [0, 6, 11]


def test_verdict_table_shows_only_the_baselines_of_the_run():
    model, twin = _table([0.5, 0.0], seed=1), _table([0.0, 0.0], twin=True, seed=2)
    every, _ = verdict_table(model, ["sift", "random_kp", "edges", "edges_sparse", "orb", "center", "uniform"],
                             "s_cls", twin)
    assert {"SIFT − random keypoints", "SIFT − ORB", "SIFT − centre prior"} <= set(every.columns)
    two, words = verdict_table(model, ["sift", "edges", "uniform"], "s_cls", twin)
    assert "SIFT − edges" in two.columns
    assert not any(c.startswith("SIFT − ") and ("ORB" in c or "centre" in c) for c in two.columns)
    assert not any("ORB" in w for w in words)
    rows = layer_verdicts(model, "s_cls", ["sift", "edges", "uniform"], twin)
    lo, hi = rows.loc[0, "effect_lo"], rows.loc[0, "effect_hi"]
    assert two.loc[0, "S − null"] == f"{rows.loc[0, 'effect']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert two["follows SIFT"].tolist() == ["yes" if f else "no" for f in rows["follows"]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    lm = siftlens.models.from_module(VisionTransformer(img_size=32, patch_size=8, depth=3, embed_dim=32,
                                                       num_heads=2, num_classes=3))
    lm.preprocess = Preprocess((32, 32), crop_pct=None)
    d = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        save(Image.fromarray(blocks(48, 48, seed=20 + i)), d / f"{i}.png")
    write(d / "broken.png", b"not a png")
    out = d.parent / "out"
    res = siftlens.analyze(lm, images=d, out=out, workers=0, progress=False, batch_size=3, null_permutations=5,
                           twin="none", examples=2)
    return res, out


def test_report_is_one_self_contained_page_with_the_runs_numbers(tiny_run):
    res, out = tiny_run
    page = (out / "report.html").read_text()
    assert page.count("<!doctype html>") == 1 and "<title>siftlens report</title>" in page
    assert "http://" not in page and "https://" not in page and "src='data:image/png;base64," in page
    imgs = re.findall(r"<img src='data:image/png;base64,([^']+)'>", page)
    assert len(imgs) >= 4 and all(base64.b64decode(b)[:4] == b"\x89PNG" for b in imgs)
    assert "No random-weights twin in this run" in page  # --twin none is said, not hidden
    assert "Skipped inputs (1)" in page and "broken.png" in page
    c = res.manifest["counts"]
    assert f"{c['analysed']} images analysed, {c['skipped']} skipped" in page and c["analysed"] == 6
    # the table's S (SIFT) column is the run's own per-layer mean over heads and images, with its CI
    s = res.per_image.groupby(["image_id", "layer"])["s_cls__sift"].mean().groupby("layer").mean()
    for layer, mean in s.items():
        assert f"{mean:.3f} [" in page, (layer, mean)
    assert np.isfinite(s.to_numpy()).all()
