"""Image loading that survives real-world files, and the model's own preprocessing.

The preprocessing spec travels with the model (timm's pretrained_cfg, an HF image processor
config, torchvision's weights transforms, or the bundled model's json).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import __version__ as PIL_VERSION
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .validation import UserValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _readable_suffixes() -> frozenset[str]:
    """File suffixes of the formats this Pillow can open (its plugins register them), less the ones that
    name data or video files rather than images."""
    Image.init()
    not_images = {".h5", ".hdf", ".bufr", ".grib", ".mpeg", ".mpg"}
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and ext not in not_images)


# Common image formats: those this Pillow cannot open are still collected from a directory, then
# listed as skipped with the reason, never silently left out.
COMMON_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                                   ".pgm", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".svg", ".dng", ".cr2",
                                   ".nef", ".arw"})
PILLOW_SUFFIXES = _readable_suffixes()
IMAGE_SUFFIXES = PILLOW_SUFFIXES | COMMON_IMAGE_SUFFIXES


class BadImageError(UserValueError):
    """An input image that cannot be analysed; the message names the file and the cause."""


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to size/crop_pct (or straight to size), centre crop, normalise."""

    input_size: tuple[int, int]  # (H, W) of the model input
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float | None = 0.875  # None: resize straight to input_size (HF ViTImageProcessor)
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised float tensor [3, H, W]."""
        H, W = self.input_size
        interp = InterpolationMode(self.interpolation)
        if self.crop_pct is None:
            img = TF.resize(img, [H, W], interpolation=interp)
        else:
            # timm's eval transform: scale so the crop covers crop_pct of the resized image
            scale = (math.floor(H / self.crop_pct), math.floor(W / self.crop_pct))
            if H == W:
                img = TF.resize(img, scale[0], interpolation=interp)
            else:
                img = TF.resize(img, list(scale), interpolation=interp)
            img = TF.center_crop(img, [H, W])
        x = TF.pil_to_tensor(img).float().div_(255.0)
        return TF.normalize(x, self.mean, self.std)

    def to_uint8_gray(self, x: torch.Tensor) -> np.ndarray:
        """Undo normalisation of a model input [3, H, W] -> 8-bit grey [H, W] (for SIFT)."""
        # numpy, not torch: per-image tensors are small and torch's thread pool only adds overhead here
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(3, 1, 1)
        rgb = np.clip(x.detach().cpu().float().numpy() * std + mean, 0.0, 1.0)
        return rgb01_to_gray_u8(rgb)

    def to_uint8_rgb(self, x: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        rgb = (x.detach().cpu().float() * std + mean).clamp(0, 1)
        return (rgb.permute(1, 2, 0) * 255.0 + 0.5).to(torch.uint8).numpy()


def rgb01_to_gray_u8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1], channels at axis -3 ([3, H, W] or [N, 3, H, W]) -> 8-bit grey (ITU-R 601, as
    cv2.COLOR_RGB2GRAY): the image SIFT sees."""
    gray = 0.299 * rgb[..., 0, :, :] + 0.587 * rgb[..., 1, :, :] + 0.114 * rgb[..., 2, :, :]
    return (gray * 255.0 + 0.5).astype(np.uint8)


def load_rgb(path: str | Path | bytes, min_side: int = 1, *, draft: tuple[int, int] | None = None,
             name: str | None = None) -> Image.Image:
    """Open any common image file as 8-bit RGB, or raise BadImageError naming the file and cause.

    ``path`` is a file, or the bytes of one (a tar member; ``name`` names it in errors). ``draft`` (w, h): let
    a JPEG decode at a reduced scale that is still at least this size (faster; other pixels than a full decode).
    Handles EXIF rotation, grayscale, RGBA/LA/palette transparency (composited on white),
    16-bit and float images (scaled to 8 bit by their range), CMYK.
    """
    data = path if isinstance(path, bytes) else None
    path = Path(name or "<bytes>") if data is not None else Path(path)
    try:
        if data is None:
            if path.is_dir():
                raise BadImageError(f"{path}: is a directory, not an image file")
            if path.stat().st_size == 0:
                raise BadImageError(f"{path}: empty file")
        elif not data:
            raise BadImageError(f"{path}: empty file")
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            if draft is not None:
                im.draft("RGB", draft)
            im.load()
            im = _exif_transpose(im)
            rgb = _to_rgb8(im)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        if path.suffix.lower() in IMAGE_SUFFIXES - PILLOW_SUFFIXES:
            raise BadImageError(f"{path}: {path.suffix.lower()} images cannot be decoded here (Pillow {PIL_VERSION} "
                                "has no decoder for them); convert to PNG or JPEG") from None
        raise BadImageError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:  # not an OSError: would escape as a traceback
        raise BadImageError(f"{path}: image too large ({e})") from None
    except OSError as e:
        if e.errno is not None:  # permission denied, I/O error, ...: the file, not its content
            raise BadImageError(f"{path}: cannot read file ({e.strerror or e})") from None
        raise BadImageError(f"{path}: corrupt image ({e})") from None  # truncated / broken data
    except (ValueError, SyntaxError, EOFError, MemoryError) as e:  # corrupt headers, unsupported modes
        raise BadImageError(f"{path}: corrupt or unsupported image ({type(e).__name__}: {e})") from None
    if min(rgb.size) < min_side:
        raise BadImageError(
            f"{path}: image {rgb.size[0]}x{rgb.size[1]} px is smaller than one patch ({min_side} px)")
    return rgb


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block must not cost an otherwise good image."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF raises all sorts (struct.error, KeyError, ...)
        return im


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode.startswith(("I", "F")):  # I;16*, I (32-bit int), F (float): scale to 8 bit
        a = np.asarray(im, dtype=np.float64)
        finite = np.isfinite(a)
        if im.mode.startswith("I;16") and not im.mode.startswith("I;16S"):
            lo, hi = 0.0, 65535.0  # unsigned 16 bit: the full range, so exposure is kept
        elif finite.any():  # int32 / float: their own range; NaN and +-inf must not poison it
            lo, hi = float(a[finite].min()), float(a[finite].max())
        else:
            lo = hi = 0.0
        a = np.where(np.isnan(a), lo, np.clip(a, lo, hi))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        return Image.fromarray((a * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB
