"""Finished batches of the long per-image commands (`spurious`, `flag`, `prompt`), kept so a killed run
resumes, and shared by torchrun ranks (``RunParts``; `analyze` keeps its own parts, analyze.py).

``out/.parts/<command>/run.json`` holds the settings that decide the numbers (``settings_fingerprint``); each
pass keeps numbered parts ``<pass>/<i>.{parquet,npz}`` and ``<i>.json``, written last, atomically: it marks the
part finished. A run with the same settings reuses every finished part; with other settings it is refused
(one line naming --out and the settings) while finished parts exist. ``finish()`` removes the parts once the
command's own outputs are written.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .io import atomic_write_json, atomic_write_npz, atomic_write_parquet
from .models import LoadedModel
from .validation import UserRuntimeError


def settings_fingerprint(lm: LoadedModel, paths: list[Path], files: tuple[Path, ...] = (), **options) -> dict:
    """What decides a run's numbers, as named entries (a resumed run is refused with the names that differ):
    the model (name, preprocessing, a sample of every weight tensor), the image list (paths and sizes), the
    contents of ``files`` and ``options`` (not the device: analyze does the same)."""
    images, weights, contents = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for p in paths:
        images.update(f"{p}\0{p.stat().st_size if p.exists() else -1}\0".encode())
    for t in lm.module.state_dict().values():  # same name, other weights: another run
        weights.update(t.detach().cpu().contiguous().view(-1)[:64].float().numpy().tobytes())
    for f in files:
        contents.update(Path(f).read_bytes())
    fp = {"model": lm.name, "weights": weights.hexdigest()[:16], "preprocess": lm.preprocess.to_dict(),
          "images": images.hexdigest()[:16], "n_images": len(paths), **options}
    if files:
        fp["files"] = contents.hexdigest()[:16]
    return json.loads(json.dumps(fp, default=str))  # as it reads back from run.json


def distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size): (0, 1) unless started by torchrun (WORLD_SIZE > 1), which joins the process group
    (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """Under torchrun each rank on its own GPU (LOCAL_RANK); a CPU device is shared."""
    if str(device).startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class Part:
    """One finished unit of work: small JSON ``meta``, an optional table and named arrays."""

    meta: dict = field(default_factory=dict)
    table: pd.DataFrame | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def release_freed_memory() -> None:
    """Hand the heap pages freed by the last batch back to the system (glibc ``malloc_trim``; elsewhere
    nothing). Why: a batch's forward frees hundreds of MB of large blocks, and glibc, whose mmap threshold
    grows after such frees, serves the next batch's from a heap that small long-lived objects keep from
    shrinking: without this the peak resident memory of `spurious` rose with its number of batches
    (benchmarks/RESULTS.md, "`spurious`: peak memory in the number of images")."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


KILL_HOOK = "SIFTLENS_TEST_KILL_AFTER"  # "<pass>:<n>": SIGKILL this process once it has written n parts of <pass>


