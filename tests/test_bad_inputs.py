"""Bad input, from the product spec: unreadable, corrupt or empty files, odd image modes, images
smaller than one patch, images with no keypoints, unknown or attention-less models, unsafe
checkpoints and output directories that cannot be written. Each gives a clear one-line error that
names the input. In a dataset run the other images are still analysed and the skipped ones are
listed in the manifest.

Every file is generated in tmp_path, and nothing is downloaded (models use random init).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import siftlens
from siftlens.capture import NoAttentionLayersError
from siftlens.cli import main
from siftlens.io import OutputDirError, atomic_write_bytes, ensure_writable_dir
from siftlens.preprocess import BadImageError, Preprocess, load_rgb

RED, WHITE = (255, 0, 0), (255, 255, 255)


# --- image factories ---------------------------------------------------------------------------

def blocks(h: int = 48, w: int = 48, seed: int = 0, cell: int = 8) -> np.ndarray:
    """8-bit RGB made of random flat cells: many corners and blobs, so SIFT finds keypoints."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (-(-h // cell), -(-w // cell), 3), dtype=np.uint8)
    return a.repeat(cell, 0).repeat(cell, 1)[:h, :w]


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def make_bad(d: Path) -> dict[str, Path]:
    """The unreadable kinds: name -> path."""
    good_jpeg = jpeg_bytes(Image.fromarray(blocks(seed=1)))
    return {
        "empty": write(d / "empty.png", b""),
        "random": write(d / "random.jpg", np.random.default_rng(0).bytes(3000)),
        "truncated": write(d / "truncated.jpg", good_jpeg[: len(good_jpeg) // 2]),
        "text": write(d / "notes.png", b"this is a text file, renamed\n" * 20),
    }


def make_odd(d: Path) -> dict[str, Path]:
    """Readable files in every awkward mode, all textured so that SIFT has something to find."""
    rgb = blocks(seed=2)
    gray = rgb[..., 0]
    alpha = np.where(np.arange(48)[None, :] < 24, 255, 0).astype(np.uint8).repeat(48, 0)  # left opaque
    pal = Image.fromarray(rgb).quantize(16)
    pal_t = Image.fromarray(rgb).quantize(16)
    exif_img = Image.fromarray(blocks(40, 64, seed=3))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        "L": save(Image.fromarray(gray, "L"), d / "gray.png"),
        "LA": save(Image.fromarray(np.dstack([gray, alpha]), "LA"), d / "gray_alpha.png"),
        "RGBA": save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), d / "rgba.png"),
        "P": save(pal, d / "palette.png"),
        "P_transparent": save(pal_t, d / "palette_t.png", transparency=int(np.asarray(pal_t)[0, 0])),
        "I;16": save(Image.fromarray(gray.astype(np.uint16) * 257), d / "sixteen.png"),
        "F": save(Image.fromarray(gray.astype(np.float32) / 7.0 - 3.0, "F"), d / "float.tif"),
        "CMYK": save(Image.fromarray(rgb).convert("CMYK"), d / "cmyk.jpg"),
        "1": save(Image.fromarray(gray).convert("1"), d / "bilevel.png"),
        "EXIF6": save(exif_img, d / "rotated.jpg", exif=exif.tobytes()),
    }


def as_array(img: Image.Image) -> np.ndarray:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    return a


def assert_names(err: BaseException | str, *needles: str) -> str:
    msg = str(err)
    assert "\n" not in msg.strip(), f"error is not one line: {msg!r}"
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    return msg


# --- load_rgb: unreadable files ----------------------------------------------------------------

@pytest.mark.parametrize("kind,cause", [
    ("empty", "empty file"),
    ("random", "not a readable image"),
    ("truncated", "truncated"),
    ("text", "not a readable image"),
])
def test_load_rgb_rejects_unreadable(tmp_path, kind, cause):
    path = make_bad(tmp_path)[kind]
    with pytest.raises(BadImageError) as ei:
        load_rgb(path)
    assert_names(ei.value, str(path), cause)


def test_load_rgb_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(BadImageError) as ei:
        load_rgb(path)
    assert_names(ei.value, str(path), "not found")


def test_load_rgb_directory(tmp_path):
    path = tmp_path / "looks_like.png"
    path.mkdir()
    with pytest.raises(BadImageError) as ei:
        load_rgb(path)
    assert_names(ei.value, str(path), "directory")


