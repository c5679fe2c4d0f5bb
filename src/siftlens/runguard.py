"""One run per output directory, and no stale outputs left beside a finished run.

``OutputLock(out, command)`` holds ``out/.siftlens.lock`` for the duration of a run: a JSON record of
the holder (pid, host, boot id, process start time, a random token), created with ``O_CREAT | O_EXCL`` so
that exactly one of two concurrent runs gets it. A second run is refused with a one-line error naming
the holder. A lock whose process is gone (same host, and the pid is not running, or is running but
is a newer process that reused the number, or the machine rebooted since) is taken over; a lock held
from another host cannot be checked and is refused with the instruction to delete it.

``retire_outputs`` implements the stale-output rule (docs/CHOICES.md, "Runs and output directories"):
a run of a command, when it starts writing its final outputs, removes the outputs the previous run of
the *same command* in that directory wrote (the ``outputs`` list of its record file: manifest.json of
analyze and spurious, summary.json of prompt; plus every file name the command can write); the new
record lists the files the new run wrote. Files of other commands and files siftlens did not write
are never touched.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .io import OutputDirError, ensure_writable_dir

F = TypeVar("F", bound=Callable)

LOCK_NAME = ".siftlens.lock"
# the file in which a command's run lists what it wrote ({"command": ..., "outputs": [...]})
RECORD_FILES = {"analyze": "manifest.json", "spurious": "manifest.json", "prompt": "summary.json"}

# every file each command can write into --out (removed when a later run of that command does not write it)
COMMAND_OUTPUTS: dict[str, tuple[str, ...]] = {
    "analyze": ("per_image.parquet", "images.parquet", "lift.npz", "examples.npz", "attention_maps.npz",
                "manifest.json", "report.html"),
    "spurious": ("reliance.parquet", "motifs.csv", "occlusion_control.csv", "casts.csv", "shortcut_words.npz",
                 "shortcuts.json", "spurious.html", "manifest.json"),
    "flag": ("flags.parquet", "flags.html", "manifest.json"),
    "prompt": ("predictions.parquet", "summary.json"),
    "compare": ("compare.html", "compare.csv"),
}


class OutputLockedError(OutputDirError):
    """Another run holds the output directory."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may contain spaces
    except (OSError, IndexError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class OutputLock:
    """Exclusive use of an output directory by one run (see the module docstring)."""

    def __init__(self, out: str | Path, command: str, enabled: bool = True) -> None:
        self.out, self.command, self.enabled = Path(out), command, enabled
        self.path = self.out / LOCK_NAME
        self.token: str | None = None

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                "process_start": _process_start(os.getpid()), "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}

    def _create(self) -> bool:
        """Create the lock file with our record; False if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise OutputDirError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._record()))
        except OSError as e:
            self.path.unlink(missing_ok=True)
            raise OutputDirError(f"{self.path}: cannot write the lock file ({e.strerror or e})") from None
        return True

    def _read(self, path: Path | None = None) -> dict | None:
        """The holder's record; {} while it is still being written, None if the file is gone."""
        try:
            text = (path or self.path).read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OutputDirError(f"{path or self.path}: cannot read the lock file ({e.strerror or e})") from None
        try:
            rec = json.loads(text)
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _is_stale(self, rec: dict) -> bool:
        if rec.get("host") != socket.gethostname():
            return False  # another machine's process cannot be checked from here
        boot = _boot_id()
        if boot and rec.get("boot_id") and rec["boot_id"] != boot:
            return True  # the machine restarted since: that process is gone
        pid = rec.get("pid")
        if not isinstance(pid, int) or not _pid_running(pid):
            return True
        started = rec.get("process_start")
        now = _process_start(pid)
        return bool(started and now and started != now)  # the pid was reused by a newer process

    def _take_over(self, rec: dict) -> None:
        """Remove a stale lock, unless someone else replaced it since we read it."""
        moved = self.out / f"{LOCK_NAME}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another run removed it first
        if self._read(moved) == rec:
            moved.unlink(missing_ok=True)
            return
        try:  # we moved a live lock created after our read: put it back (fails if a third run has one now)
            os.link(moved, self.path)
        except OSError:
            pass
        moved.unlink(missing_ok=True)

    def acquire(self) -> OutputLock:
        if not self.enabled:
            return self
        self.token = uuid.uuid4().hex
        empty_since = None
        for _ in range(1000):
            if self._create():
                return self
            rec = self._read()
            if rec is None:
                continue  # released between our create and read: try again
            if not rec:  # being written by its creator right now, or left empty by a crash
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since < 2.0:
                    time.sleep(0.02)
                    continue
                rec = self._read() or {}
                if not rec:
                    self._take_over({})
                    continue
            if self._is_stale(rec):
                self._take_over(rec)
                continue
            raise OutputLockedError(
                f"--out {self.out}: in use by another siftlens run ({rec.get('command', '?')}, pid "
                f"{rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}); wait for "
                f"it to finish or use another --out (if that process is gone, delete {self.path})")
        raise OutputLockedError(f"--out {self.out}: could not take the lock {self.path}")

    def release(self) -> None:
        if not self.enabled or self.token is None:
            return
        try:
            rec = self._read()
            if rec and rec.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock we cannot remove is stale after we exit and is taken over then
        self.token = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- stale outputs ---------------------------------------------------------------------------------

def previous_outputs(out: Path, command: str) -> list[str]:
    """The files the previous run of ``command`` in ``out`` listed as its own."""
    name = RECORD_FILES.get(command)
    try:
        rec = json.loads((out / name).read_text()) if name else {}
    except (OSError, ValueError):
        return []
    if not isinstance(rec, dict) or rec.get("command") != command or not isinstance(rec.get("outputs"), list):
        return []
    return rec["outputs"]


def retire_outputs(out: str | Path, command: str) -> list[str]:
    """Remove the outputs of the previous run of ``command`` in ``out`` (before this run writes its own).

    Called while holding the lock, right before the final outputs are written: from then on nothing
    in ``out`` can be mistaken for the previous result, and a failed run leaves no mixture of old and new.
    Returns the names removed.
    """
    out = Path(out)
    previous = previous_outputs(out, command)
    removed = []
    for name in dict.fromkeys([*previous, *COMMAND_OUTPUTS.get(command, ())]):
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            continue  # only plain file names in out itself, never a path elsewhere
        path = out / name
        try:
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
        except OSError as e:
            raise OutputDirError(f"{path}: cannot remove the previous run's output ({e.strerror or e})") from None
    return removed


def holds_out_lock(command: str) -> Callable[[F], F]:
    """Decorate a command's entry point whose parameter ``out`` is its output directory: the directory is
    created (or checked writable) and locked for the whole call."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            out = ensure_writable_dir(bound.arguments["out"])
            with OutputLock(out, command):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
