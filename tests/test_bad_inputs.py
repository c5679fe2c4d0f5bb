"""Bad input in an `analyze` run, from the product spec: a dataset mixing good, odd and unreadable files,
images smaller than one patch, images with no keypoints, a model without attention layers. The other images
are still analysed and the skipped ones are listed in the manifest with a one-line reason naming the file.
(load_rgb's cases are in test_preprocess.py, output directories in test_io.py, the command line's one-line
errors in test_cli.py.)

Every file is generated in tmp_path, and nothing is downloaded (models use random init).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import siftlens
from siftlens.capture import NoAttentionLayersError
from siftlens.preprocess import Preprocess
from tests.bad_files import assert_names, blocks, make_bad, make_odd, save, write

# --- a dataset run mixing good, odd and bad files ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    module = VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    lm = siftlens.models.from_module(module)
    lm.preprocess = Preprocess((32, 32), crop_pct=None)
    return lm


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("mixed")
    (d / "nested" / "class_a").mkdir(parents=True)  # ImageFolder-style tree
    good = {
        "good_png": save(Image.fromarray(blocks(seed=10)), d / "good.png"),
        "good_jpg": save(Image.fromarray(blocks(64, 48, seed=11)), d / "nested" / "class_a" / "good.jpg"),
        "flat": save(Image.new("RGB", (48, 48), (120, 60, 30)), d / "flat.png"),
        **make_odd(d),
    }
    bad = {**make_bad(d / "nested"),
           "too_small": save(Image.fromarray(blocks(40, 4)), d / "sliver.png"),  # 4 px < 8 px patch
           "dangling_link": d / "moved_away.jpg"}
    bad["dangling_link"].symlink_to(d / "does_not_exist.jpg")
    write(d / "README.txt", b"not an image suffix: not an input")
    out = d / "out"
    res = siftlens.analyze(tiny_model, images=d, out=out, workers=0, report=False, progress=False,
                           batch_size=2)
    return res, good, bad, out


def test_mixed_run_counts_and_skipped(mixed_run):
    res, good, bad, out = mixed_run
    m = res.manifest
    c = m["counts"]
    assert c["inputs"] == len(good) + len(bad)
    assert c["analysed"] == len(good) and c["skipped"] == len(bad)
    assert c["inputs"] == c["analysed"] + c["skipped"]
    assert {s["path"] for s in m["skipped"]} == {str(p) for p in bad.values()}
    for s in m["skipped"]:
        assert_names(s["reason"], s["path"])
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert "empty file" in reasons["empty.png"]
    assert "not found" in reasons["moved_away.jpg"]
    assert "smaller than one patch" in reasons["sliver.png"] and "4x40" in reasons["sliver.png"]
    assert set(res.images["path"]) == {str(p) for p in good.values()}
    assert json.loads((out / "manifest.json").read_text())["skipped"] == m["skipped"]


def test_mixed_run_tables(mixed_run, tiny_model):
    res, good, _, _ = mixed_run
    n_layers, n_heads = 2, 2
    assert len(res.per_image) == len(good) * n_layers * n_heads == res.manifest["counts"]["rows"]
    assert set(res.per_image["image_id"]) == set(res.images["image_id"])


def test_flat_image_has_no_keypoints_but_is_analysed(mixed_run):
    res, good, _, _ = mixed_run
    m = res.manifest
    flat = str(good["flat"])
    assert flat in m["no_keypoints"]
    assert m["counts"]["no_keypoints"] == len(m["no_keypoints"])
    assert str(good["good_png"]) not in m["no_keypoints"]  # textured images do have keypoints
    row = res.images.set_index("path").loc[flat]
    assert row["n_keypoints"] == 0 and not row["has_sift_map"]

    ids = res.images.set_index("path")["image_id"]
    rows = res.per_image[res.per_image["image_id"] == ids[flat]]
    for col in ("s_cls__sift", "s_pp__sift", "spearman__sift", "partial_spearman_sift",
                "s_cls__random_kp", "s_cls__edges"):  # undefined: no keypoints, no edges
        assert rows[col].isna().all(), col
    for col in ("s_cls__center", "s_cls__uniform", "s_pp__center", "prefix_mass", "entropy_pp"):
        assert np.isfinite(rows[col]).all(), col

    with_kp = res.per_image[res.per_image["image_id"] == ids[str(good["good_png"])]]
    assert np.isfinite(with_kp["s_cls__sift"]).all()


def test_outputs_are_atomic(mixed_run):
    _, _, _, out = mixed_run
    names = sorted(p.name for p in out.iterdir())
    assert {"per_image.parquet", "images.parquet", "lift.npz", "manifest.json"} <= set(names)
    leftovers = [n for n in names if n.startswith(".") or n.endswith((".partial", ".tmp"))]
    assert not leftovers, leftovers


def test_all_bad_images_raise_a_clear_error(tmp_path, tiny_model):
    d = tmp_path / "imgs"
    d.mkdir()
    bad = make_bad(d)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as ei:
        siftlens.analyze(tiny_model, images=d, out=out, workers=0, report=False, progress=False)
    msg = assert_names(ei.value, "no image could be analysed", f"out of {len(bad)}")
    assert any(str(p) in msg for p in bad.values())
    assert not (out / "per_image.parquet").exists() and not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_failed_run_leaves_no_partial_outputs(tmp_path, tiny_model):
    """A run that dies mid-way writes no final output and no half-written file (resume state aside)."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        save(Image.fromarray(blocks(seed=i)), d / f"{i}.png")
    lm = dataclasses.replace(tiny_model)
    calls = []

    def forward(x):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated failure in the second batch")
        return tiny_model.forward(x)

    lm.forward = forward
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        siftlens.analyze(lm, images=d, out=out, workers=0, report=False, progress=False, batch_size=1)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".partial", ".tmp"))]
    assert not leftovers, leftovers
    assert not (out / "per_image.parquet").exists() and not (out / "manifest.json").exists()


def test_module_without_attention_layers(tmp_path, one_image):
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(NoAttentionLayersError) as ei:
        siftlens.analyze(conv, images=one_image, out=tmp_path / "out", workers=0, report=False,
                         progress=False)
    assert_names(ei.value, "Sequential", "attention")


@pytest.fixture
def one_image(tmp_path):
    return save(Image.fromarray(blocks()), tmp_path / "one.png")