def test_load_rgb_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    path = save(Image.fromarray(blocks()), tmp_path / "locked.png")

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)  # root ignores chmod, so fake the refusal
    with pytest.raises(BadImageError) as ei:
        load_rgb(path)
    msg = assert_names(ei.value, str(path), "permission denied")
    assert "corrupt" not in msg


def test_load_rgb_decompression_bomb(tmp_path, monkeypatch):
    path = save(Image.fromarray(blocks(64, 64)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x the limit: Pillow refuses
    with pytest.raises(BadImageError) as ei:
        load_rgb(path)
    assert_names(ei.value, str(path), "too large")


def test_load_rgb_smaller_than_one_patch(tmp_path):
    path = save(Image.fromarray(blocks(30, 8)), tmp_path / "sliver.png")  # 8 wide, 30 high
    with pytest.raises(BadImageError) as ei:
        load_rgb(path, min_side=16)
    assert_names(ei.value, str(path), "8x30", "16 px")
    assert load_rgb(path, min_side=8).size == (8, 30)  # exactly one patch is enough


# --- load_rgb: every odd mode comes back as 8-bit RGB -----------------------------------------

def test_load_rgb_grayscale(tmp_path):
    a = np.full((20, 20), 77, np.uint8)
    out = as_array(load_rgb(save(Image.fromarray(a, "L"), tmp_path / "g.png")))
    assert (out == 77).all()


def test_load_rgb_gray_alpha_and_rgba_composite_on_white(tmp_path):
    alpha = np.zeros((20, 20), np.uint8)
    alpha[:, :10] = 255  # left half opaque, right half fully transparent
    la = np.dstack([np.full((20, 20), 40, np.uint8), alpha])
    out = as_array(load_rgb(save(Image.fromarray(la, "LA"), tmp_path / "la.png")))
    assert (out[:, :10] == 40).all() and (out[:, 10:] == 255).all()

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, alpha  # transparent pixels are black underneath
    out = as_array(load_rgb(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")))
    assert (out[:, :10] == RED).all()
    assert (out[:, 10:] == WHITE).all()


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    a = np.zeros((20, 20, 3), np.uint8)
    a[:, :10] = RED
    a[:, 10:] = (0, 0, 255)
    p = Image.fromarray(a).quantize(4)
    out = as_array(load_rgb(save(p, tmp_path / "p.png")))
    assert (out[:, :10] == RED).all() and (out[:, 10:] == (0, 0, 255)).all()

    blue_index = int(np.asarray(p)[0, 15])
    out = as_array(load_rgb(save(p, tmp_path / "pt.png", transparency=blue_index)))
    assert (out[:, :10] == RED).all() and (out[:, 10:] == WHITE).all()

    gif = save(p, tmp_path / "pt.gif", transparency=blue_index)
    out = as_array(load_rgb(gif))
    assert (out[:, :10] == RED).all() and (out[:, 10:] == WHITE).all()


@pytest.mark.parametrize("big_endian_tiff", [False, True])
def test_load_rgb_16bit_uses_the_full_range(tmp_path, big_endian_tiff):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    a = np.tile(ramp, (4, 1))
    if big_endian_tiff:
        path = save(Image.fromarray(a.astype(">u2")), tmp_path / "ramp.tif")
    else:
        path = save(Image.fromarray(a), tmp_path / "ramp.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file, not silently 8-bit
    row = as_array(load_rgb(path))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 200  # a ramp, not clipped to 255 after the first pixels


def test_load_rgb_16bit_keeps_exposure(tmp_path):
    """A dark 16-bit image stays dark (scaled by 65535, not stretched to its own min/max)."""
    a = np.tile(np.linspace(0, 16383, 64).astype(np.uint16), (4, 1))
    row = as_array(load_rgb(save(Image.fromarray(a), tmp_path / "dark.png")))[0, :, 0]
    assert row.max() <= 64 and row[-1] > row[0]


def test_load_rgb_float_and_int32_tiff(tmp_path):
    ramp = np.tile(np.linspace(-1.0, 3.0, 64, dtype=np.float32), (8, 1))
    row = as_array(load_rgb(save(Image.fromarray(ramp, "F"), tmp_path / "f.tif")))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()

    ints = np.tile(np.arange(64, dtype=np.int32) * 100_000 - 1_000_000, (8, 1))
    row = as_array(load_rgb(save(Image.fromarray(ints), tmp_path / "i.tif")))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_load_rgb_float_with_nan_and_inf(tmp_path):
    """One NaN or inf pixel must not blank the whole image."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))
    ramp[0, 5], ramp[1, 6], ramp[2, 7] = np.nan, np.inf, -np.inf
    out = as_array(load_rgb(save(Image.fromarray(ramp, "F"), tmp_path / "nan.tif")))[..., 0].astype(int)
    row = out[5]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert out[1, 6] == 255 and out[2, 7] == 0

    allnan = np.full((16, 16), np.nan, np.float32)
    assert (as_array(load_rgb(save(Image.fromarray(allnan, "F"), tmp_path / "allnan.tif"))) == 0).all()


def test_load_rgb_cmyk_jpeg(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = RED
    a[:, 16:] = (0, 0, 255)
    path = save(Image.fromarray(a).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = as_array(load_rgb(path)).astype(int)
    np.testing.assert_allclose(out[8, 4], RED, atol=40)
    np.testing.assert_allclose(out[8, 28], (0, 0, 255), atol=40)


def test_load_rgb_bilevel(tmp_path):
    a = np.zeros((16, 16), np.uint8)
    a[:, 8:] = 255
    out = as_array(load_rgb(save(Image.fromarray(a).convert("1"), tmp_path / "b.png")))
    assert (out[:, :8] == 0).all() and (out[:, 8:] == 255).all()


def test_load_rgb_applies_exif_rotation(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)  # stored 80 wide, 40 high
    a[:10, :10] = RED  # marker in the stored top-left corner
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    path = save(img, tmp_path / "exif6.jpg", exif=exif.tobytes(), quality=95)
    out = as_array(load_rgb(path)).astype(int)
    assert out.shape[:2] == (80, 40)  # size swapped
    np.testing.assert_allclose(out[4, 35], RED, atol=40)  # top-left went to top-right
    assert out[4, 4].max() < 40


def test_load_rgb_survives_broken_exif(tmp_path, monkeypatch):
    path = save(Image.fromarray(blocks()), tmp_path / "exif.jpg")

    def broken(_im):
        import struct

        raise struct.error("unpack requires a buffer of 12 bytes")  # what malformed EXIF raises

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert load_rgb(path).size == (48, 48)


def test_load_rgb_every_odd_mode(tmp_path):
    """The files the dataset run below also uses all load as 8-bit RGB."""
    for name, path in make_odd(tmp_path).items():
        out = as_array(load_rgb(path, min_side=8))
        assert out.shape[:2] == ((64, 40) if name == "EXIF6" else (48, 48)), name


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


# --- output directory helpers -----------------------------------------------------------------

def test_out_dir_under_a_regular_file(tmp_path):
    f = write(tmp_path / "file", b"x")
    with pytest.raises(OutputDirError) as ei:
        ensure_writable_dir(f / "sub")
    assert_names(ei.value, str(f / "sub"), "not writable")
    with pytest.raises(OutputDirError) as ei:
        ensure_writable_dir(f)
    assert_names(ei.value, str(f), "not a directory")
    assert f.read_bytes() == b"x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError) as ei:
            ensure_writable_dir(ro)
        assert_names(ei.value, str(ro), "permission denied")
    finally:
        ro.chmod(0o700)


def test_atomic_write_failure_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "gone" / "manifest.json"  # the directory vanished mid-run
    with pytest.raises(OutputDirError) as ei:
        atomic_write_bytes(target, b"{}")
    assert_names(ei.value, str(target))

    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(TypeError):
        atomic_write_bytes(d / "x.bin", object())  # write fails: the temp file is removed
    assert not list(d.iterdir())
    atomic_write_bytes(d / "x.bin", b"ok")
    assert (d / "x.bin").read_bytes() == b"ok" and [p.name for p in d.iterdir()] == ["x.bin"]
    assert (d / "x.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


# --- the command line --------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    rc = main(["analyze", "--quiet", "--workers", "0", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, [ln for ln in cap.err.splitlines() if ln.strip()]


def assert_cli_error(capsys, args, *needles) -> str:
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("siftlens analyze: error: "), err
    return assert_names(err[0], *needles)


@pytest.fixture
def one_image(tmp_path):
    return save(Image.fromarray(blocks()), tmp_path / "one.png")


TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--input-size", "32", "32"]


@pytest.mark.parametrize("model", ["timm:not_a_model", "foo:bar", "not_a_model_spec"])
def test_cli_unknown_model(capsys, tmp_path, one_image, model):
    assert_cli_error(capsys, ["--model", model, "--random-init", "--images", one_image,
                              "--out", tmp_path / "out"], model, "unknown")


def test_cli_model_without_attention_layers(capsys, tmp_path, one_image):
    assert_cli_error(capsys, ["--model", "timm:resnet18", "--random-init", "--images", one_image,
                              "--out", tmp_path / "out"], "timm:resnet18", "no timm attention layers")


@pytest.mark.parametrize("how", ["under_a_file", "is_a_file"])
def test_cli_out_not_writable(capsys, tmp_path, one_image, how):
    f = write(tmp_path / "regular_file", b"x")
    out = f / "sub" if how == "under_a_file" else f
    assert_cli_error(capsys, [*TINY, "--images", one_image, "--out", out], f"--out {out}")
    assert f.read_bytes() == b"x"


def test_cli_missing_images(capsys, tmp_path):
    missing = tmp_path / "no_such_dir"
    assert_cli_error(capsys, [*TINY, "--images", missing, "--out", tmp_path / "out"], str(missing))


def test_cli_all_images_bad(capsys, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    bad = make_bad(d)
    msg = assert_cli_error(capsys, [*TINY, "--images", d, "--out", tmp_path / "out"],
                           "no image could be analysed")
    assert any(str(p) in msg for p in bad.values())


def test_cli_missing_and_corrupt_checkpoint(capsys, tmp_path, one_image):
    missing = tmp_path / "nope.pth"
    assert_cli_error(capsys, [*TINY, "--checkpoint", missing, "--images", one_image,
                              "--out", tmp_path / "out"], f"--checkpoint {missing}", "not found")
    corrupt = write(tmp_path / "corrupt.safetensors", b"garbage" * 20)
    assert_cli_error(capsys, [*TINY, "--checkpoint", corrupt, "--images", one_image,
                              "--out", tmp_path / "out"], f"--checkpoint {corrupt}")


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_pth(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / "CODE_RAN"
    path = tmp_path / f"{kind}.pth"
    if kind == "code":
        torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, path)
    else:
        path.write_bytes(b"\x80\x02not really a pickle" * 10)
    return path, marker


@pytest.mark.parametrize("kind", ["code", "corrupt"])
def test_cli_unsafe_or_corrupt_torch_checkpoint_is_refused(capsys, tmp_path, one_image, kind):
    ckpt, marker = _bad_pth(tmp_path, kind)
    rc, out, err = run_cli(capsys, *TINY, "--checkpoint", ckpt, "--images", one_image, "--out", tmp_path / "o")
    assert rc == 2
    assert not marker.exists(), "the checkpoint's pickled code was executed (weights_only must be True)"
    assert err and err[0].startswith(f"siftlens analyze: error: --checkpoint {ckpt}"), err
    assert "analysed" not in out


@pytest.mark.parametrize("kind", ["code", "corrupt"])
def test_cli_checkpoint_error_is_one_line(capsys, tmp_path, one_image, kind):
    ckpt, _ = _bad_pth(tmp_path, kind)
    assert_cli_error(capsys, [*TINY, "--checkpoint", ckpt, "--images", one_image, "--out", tmp_path / "o"],
                     f"--checkpoint {ckpt}")


def test_cli_success_with_a_bad_file_lists_it_and_leaves_no_temp_files(capsys, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    save(Image.fromarray(blocks()), d / "good.png")
    empty = write(d / "empty.jpg", b"")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, *TINY, "--images", d, "--out", out, "--no-report")
    assert rc == 0, err
    assert "analysed 1 images (1 skipped" in stdout
    assert err == [f"skipped: {empty}: empty file"]
    names = [p.name for p in out.iterdir()]
    assert "per_image.parquet" in names and "manifest.json" in names
    assert not [n for n in names if n.startswith(".") or n.endswith((".partial", ".tmp"))], names
