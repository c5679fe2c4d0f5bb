"""Where images come from, for every command: files, folders, globs and tar archives; ImageFolder class labels;
split names; decoding to the model's input or to a fixed square size.

One rule each:

- **Listing** (``find_images``): a file, a directory (recursively; broken links are kept so that the run lists
  them as skipped) or a glob, sorted by path. A ``.tar``/``.tar.gz`` archive is streamed by
  ``load_image_folder`` (nothing extracted) or extracted once into a cache by ``extract_tar`` (``pretrain``).
- **Class labels** (ImageFolder): an image's class is the first folder under the root, ``root/<class>/.../x.jpg``
  (``class_folder``); in a tar archive, the folder that holds the image (``.../<split>/<class>/x.jpg``).
- **Split names**: ``train`` is the training split; the held-out split may be called ``val``, ``test`` or
  ``validation``: asking for any of those three finds the one the source has, the name asked for first, then
  the others in the order of ``HELD_OUT_SPLITS`` (``split_aliases``). A split folder is looked for under the
  source and one level down (``imagenette2-160/train``).
- **Decoding**: ``preprocess.load_rgb`` (any common format to 8-bit RGB, or a one-line error naming the file),
  then either the model's own preprocessing (``read_model_input``) or a fixed square of uint8 pixels for
  training and benchmarks (``square_uint8``: ``fit`` crops the centre square then resizes, as PIL's
  ``ImageOps.fit``; ``resize_crop`` resizes the short side then crops the centre: the two give different
  pixels, and each caller keeps the one its results were made with).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from .preprocess import IMAGE_SUFFIXES, load_rgb
from .validation import UserValueError

HELD_OUT_SPLITS = ("val", "test", "validation")
SQUARE_CROPS = ("fit", "resize_crop")


# --------------------------------------------------------------------------------------------------
# listing


def is_image_name(name: str | Path) -> bool:
    """Whether a file name has the suffix of an image format (those Pillow opens and other common ones)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def find_images(spec: str | Path | list) -> list[Path]:
    """Image files from a file, a directory (recursively, ImageFolder trees too) or a glob."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in find_images(s)]
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        # broken symlinks are kept so that the run lists them as skipped instead of silently dropping them
        files = sorted(f for f in _walk_files(p) if (f.is_file() or (f.is_symlink() and not f.exists()))
                       and is_image_name(f))
        if not files:
            raise FileNotFoundError(f"--images {spec}: directory contains no image files")
        return files
    files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"--images {spec}: no such file, directory or matching glob")
    return files


def _walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, following symlinked folders as torchvision's ImageFolder does (a class folder
    linked into a subset is common; Path.rglob skips it), each real folder once (a link cycle ends)."""
    seen: set[str] = set()
    out = []
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += [Path(d) / n for n in names]
    return out


def split_aliases(split: str) -> list[str]:
    """The folder names that hold ``split``: a held-out split (val / test / validation) is found under any of
    the three names, ``split`` itself first; any other split only under its own name."""
    if split not in HELD_OUT_SPLITS:
        return [split]
    return [split] + [s for s in HELD_OUT_SPLITS if s != split]


def find_split_dir(path: Path, split: str, nested: bool = True) -> Path | None:
    """The folder of ``split`` (any of its aliases, in order) at ``path/<split>`` or, with ``nested``, one level
    down, ``path/*/<split>`` (a folder that holds ``imagenette2-160/``)."""
    path = Path(path)
    for s in split_aliases(split):
        for c in [path / s] + (sorted(p / s for p in path.iterdir() if p.is_dir()) if nested else []):
            if c.is_dir():
                return c
    return None


def class_folder(file: Path, root: Path) -> str | None:
    """The ImageFolder class of ``file``: the first folder under ``root`` (None for a file directly in it)."""
    parts = Path(file).relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def image_folder(root: Path) -> dict[str, list[Path]]:
    """Class -> sorted image files of an ImageFolder tree (files directly in ``root`` have no class: left out)."""
    files: dict[str, list[Path]] = {}
    for f in find_images(root):
        c = class_folder(f, root)
        if c is not None:
            files.setdefault(c, []).append(f)
    return dict(sorted(files.items()))


def list_tar_image_folder(tar: tarfile.TarFile, path: Path, split: str | None) -> dict[str, list[tarfile.TarInfo]]:
    """Class -> image members of ``.../<split>/<class>/<file>`` (``<class>/<file>`` when split is None)."""
    members = [m for m in tar.getmembers() if m.isfile() and is_image_name(m.name)]
    for s in (split_aliases(split) if split is not None else [None]):
        out: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts
            if s is None:
                if len(parts) >= 2:
                    out.setdefault(parts[-2], []).append(m)
            elif len(parts) >= 3 and parts[-3] == s:
                out.setdefault(parts[-2], []).append(m)
        if out:
            return {c: sorted(ms, key=lambda m: m.name) for c, ms in sorted(out.items())}
    raise FileNotFoundError(f"no images under a {split!r} split folder in {path}")


