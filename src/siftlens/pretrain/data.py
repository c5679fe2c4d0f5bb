"""Pre-training data: decoded once into uint8 tensors held in memory (small images, many epochs).

Accepted ``--data``: an ImageFolder tree (``train/`` + a held-out split named ``val/``, ``test/`` or
``validation/`` (``image_source.split_aliases``), or class folders, or a flat folder of unlabelled images),
a ``.tar``/``.tar.gz`` archive of such a tree
(e.g. ``../shared/data/imagenette2-160.tar``), or an ``.npz`` with ``images`` ([N, H, W, 3] or
[N, 3, H, W] uint8) and optional ``labels``, ``val_images``, ``val_labels``. Unreadable images
are skipped and listed; labels (for the kNN / linear probes only) come from class folders.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..image_source import class_folder, extract_tar, find_images, find_split_dir, square_uint8
from ..io import atomic_write_npz
from ..preprocess import BadImageError, load_rgb
from ..validation import UserValueError


class PretrainDataError(UserValueError):
    """--data cannot be used (names the input and the cause)."""


@dataclass
class PretrainData:
    train: torch.Tensor  # [N, 3, S, S] uint8
    train_labels: torch.Tensor | None  # [N] int64, None when unlabelled
    val: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    val_source: str = "none"  # which held-out split the probes use


def resize_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """Short side to ``size`` (bicubic), centre crop size x size -> [3, size, size] uint8."""
    return square_uint8(im, size, "resize_crop")


def _decode_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, list[dict]]:
    files = find_images(root)
    names = [class_folder(f, root) for f in files]
    labelled = all(n is not None for n in names)  # ImageFolder classes, or a flat folder of unlabelled images
    class_dirs = sorted(set(names)) if labelled else []
    images, labels, skipped = [], [], []
    for f, name in zip(files, names):
        try:
            images.append(resize_center_crop(load_rgb(f, min_side=2), size))
        except BadImageError as e:
            skipped.append({"path": str(f), "reason": str(e)})
            continue
        if labelled:
            labels.append(class_dirs.index(name))
    if not images:
        raise PretrainDataError(f"--data {root}: no readable images ({len(skipped)} skipped)")
    arr = np.stack(images)
    return arr, (np.array(labels) if labelled else None), (class_dirs if labelled else None), skipped


def _extract_archive(path: Path, cache_dir: Path) -> Path:
    try:
        return extract_tar(path, cache_dir, "--data")
    except UserValueError as e:
        raise PretrainDataError(str(e)) from None


def _split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train folder, held-out folder or None); without a train/ folder the whole tree is for training."""
    train = root / "train"
    if not train.is_dir():
        return root, None
    return train, find_split_dir(root, "val", nested=False)


# what numpy raises on an .npz that is empty, cut short, not a zip or holds pickled objects
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _from_npz(path: Path, size: int) -> dict:
    try:
        z = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        raise PretrainDataError(f"--data {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if not hasattr(z, "files"):  # np.load of a plain .npy renamed .npz: one array, no names
        raise PretrainDataError(f"--data {path}: not an .npz archive of named arrays (a single .npy array?)")
    if "images" not in z.files:
        raise PretrainDataError(f"--data {path}: .npz has no 'images' array (has {z.files})")

    def read(key: str) -> np.ndarray:
        try:
            return z[key]
        except _NPZ_ERRORS as e:
            raise PretrainDataError(f"--data {path}: cannot read '{key}' ({type(e).__name__}: {e})") from None

    def labels(key: str) -> np.ndarray | None:
        if key not in z.files:
            return None
        a = read(key)
        whole = np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating)
                                                       and bool(np.all(np.isfinite(a) & (a == np.round(a)))))
        if a.ndim != 1 or not whole or (a.size and a.min() < 0):  # whole-number floats (np.zeros) are indices
            raise PretrainDataError(f"--data {path}: '{key}' must be non-negative integer class indices [N], got "
                                    f"{a.dtype} {list(a.shape)}" + (f" with minimum {a.min()}" if a.size and
                                                                  np.issubdtype(a.dtype, np.number) else ""))
        return a.astype(np.int64)

    def images(key: str) -> np.ndarray:
        a = read(key)
        if a.ndim != 4 or a.dtype != np.uint8 or 3 not in (a.shape[1], a.shape[3]):
            raise PretrainDataError(f"--data {path}: '{key}' must be uint8 [N, H, W, 3] or [N, 3, H, W], "
                                    f"got {a.dtype} {list(a.shape)}")
        a = a if a.shape[1] == 3 else a.transpose(0, 3, 1, 2)
        if a.shape[2:] != (size, size):
            a = np.stack([resize_center_crop(Image.fromarray(im.transpose(1, 2, 0)), size) for im in a])
        return np.ascontiguousarray(a)

    half = [k for k in ("val_images", "val_labels") if k in z.files]
    if len(half) == 1:  # the held-out split was silently ignored (10% of train held out instead)
        missing = "val_labels" if half == ["val_images"] else "val_images"
        raise PretrainDataError(f"--data {path}: .npz has '{half[0]}' but no '{missing}': the held-out split needs "
                                "both (or neither, to hold out part of train)")
    out = {"train": images("images"), "train_labels": labels("labels")}
    if "val_images" in z.files:
        out["val"], out["val_labels"] = images("val_images"), labels("val_labels")
    for split in ("train", "val"):
        lab = out.get(f"{split}_labels")
        if lab is not None and len(lab) != len(out[split]):
            raise PretrainDataError(f"--data {path}: {len(lab)} {split} labels for {len(out[split])} images")
    if out.get("val_labels") is not None and out["train_labels"] is not None:
        unknown = sorted(set(out["val_labels"].tolist()) - set(out["train_labels"].tolist()))
        if unknown:  # as for folders: the probes are trained on train's classes only
            raise PretrainDataError(f"--data {path}: 'val_labels' has classes not in 'labels': {unknown[:5]}")
    return out


