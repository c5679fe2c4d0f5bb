"""preprocess.py: load_rgb turns any common image file into 8-bit RGB or a one-line error naming the file and
the cause (unreadable, corrupt or empty files, every odd mode); Preprocess is the model's own resize, crop
and normalisation, and its inverse for SIFT. Every file is generated in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from siftlens.preprocess import BadImageError, Preprocess, load_rgb, rgb01_to_gray_u8
from tests.bad_files import RED, WHITE, as_array, assert_names, blocks, make_bad, make_odd, save

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


# --- Preprocess: the model's own resize, crop and normalisation ------------------------------------

def test_preprocess_matches_timms_eval_transform():
    from timm.data import create_transform

    img = Image.fromarray(blocks(150, 230, seed=7, cell=5))  # landscape, not a multiple of anything
    pre = Preprocess((64, 64), crop_pct=0.875, interpolation="bicubic")
    ref = create_transform(input_size=(3, 64, 64), crop_pct=0.875, interpolation="bicubic")(img)
    torch.testing.assert_close(pre(img), ref, rtol=0, atol=1e-6)
    other = Preprocess((64, 64), crop_pct=1.0)(img)  # the crop matters: a wrong scale would not match
    assert (other - ref).abs().max() > 0.1


def test_preprocess_without_crop_resizes_to_a_non_square_input():
    img = Image.fromarray(blocks(40, 90, seed=8))
    x = Preprocess((32, 48), crop_pct=None)(img)
    assert tuple(x.shape) == (3, 32, 48)
    x = Preprocess((32, 48), crop_pct=0.875)(img)  # non-square with a crop: both sides scaled, then cropped
    assert tuple(x.shape) == (3, 32, 48)


def test_preprocess_inverse_gives_back_the_pixels_and_opencvs_grey():
    import cv2

    rgb = blocks(32, 32, seed=9)
    pre = Preprocess((32, 32), mean=(0.2, 0.5, 0.7), std=(0.3, 0.2, 0.25), crop_pct=None)
    x = pre(Image.fromarray(rgb))
    assert abs(float(x[0].mean()) - float(((rgb[..., 0] / 255.0 - 0.2) / 0.3).mean())) < 1e-5  # per-channel
    np.testing.assert_array_equal(pre.to_uint8_rgb(x), rgb)
    gray = pre.to_uint8_gray(x)
    assert np.abs(gray.astype(int) - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)).max() <= 1
    # ITU-R 601 weights, per channel (a swapped channel order would fail)
    prim = np.eye(3, dtype=np.float64)[:, :, None, None]  # [3 colours, 3 channels, 1, 1]
    assert rgb01_to_gray_u8(prim)[:, 0, 0].tolist() == [76, 150, 29]


def test_load_rgb_from_bytes_and_with_a_jpeg_draft(tmp_path):
    big = Image.fromarray(blocks(256, 320, seed=12))
    path = save(big, tmp_path / "big.jpg", quality=92)
    data = path.read_bytes()
    np.testing.assert_array_equal(as_array(load_rgb(data, name="archive.tar:big.jpg")), as_array(load_rgb(path)))
    assert load_rgb(data, draft=(64, 64)).size == (80, 64)  # decoded at 1/4 scale: still >= 64 on each side
    assert load_rgb(data, draft=(200, 200)).size == (320, 256)  # no reduced scale is large enough
    with pytest.raises(BadImageError) as ei:
        load_rgb(b"", name="archive.tar:empty.jpg")
    assert_names(ei.value, "archive.tar:empty.jpg", "empty file")
    with pytest.raises(BadImageError) as ei:
        load_rgb(data[:100], name="archive.tar:cut.jpg")
    assert_names(ei.value, "archive.tar:cut.jpg")
