"""The kornia SIFT detector (--keypoint-detector kornia): sane output, agreement with OpenCV, analyze end to end."""

import importlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("kornia")

from scipy.stats import pearsonr  # noqa: E402

from siftlens.analyze import analyze, default_images  # noqa: E402
from siftlens.cli import main  # noqa: E402
from siftlens.image_source import find_images  # noqa: E402
from siftlens.keypoints_kornia import (  # noqa: E402
    detect_sift_kornia,
    gray_from_model_input,
    repeatability,
)
from siftlens.models import load_model  # noqa: E402
from siftlens.preprocess import load_rgb  # noqa: E402
from siftlens.semantic_maps import SiftParams, concentration, detect_sift, keypoint_mass  # noqa: E402

analyze_mod = importlib.import_module("siftlens.analyze")
TIMM = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--input-size", "96", "96", "--batch-size", "3",
        "--null-permutations", "20", "--quiet", "--no-report", "--workers", "0"]


@pytest.fixture(scope="module")
def bundled_inputs():
    """The 8 bundled images as the bundled model sees them (128 px), and their 8-bit grey versions."""
    pre = load_model("vit_tiny_imagenette").preprocess
    x = torch.stack([pre(load_rgb(p)) for p in find_images(default_images())])
    grays = [pre.to_uint8_gray(xi) for xi in x]
    return pre, x, grays


@pytest.fixture(scope="module")
def both(bundled_inputs):
    _, _, grays = bundled_inputs
    batch = torch.from_numpy(np.stack(grays)).float().div(255.0).unsqueeze(1)
    return [detect_sift(g) for g in grays], detect_sift_kornia(batch)


def test_grey_input_is_the_one_opencv_gets(bundled_inputs):
    pre, x, grays = bundled_inputs
    g = gray_from_model_input(x, pre.mean, pre.std)
    assert g.shape == (len(grays), 1, 128, 128)
    np.testing.assert_array_equal((g[:, 0] * 255).round().to(torch.uint8).numpy(), np.stack(grays))


def test_keypoints_are_sane(both):
    _, ko = both
    assert len(ko) == 8
    for kp in ko:
        assert len(kp) > 5
        assert kp.xy.shape == (len(kp), 2) and np.isfinite(kp.xy).all()
        assert (kp.xy >= 0).all() and (kp.xy <= 128).all()
        assert (kp.size > 1).all() and (kp.size < 128).all()
        # OpenCV's contrast test on the refined response: |D| * nOctaveLayers >= contrastThreshold
        assert (kp.response * 3 >= 0.04 - 1e-9).all()
        assert kp.octave.dtype == np.int64


def test_agreement_with_opencv(both):
    """Measured on these 8 images (kornia 0.9.0): repeatability 0.93 / 0.96 (mean over images), map Pearson
    0.96 (min 0.91), 1018 keypoints vs OpenCV's 1021, size ratio 1.000; thresholds leave a margin."""
    cv, ko = both
    rep_cv = np.mean([repeatability(a, b).mean() for a, b in zip(cv, ko)])
    rep_ko = np.mean([repeatability(b, a).mean() for a, b in zip(cv, ko)])
    assert rep_cv > 0.88 and rep_ko > 0.90, (rep_cv, rep_ko)
    r = [pearsonr(concentration(keypoint_mass(a, (8, 8), 16)), concentration(keypoint_mass(b, (8, 8), 16)))[0]
         for a, b in zip(cv, ko)]
    assert np.mean(r) > 0.92 and min(r) > 0.85, r
    n_cv, n_ko = sum(len(k) for k in cv), sum(len(k) for k in ko)
    assert abs(n_ko / n_cv - 1) < 0.1, (n_cv, n_ko)
    # matched keypoints: same diameter (SIZE_FACTOR), kornia 0.25 px left/up of OpenCV (OpenCV's doubling bias)
    from scipy.spatial import cKDTree

    ratio, off = [], []
    for a, b in zip(cv, ko):
        d, j = cKDTree(b.xy).query(a.xy)
        m = d < 1
        ratio.append(np.log(a.size[m] / b.size[j[m]]))
        off.append(b.xy[j[m]] - a.xy[m])
    assert abs(np.exp(np.concatenate(ratio).mean()) - 1) < 0.02
    np.testing.assert_allclose(np.concatenate(off).mean(0), [-0.25, -0.25], atol=0.05)


def test_batch_does_not_change_an_image_s_keypoints(both, bundled_inputs):
    _, ko = both
    _, _, grays = bundled_inputs
    for i in (0, 5):
        alone = detect_sift_kornia(torch.from_numpy(grays[i]).float().div(255.0)[None, None])[0]
        # positions in pixels: a batched convolution rounds differently from a single image's on some CPU kernels
        # (2.6e-4 px measured on an AVX-512 machine); a thousandth of a pixel is still the same keypoint
        np.testing.assert_allclose(alone.xy, ko[i].xy, atol=1e-3)
        np.testing.assert_allclose(alone.size, ko[i].size, rtol=1e-4)


