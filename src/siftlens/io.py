"""Atomic output writing: a file either appears complete or not at all."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class OutputDirError(OSError):
    """The output directory cannot be created or written to."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, or raise OutputDirError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputDirError(f"--out {path}: output directory is not writable ({e.strerror or e})") from None
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` via a temporary file in the same directory and a rename; never a partial file.

    Failures (disk full, directory gone or read-only) raise OutputDirError naming ``path`` (``atomic_path``).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_write_npz(path: str | Path, compress: bool = True, **arrays) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_parquet(df, path: str | Path) -> None:
    """A pandas DataFrame as Parquet, written atomically (no index)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary path beside ``path`` for writers that need a file name (a ParquetWriter,
    ``DataFrame.to_csv``); renamed to ``path`` when the block succeeds, removed when it fails.

    Concurrent writers never share the temporary name; OSErrors raise OutputDirError naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise OutputDirError(f"{path}: cannot write output ({e.strerror or e})") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputDirError):
            raise OutputDirError(f"{path}: cannot write output ({e.strerror or e})") from e
        raise