def load_pretrain_data(spec: str | Path, size: int, cache_dir: str | Path | None = None,
                       val_fraction: float = 0.1, seed: int = 0) -> PretrainData:
    """Decode ``spec`` (see module docstring) to size x size uint8 tensors; cached as .npz in
    ``cache_dir`` when given. Without a held-out split, ``val_fraction`` of the labelled images
    are held out (seeded) for the probes and not used for pre-training."""
    path = Path(spec)
    if not path.exists():
        raise PretrainDataError(f"--data {spec}: no such file or directory")
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "siftlens-cache"
    if path.suffix == ".npz":
        arrays, classes, skipped = _from_npz(path, size), None, []
    else:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_mtime_ns}:{size}".encode()).hexdigest()[:16]
        decoded = cache / f"decoded-{path.name}-{size}-{key}.npz"
        if cache_dir and decoded.exists():
            with np.load(decoded, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k not in ("classes", "skipped")}
                classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
                skipped = [{"path": p, "reason": r} for p, r in z["skipped"]] if "skipped" in z.files else []
        else:
            root = _extract_archive(path, cache) if path.is_file() else path
            train_dir, val_dir = _split_dirs(root)
            x, y, classes, skipped = _decode_folder(train_dir, size)
            arrays = {"train": x}
            if y is not None:
                arrays["train_labels"] = y
            if val_dir is not None:
                vx, vy, vclasses, vskipped = _decode_folder(val_dir, size)
                skipped += vskipped
                if vy is not None and classes is not None:
                    if not set(vclasses) <= set(classes):
                        raise PretrainDataError(f"--data {spec}: {val_dir.name}/ has classes not in train/: "
                                                f"{sorted(set(vclasses) - set(classes))[:5]}")
                    arrays["val_labels"] = np.array([classes.index(vclasses[i]) for i in vy])
                arrays["val"] = vx
            if cache_dir:
                cache.mkdir(parents=True, exist_ok=True)  # a new --cache-dir (an archive's extraction makes it)
                extra = {"classes": np.array(classes)} if classes else {}
                if skipped:
                    extra["skipped"] = np.array([[s["path"], s["reason"]] for s in skipped])
                atomic_write_npz(decoded, compress=False, **{k: v for k, v in arrays.items() if v is not None},
                                 **extra)
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    data = PretrainData(t(arrays["train"]), t(arrays.get("train_labels")), t(arrays.get("val")),
                        t(arrays.get("val_labels")), classes, skipped)
    if data.val is not None and data.val_labels is not None:
        data.val_source = "held-out split"
    elif data.train_labels is not None and val_fraction > 0:
        n_val = max(1, int(len(data.train) * val_fraction))
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        data.val, data.val_labels = data.train[val_idx], data.train_labels[val_idx]
        data.train, data.train_labels = data.train[train_idx], data.train_labels[train_idx]
        data.val_source = f"{val_fraction:.0%} of train held out (seed {seed})"
    return data
