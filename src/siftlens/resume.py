"""Finished batches of a long per-image command (`flag`, `prompt`), kept so a killed run resumes.

``BatchParts(out, command, key)`` keeps batch i as ``out/.parts/<command>/<key>/<i>.parquet`` (its rows)
and ``<i>.json`` (written last: it marks the batch finished). ``key`` hashes everything that decides the
numbers (``run_key``); parts of a run with another key are removed, so a batch is never reused by another
run. ``finish()`` removes the parts once the command's own outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd

from .io import atomic_write_json, atomic_write_parquet
from .models import LoadedModel


def run_key(lm: LoadedModel, paths: list[Path], *settings, files: tuple[Path, ...] = ()) -> str:
    """Hash of the model (name, preprocessing, a sample of every weight tensor), the image list (path, size),
    the contents of ``files`` and the JSON of ``settings``."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    for p in paths:
        h.update(f"{p}\0{p.stat().st_size if p.exists() else -1}\0".encode())
    for t in lm.module.state_dict().values():  # same name, other weights: another run
        h.update(t.detach().cpu().contiguous().view(-1)[:64].float().numpy().tobytes())
    h.update(json.dumps([lm.name, lm.preprocess.to_dict(), *settings], default=str).encode())
    return h.hexdigest()[:16]


class BatchParts:
    def __init__(self, out: str | Path, command: str, key: str) -> None:
        self.root = Path(out) / ".parts" / command
        self.dir = self.root / key
        if self.root.is_dir():
            for old in self.root.iterdir():
                if old != self.dir:
                    shutil.rmtree(old, ignore_errors=True)

    def done(self, i: int) -> bool:
        return (self.dir / f"{i:06d}.json").is_file()

    def read(self, i: int) -> tuple[pd.DataFrame | None, dict]:
        meta = json.loads((self.dir / f"{i:06d}.json").read_text())
        rows = pd.read_parquet(self.dir / f"{i:06d}.parquet") if meta["n_rows"] else None
        return rows, meta

    def write(self, i: int, rows: pd.DataFrame | None, **meta) -> None:
        n = 0 if rows is None else len(rows)
        self.dir.mkdir(parents=True, exist_ok=True)  # only once a batch is done: a run that fails first leaves none
        if n:
            atomic_write_parquet(rows, self.dir / f"{i:06d}.parquet")
        atomic_write_json(self.dir / f"{i:06d}.json", {"n_rows": n, **meta})

    def finish(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()  # .parts, if nothing else is in it
        except OSError:
            pass