def extract_tar(path: Path, cache_dir: Path, what: str = "--data") -> Path:
    """Extract an archive once into ``cache_dir`` (keyed by path, size and time; complete or absent) and return
    its root (the single top folder when there is one)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir / f"extracted-{path.name}-{key}"
    if not dest.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".extract-"))
        try:
            with tarfile.open(path) as tf:
                tf.extractall(tmp, filter="data")
                complete, n_members = _ends_with_end_marker(tf), len(tf.getmembers())
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserValueError(f"{what} {path}: cannot read archive ({e})") from None
        if not complete:  # tarfile stops without a word where a cut falls between members
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserValueError(f"{what} {path}: truncated archive (no end-of-archive marker after its "
                                 f"{n_members} readable members; an interrupted download or copy?)")
        try:
            tmp.rename(dest)  # complete or absent
        except OSError:  # another process finished the same extraction first
            if not dest.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in dest.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else dest


def _ends_with_end_marker(tf: tarfile.TarFile) -> bool:
    """Whether the archive read to its end has the zero block that ends every tar (POSIX; GNU tar and Python
    write two): tarfile ends the member list silently where a truncated file stops between two members."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


# --------------------------------------------------------------------------------------------------
# labels


def read_labels(images: list[Path], labels: str | None, root: Path | None) -> tuple[np.ndarray, list[str]]:
    """Labels from a CSV (columns path,label) or, with labels=None, from ImageFolder class folders, numbered
    0..C-1 in sorted order. Folder names sort as strings (torchvision ``ImageFolder``'s order: "10" before "2",
    which a model trained with it learned); CSV labels that are all integers sort as numbers (class indices: "2"
    before "10")."""
    if labels is None:
        if root is None or not root.is_dir():
            raise UserValueError("--labels is required unless --images is an ImageFolder directory (class/*.jpg)")
        names = [class_folder(p, root) for p in images]
        if any(n is None for n in names):
            raise UserValueError(f"--images {root}: files directly in the root have no class folder; pass --labels CSV")
    else:
        try:
            df = pd.read_csv(labels)
        except FileNotFoundError:
            raise UserValueError(f"--labels {labels}: no such file") from None
        except (ValueError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
            raise UserValueError(f"--labels {labels}: not a readable CSV ({type(e).__name__}: {e})") from None
        if not {"path", "label"} <= set(df.columns):
            raise UserValueError(f"--labels {labels}: needs columns 'path' and 'label' (has {list(df.columns)})")
        blank = df["label"].isna() | df["path"].isna()
        if blank.any():  # an empty cell (or NA): a label was read as a class named "nan"
            raise UserValueError(f"--labels {labels}: {int(blank.sum())} rows with an empty path or label (first: row "
                                 f"{int(blank.to_numpy().argmax()) + 2} of the file)")
        by_path: dict[str, str] = {}
        by_name: dict[str, str | None] = {}  # None: one file name with two labels (in two folders)
        for p, lab in zip(df["path"], df["label"].astype(str)):
            key = str(Path(p))
            if by_path.setdefault(key, lab) != lab:  # the later row won before, silently
                raise UserValueError(f"--labels {labels}: {p} is listed with two labels ({by_path[key]!r}, {lab!r})")
            name = Path(p).name
            by_name[name] = lab if by_name.get(name, lab) == lab else None
        ambiguous = [str(p) for p in images if str(p) not in by_path and p.name in by_name and by_name[p.name] is None]
        if ambiguous:
            raise UserValueError(f"--labels {labels}: {len(ambiguous)} images are matched only by file name, and "
                                 f"that name has two labels (first: {ambiguous[0]}); give their full paths")
        names = [by_path.get(str(p), by_name.get(p.name)) for p in images]
        missing = [str(p) for p, n in zip(images, names) if n is None]
        if missing:
            raise UserValueError(f"--labels {labels}: no label for {len(missing)} of {len(images)} images "
                                 f"(first: {missing[0]})")
    numeric = labels is not None and all(re.fullmatch(r"[+-]?\d+", n.strip()) for n in names)
    classes = sorted(set(names), key=(lambda n: int(n)) if numeric else None)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names]), classes


# --------------------------------------------------------------------------------------------------
# decoding


def read_model_input(lm, path: str | Path) -> torch.Tensor:
    """One image file as the model sees it: decoded (``load_rgb``; at least one patch) and put through the
    model's own preprocessing, [3, H, W]. Raises ``BadImageError`` naming the file."""
    return lm.preprocess(load_rgb(path, min_side=lm.patch_size))


def square_uint8(im: Image.Image, size: int, crop: str = "resize_crop") -> np.ndarray:
    """RGB image -> uint8 [3, size, size]: ``fit`` (centre square, then resize) or ``resize_crop`` (short side
    to ``size``, then the centre square); bicubic."""
    if crop == "fit":
        im = ImageOps.fit(im, (size, size), Image.BICUBIC)
    elif crop == "resize_crop":
        im = resize_short_center_crop(im, size, size)
    else:
        raise ValueError(f"crop {crop!r} is not one of {SQUARE_CROPS}")
    return np.asarray(im).transpose(2, 0, 1).copy()


