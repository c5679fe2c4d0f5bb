"""Model inputs in batches, read when needed: memory flat in the number of images.

``spurious``, ``flag`` and ``prompt`` make several passes (attention and keypoints of every image,
counterfactual forwards on a sample, exemplar crops), so a source is indexable: ``batches(indices)``
decodes and preprocesses only the images of one batch at a time, ``get(indices)`` a few of them.
A tensor already in memory (tests, the library API) is wrapped as the same interface.

The first pass reads the files in fixed chunks (``read_chunk(c, batch_size)``: files c·B .. c·B + B - 1, the
unreadable ones left out), so a chunk is the same whichever earlier chunks were read: a resumed run skips
finished chunks and torchrun ranks take their own. ``set_readable`` then fixes the readable files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..image_source import read_model_input
from ..models import LoadedModel
from ..preprocess import BadImageError
from ..validation import UserValueError


class TensorSource:
    """Model inputs already in memory [N, 3, H, W]."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.x.shape[-2:])

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return self.x[torch.as_tensor(np.asarray(indices, dtype=np.int64))]

    @property
    def n_files(self) -> int:
        return len(self.x)

    def n_chunks(self, batch_size: int) -> int:
        return -(-len(self.x) // batch_size)

    def read_chunk(self, c: int, batch_size: int) -> tuple[np.ndarray, torch.Tensor | None, list[dict]]:
        idx = np.arange(c * batch_size, min((c + 1) * batch_size, len(self.x)))
        return idx, self.get(idx), []

    def set_readable(self, kept: Sequence[int], skipped: list[dict]) -> None:
        pass  # every input is readable

    def batches(self, batch_size: int, indices: Sequence[int] | None = None
                ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(idx), batch_size):
            yield idx[s:s + batch_size], self.get(idx[s:s + batch_size])


class PathSource:
    """Image files, decoded and preprocessed batch by batch.

    The first full pass (``scan``) finds the unreadable files: they are recorded in ``skipped`` (path,
    reason) and dropped, so index i of the source is the i-th readable file (``paths[i]``)."""

    def __init__(self, lm: LoadedModel, paths: Sequence[Path], source_name: str | Path = "") -> None:
        self.lm, self.all_paths, self.name = lm, [Path(p) for p in paths], str(source_name)
        self.paths: list[Path] = list(self.all_paths)
        self.kept = np.arange(len(self.paths))  # index into all_paths of each readable image
        self.skipped: list[dict] = []
        self._scanned = False

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.lm.preprocess.input_size)

    def _load(self, p: Path) -> torch.Tensor:
        return read_model_input(self.lm, p)

    @property
    def n_files(self) -> int:
        return len(self.all_paths)

    def n_chunks(self, batch_size: int) -> int:
        return -(-len(self.all_paths) // batch_size)

    def read_chunk(self, c: int, batch_size: int) -> tuple[np.ndarray, torch.Tensor | None, list[dict]]:
        """Files c·B .. c·B + B - 1: (indices into ``all_paths`` of the readable ones, their inputs or None
        when there are none, the skipped ones with reasons)."""
        keep, xs, skipped = [], [], []
        for i in range(c * batch_size, min((c + 1) * batch_size, len(self.all_paths))):
            try:
                xs.append(self._load(self.all_paths[i]))
                keep.append(i)
            except BadImageError as e:
                skipped.append({"path": str(self.all_paths[i]), "reason": str(e)})
        return np.array(keep, dtype=np.int64), (torch.stack(xs) if xs else None), skipped

    def set_readable(self, kept: Sequence[int], skipped: list[dict]) -> None:
        """After a first pass (read here or by other ranks / an earlier run): index i is ``paths[i]``."""
        self.kept = np.asarray(kept, dtype=np.int64)
        self.paths = [self.all_paths[int(i)] for i in self.kept]
        self.skipped = list(skipped)
        self._scanned = True
        if not len(self.kept):
            raise UserValueError(f"--images {self.name}: no readable image")

    def scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """First pass over every file, chunk by chunk: yields (indices among the readable ones, inputs) and
        fixes ``paths``."""
        keep: list[int] = []
        skipped: list[dict] = []
        self.paths = []  # grows with the scan, so paths[i] is the file of every index yielded so far
        for c in range(self.n_chunks(batch_size)):
            kept, x, sk = self.read_chunk(c, batch_size)
            skipped += sk
            self.skipped = list(skipped)
            if x is None:
                continue
            idx = np.arange(len(keep), len(keep) + len(kept))
            keep += kept.tolist()
            self.paths += [self.all_paths[int(i)] for i in kept]
            yield idx, x
        self.set_readable(keep, skipped)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._load(self.paths[int(i)]) for i in indices])

    def batches(self, batch_size: int, indices: Sequence[int] | None = None
                ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if not self._scanned:
            if indices is not None:
                raise RuntimeError("PathSource: scan() the images once before indexing them")
            yield from self.scan(batch_size)
            return
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(idx), batch_size):
            yield idx[s:s + batch_size], self.get(idx[s:s + batch_size])


def as_source(images) -> TensorSource | PathSource:
    return TensorSource(images) if torch.is_tensor(images) else images