def test_params_flat_image_and_bad_input():
    torch.manual_seed(0)
    noise = torch.rand(2, 1, 64, 96)
    flat = torch.full((1, 1, 64, 96), 0.5)
    full = detect_sift_kornia(torch.cat([noise, flat]))
    assert len(full[0]) > 10 and len(full[1]) > 10 and len(full[2]) == 0
    top = detect_sift_kornia(torch.cat([noise, flat]), SiftParams(nfeatures=10))
    assert [len(k) for k in top] == [10, 10, 0]
    assert top[0].response.min() >= np.sort(full[0].response)[-10] - 1e-12  # the strongest, as OpenCV keeps
    strict = detect_sift_kornia(noise, SiftParams(contrast_threshold=0.1))
    assert len(strict[0]) < len(full[0])
    assert detect_sift_kornia(torch.rand(0, 1, 32, 32)) == []
    with pytest.raises(ValueError, match="grey images"):
        detect_sift_kornia(torch.rand(2, 3, 32, 32))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kornia_runs")
    assert main(["analyze", *TIMM, "--out", str(root / "opencv")]) == 0
    assert main(["analyze", *TIMM, "--out", str(root / "kornia"), "--keypoint-detector", "kornia",
                 "--keypoint-cache", str(root / "cache")]) == 0
    return root


def test_analyze_with_kornia_end_to_end(runs):
    k = runs / "kornia"
    manifest = json.loads((k / "manifest.json").read_text())
    assert manifest["keypoint_detector"]["name"] == "kornia" and manifest["options"]["keypoint_detector"] == "kornia"
    assert json.loads((runs / "opencv" / "manifest.json").read_text())["keypoint_detector"]["name"] == "opencv"
    per_image = pd.read_parquet(k / "per_image.parquet")
    images = pd.read_parquet(k / "images.parquet")
    assert manifest["counts"]["analysed"] == len(images) == len(find_images(default_images()))
    assert np.isfinite(per_image["s_cls__sift"]).all() and np.isfinite(per_image["s_pp__sift"]).all()
    assert np.isfinite(per_image["s_cls__random_kp"]).all() and np.isfinite(per_image["s_cls__edges_sparse"]).all()
    # keypoint counts are kornia's on the same 8-bit grey image
    lm = load_model("timm:vit_tiny_patch16_224", random_init=True, input_size=(96, 96))
    grays = [lm.preprocess.to_uint8_gray(lm.preprocess(load_rgb(p))) for p in images["path"]]
    expected = detect_sift_kornia(torch.from_numpy(np.stack(grays)).float().div(255.0).unsqueeze(1))
    assert images["n_keypoints"].tolist() == [len(kp) for kp in expected]
    # maps that do not use SIFT keypoints are the OpenCV run's, exactly; the SIFT ones agree closely
    ref = pd.read_parquet(runs / "opencv" / "per_image.parquet")
    for col in ("s_cls__edges", "s_cls__orb", "s_cls__center", "s_cls__uniform", "s_pp__edges"):
        np.testing.assert_array_equal(per_image[col].to_numpy(), ref[col].to_numpy())
    assert np.corrcoef(per_image["s_cls__sift"], ref["s_cls__sift"])[0, 1] > 0.9
    assert list(runs.joinpath("cache").rglob("*.npz"))


def test_kornia_run_is_reproducible_with_cache(runs, tmp_path):
    assert main(["analyze", *TIMM, "--out", str(tmp_path / "again"), "--keypoint-detector", "kornia",
                 "--keypoint-cache", str(runs / "cache"), "--batch-size", "5"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(runs / "kornia" / "per_image.parquet"),
                                  pd.read_parquet(tmp_path / "again" / "per_image.parquet"), rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_detector(tmp_path, monkeypatch):
    out = tmp_path / "out"
    kw = dict(random_init=True, input_size=(96, 96), workers=0, progress=False, report=False, limit=2,
              null_permutations=10)
    monkeypatch.setattr(analyze_mod, "_merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        analyze("timm:vit_tiny_patch16_224", out=out, keypoint_detector="kornia", **kw)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="different options"):
        analyze("timm:vit_tiny_patch16_224", out=out, keypoint_detector="opencv", **kw)
    analyze("timm:vit_tiny_patch16_224", out=out, keypoint_detector="kornia", **kw)  # same detector: resumes
    assert (out / "manifest.json").is_file()


def test_unknown_detector_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["analyze", "--keypoint-detector", "sift-gpu", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="keypoint-detector"):
        analyze("timm:vit_tiny_patch16_224", out=tmp_path / "y", random_init=True, keypoint_detector="sift-gpu")


def test_missing_kornia_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import siftlens

    monkeypatch.setitem(sys.modules, "kornia", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "siftlens.keypoints_kornia")
    monkeypatch.delattr(siftlens, "keypoints_kornia", raising=False)
    assert main(["analyze", "--keypoint-detector", "kornia", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert 'pip install "siftlens[gpu]"' in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
