"""Files that break naive image loading, generated in a test's tmp_path (shared by test_preprocess, test_io,
test_cli and test_bad_inputs): unreadable, corrupt or empty files and every awkward image mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RED, WHITE = (255, 0, 0), (255, 255, 255)


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