class RunParts:
    """The resume state of a multi-pass command in ``out/.parts/<command>/``: ``run.json`` (the settings
    fingerprint) and, per pass, numbered parts ``<pass>/<i>.{parquet,npz,json}`` (the json is written last,
    atomically: it marks the part finished).

    ``run(pass, n, compute)``: every rank computes its share of the n items (item i on rank i % world) that no
    earlier run finished, waits for the other ranks, and reads back all n parts in order: a run killed in any
    pass and started again with the same settings redoes only the unfinished items, and a torchrun job gives
    the parts one process would. Different settings while finished parts exist: a one-line refusal naming
    ``--out`` and the settings that differ (nothing is removed). ``out=None``: parts are kept in memory (the
    library API; one process). ``progress``: a tqdm bar per pass on stderr where it is a terminal (batches this
    rank computes), so a long run on a large model shows where it is."""

    def __init__(self, out: str | Path | None, command: str, settings: dict | None = None, rank: int = 0,
                 world: int = 1, progress: bool = False) -> None:
        self.rank, self.world, self.command, self.progress = rank, world, command, progress
        self.root = None if out is None else Path(out) / ".parts" / command
        self._memory: dict[tuple[str, int], Part] = {}
        self._written: dict[str, int] = {}
        self.settings = settings or {}
        if self.root is None:
            if world > 1:
                raise ValueError("a distributed run needs an output directory for its parts")
            return
        if rank == 0:
            self._start_or_resume(Path(out), self.settings)
        barrier(world)

    @classmethod
    def memory(cls) -> RunParts:
        return cls(None, "")

    def _start_or_resume(self, out: Path, settings: dict) -> None:
        run_file = self.root / "run.json"
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text())
            except ValueError:
                old = None  # unreadable: it cannot be resumed
            if old == settings:
                return
            if any(self.root.glob("*/*.json")):
                if isinstance(old, dict):
                    diff = [f"{k} ({old.get(k)!r} there, {settings.get(k)!r} now)"
                            for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                else:
                    diff = [f"settings ({run_file} is unreadable)"]
                raise UserRuntimeError(
                    f"--out {out} holds an unfinished {self.command} run with different {'; '.join(diff)}: run it "
                    f"again with its arguments to resume, or use another --out, or delete {self.root} to start over")
            self.finish()  # a run that finished no part holds nothing worth keeping
        # run.json is written with the first finished part: a run that fails before one leaves nothing behind

    def _dir(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str, i: int) -> bool:
        if self.root is None:
            return (name, i) in self._memory
        return (self._dir(name) / f"{i:06d}.json").is_file()

    def write(self, name: str, i: int, part: Part) -> None:
        if self.root is None:
            self._memory[(name, i)] = part
            return
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        if not (self.root / "run.json").is_file():
            atomic_write_json(self.root / "run.json", self.settings)
        if part.table is not None:
            atomic_write_parquet(part.table, d / f"{i:06d}.parquet")
        if part.arrays:
            atomic_write_npz(d / f"{i:06d}.npz", compress=False, **part.arrays)
        atomic_write_json(d / f"{i:06d}.json", {"meta": part.meta, "table": part.table is not None,
                                                "arrays": sorted(part.arrays)})
        self._written[name] = self._written.get(name, 0) + 1
        hook = os.environ.get(KILL_HOOK, "")
        if hook and hook.rsplit(":", 1) == [name, str(self._written[name])]:  # tests: a real kill mid-run
            os.kill(os.getpid(), signal.SIGKILL)

    def read(self, name: str, i: int, arrays: Sequence[str] | None = None, table: bool = True) -> Part:
        """Part i of pass ``name``; ``arrays``: only these of its arrays (default: all); ``table=False``: without
        its table (a later pass that needs one array of every part reads no more than that)."""
        if self.root is None:
            return self._memory[(name, i)]
        d = self._dir(name)
        try:
            head = json.loads((d / f"{i:06d}.json").read_text())
            frame = pd.read_parquet(d / f"{i:06d}.parquet") if head["table"] and table else None
            wanted = [k for k in head["arrays"] if arrays is None or k in arrays]
            loaded = {}
            if wanted:
                with np.load(d / f"{i:06d}.npz", allow_pickle=False) as z:
                    loaded = {k: z[k] for k in wanted}
        except (OSError, ValueError, KeyError) as e:
            raise UserRuntimeError(f"{d}/{i:06d}.*: unreadable resume part ({type(e).__name__}: {e}); delete "
                                   f"{self.root} to start over") from None
        return Part(head["meta"], frame, loaded)

    def run(self, name: str, n: int, compute: Callable[[int], Part]) -> Iterator[Part]:
        """Compute this rank's unfinished items of pass ``name`` (0..n-1), wait for every rank, then yield all
        n parts in order (read one at a time)."""
        todo = [i for i in range(n) if i % self.world == self.rank and not self.done(name, i)]
        desc = f"{self.command} {name}" + (f"[{self.rank}]" if self.world > 1 else "")
        # disable=None: no bar where stderr is not a terminal (logs, captured output), so an error there stays the
        # one line the CLI promises
        with tqdm(total=len(todo), desc=desc, unit="batch", disable=None if self.progress and todo else True) as bar:
            for i in todo:
                self.write(name, i, compute(i))
                release_freed_memory()
                bar.update(1)
        barrier(self.world)
        return (self.read(name, i) for i in range(n))

    def release(self) -> None:
        """Every rank has read the parts it needs: wait for all of them, so that rank 0 may remove the parts
        (``finish``) while the others return."""
        barrier(self.world)

    def finish(self) -> None:
        """Remove the parts (once the command's outputs are written; rank 0)."""
        self._memory.clear()
        if self.root is None or self.rank != 0:
            return
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()  # .parts, if nothing else is in it
        except OSError:
            pass
