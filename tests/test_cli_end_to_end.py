"""`siftlens analyze` with no model/images arguments: bundled model on bundled images, end to end."""

import json

import numpy as np
import pandas as pd
import pytest

from siftlens.analyze import default_images
from siftlens.cli import main
from siftlens.image_source import find_images


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["analyze", "--out", str(out), "--workers", "0", "--quiet"]) == 0
    return out


def test_outputs_exist_and_agree(default_run):
    out = default_run
    for name in ("per_image.parquet", "images.parquet", "lift.npz", "examples.npz", "manifest.json", "report.html"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*partial*")) and not list(out.glob(".*tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    per_image = pd.read_parquet(out / "per_image.parquet")
    images = pd.read_parquet(out / "images.parquet")
    n_inputs = len(find_images(default_images()))
    c = manifest["counts"]
    assert c["inputs"] == n_inputs == c["analysed"] + c["skipped"]
    L, H = manifest["model"]["num_layers"], manifest["model"]["num_heads"]
    assert len(per_image) == c["rows"] == c["analysed"] * L * H
    assert len(images) == c["analysed"] and per_image["image_id"].nunique() == c["analysed"]
    assert manifest["model"]["name"] == "vit_tiny_imagenette" and manifest["model"].get("bundled")
    assert manifest["preprocess"]["input_size"] == [128, 128]
    assert manifest["layout"]["grid"] == [8, 8] and manifest["layout"]["prefix_tokens"] == ["cls"]
    # uniform map: S = 1 exactly, whatever the attention
    np.testing.assert_allclose(per_image["s_cls__uniform"], 1.0, rtol=1e-5)
    assert per_image["s_cls__sift"].notna().all()
    lift = np.load(out / "lift.npz")
    assert lift["obs"].shape == (L, H, 4, 4)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert f"{c['analysed']} images analysed" in html
    assert "95%" in html and "random keypoints" in html


def test_deterministic(default_run, tmp_path):
    assert main(["analyze", "--out", str(tmp_path / "again"), "--workers", "2", "--quiet", "--no-report",
                 "--batch-size", "3"]) == 0
    a = pd.read_parquet(default_run / "per_image.parquet")
    b = pd.read_parquet(tmp_path / "again" / "per_image.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