def resize_short_center_crop(im: Image.Image, short_side: int, crop: int) -> Image.Image:
    """Resize the short side to ``short_side`` (bicubic), then centre-crop crop x crop."""
    w, h = im.size
    s = short_side / min(w, h)
    im = im.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return im.crop((left, top, left + crop, top + crop))


def decode_square(data: bytes | Path, size: int, crop: str = "fit", draft: bool = True,
                  name: str | None = None) -> np.ndarray:
    """An image file (a path, or the bytes of a tar member named ``name``) -> uint8 [3, size, size].
    ``draft``: let a JPEG decode at a reduced scale that is still >= ``size`` (faster; other pixels)."""
    return square_uint8(load_rgb(data, min_side=1, draft=(size, size) if draft else None, name=name), size, crop)


class SourceImages(NamedTuple):
    """Decoded images: uint8 ``[N, 3, S, S]``, int64 labels ``[N]``, class folder names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def select_per_class(files: dict[str, list], classes: Sequence[str] | int | None, per_class: int | None, seed: int,
            display_names: Mapping[str, str]) -> tuple[list[str], dict[str, list]]:
    """The chosen classes and, per class, a seeded draw of ``per_class`` of its files (in file order; class i of
    the chosen ones draws with seed [seed, i]); a class with too few files, or one not in ``files``, is an error."""
    available = list(files)
    if classes is None:
        chosen = available
    elif isinstance(classes, int):
        if not 1 <= classes <= len(available):
            raise ValueError(f"asked for {classes} classes but the source has {len(available)}: {available}")
        chosen = available[:classes]
    else:
        by_display = {display_names.get(c, c): c for c in available}
        chosen = []
        for c in classes:
            if c in files:
                chosen.append(c)
            elif c in by_display:
                chosen.append(by_display[c])
            else:
                raise ValueError(f"class {c!r} is not in the source; available: {available}")
    picked = {}
    for ci, c in enumerate(chosen):
        fs = files[c]
        if per_class is None:
            picked[c] = fs
            continue
        if len(fs) < per_class:
            raise ValueError(f"class {c!r} has {len(fs)} images, fewer than per_class={per_class}")
        rng = np.random.default_rng([seed, ci])
        idx = np.sort(rng.choice(len(fs), size=per_class, replace=False))
        picked[c] = [fs[i] for i in idx]
    return chosen, picked


def load_image_folder(path: str | Path, split: str | None = "train", classes: Sequence[str] | int | None = None,
                      per_class: int | None = None, size: int = 64, seed: int = 0, *, crop: str = "fit",
                      draft: bool = True, display_names: Mapping[str, str] | None = None) -> SourceImages:
    """Decode a (seeded, class-balanced) subset of an ImageFolder source to uint8 ``[N, 3, size, size]``.

    ``path`` is a directory or a tar archive (``.tar``, ``.tar.gz``; members are streamed, nothing is
    extracted). The class folders are looked up under ``split`` (``split_aliases``: val / test / validation
    stand for each other), also one level down (``imagenette2-160/train/<wnid>``); ``split=None`` means the
    class folders are directly under ``path`` (in a tar: each image's parent folder is its class).
    ``classes``: folder names or their ``display_names``, an int n (the first n folders in sorted order) or
    None (all). ``per_class``: how many images per class, drawn at random (seeded) without replacement; None
    takes all. ``crop``, ``draft``: see ``square_uint8`` and ``decode_square``.

    Raises FileNotFoundError naming ``path`` when it or the split is missing, ValueError naming the class when
    a class has fewer than ``per_class`` images or is unknown, BadImageError naming an unreadable image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path}")
    names = display_names or {}
    images, labels = [], []
    if path.is_dir():
        root = path
        if split is not None:
            root = find_split_dir(path, split)
            if root is None:
                raise FileNotFoundError(
                    f"no split folder {split!r} under {path} (looked for {path / split} and {path}/*/{split}); "
                    "pass split=None if the folder itself holds the class folders")
        files = image_folder(root)
        if not files:
            raise FileNotFoundError(f"no class folders with images under {root}")
        chosen, picked = select_per_class(files, classes, per_class, seed, names)
        for ci, c in enumerate(chosen):
            for f in picked[c]:
                images.append(decode_square(f, size, crop, draft))
                labels.append(ci)
    else:
        try:
            tar = tarfile.open(path, "r:*")
        except tarfile.ReadError as e:
            raise ValueError(f"{path} is neither a folder nor a readable tar archive ({e})") from None
        with tar:
            files = list_tar_image_folder(tar, path, split)
            chosen, picked = select_per_class(files, classes, per_class, seed, names)
            where = {m.name: (ci, j) for ci, c in enumerate(chosen) for j, m in enumerate(picked[c])}
            decoded: dict[tuple[int, int], np.ndarray] = {}
            for m in sorted((m for c in chosen for m in picked[c]), key=lambda m: m.offset):  # archive order
                f = tar.extractfile(m)
                assert f is not None
                decoded[where[m.name]] = decode_square(f.read(), size, crop, draft, name=f"{path}:{m.name}")
            for key in sorted(decoded):
                images.append(decoded[key])
                labels.append(key[0])
    return SourceImages(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), list(chosen))
