"""Resume after a crash, and a 2-process torchrun (gloo) run, both equal an uninterrupted run."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from siftlens.analyze import analyze, default_images
from siftlens.cli import main

analyze_mod = importlib.import_module("siftlens.analyze")  # the package re-exports analyze()

# a small random-init timm ViT on the bundled images; nothing is downloaded
ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--input-size", "96", "96", "--batch-size", "2",
        "--null-permutations", "50", "--quiet", "--no-report", "--twin", "none"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["analyze", *ARGS, "--workers", "0", "--out", str(out)]) == 0
    return out


def same_outputs(a, b):
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_image.parquet"), pd.read_parquet(b / "per_image.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "images.parquet"), pd.read_parquet(b / "images.parquet"))
    la, lb = np.load(a / "lift.npz"), np.load(b / "lift.npz")
    np.testing.assert_allclose(la["obs"], lb["obs"], rtol=1e-12)
    np.testing.assert_allclose(la["exp"], lb["exp"], rtol=1e-12)
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["counts"] == mb["counts"]


def test_resume_after_crash_equals_uninterrupted(reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write, written = analyze_mod._write_part, []

    def crash_after_two(parts, b, part):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        real_write(parts, b, part)
        written.append(b)

    monkeypatch.setattr(analyze_mod, "_write_part", crash_after_two)
    assert main(["analyze", *ARGS, "--workers", "0", "--out", str(out)]) == 130  # interrupted
    assert not (out / "per_image.parquet").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(analyze_mod, "_write_part", real_write)

    done = []
    monkeypatch.setattr(analyze_mod.BatchRunner, "run", _spy(analyze_mod.BatchRunner.run, done))
    assert main(["analyze", *ARGS, "--workers", "0", "--out", str(out)]) == 0
    n_batches = -(-len(list(default_images().glob("*.jpg"))) // 2)
    assert len(done) == n_batches - 2  # the two finished batches were not recomputed
    same_outputs(reference, out)
    assert not (out / ".parts").exists()


def _spy(fn, calls):
    def wrapped(self, *a, **k):
        calls.append(1)
        return fn(self, *a, **k)

    return wrapped


def test_kill_9_then_resume(reference, tmp_path):
    out = tmp_path / "out"
    # the twin (after the main batches, excluded from the resume fingerprint) keeps the process alive long
    # enough after its first finished part for the kill to land mid-run
    cmd = [sys.executable, "-m", "siftlens", "analyze", *ARGS, "--workers", "0", "--out", str(out),
           "--twin", "random-init"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".parts").glob("part-*.json")) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a part was written: nothing was killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert list((out / ".parts").glob("part-*.json")) and not (out / "manifest.json").exists()  # killed mid-run
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    same_outputs(reference, out)


def test_resume_refuses_different_options(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(analyze_mod, "_merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        analyze("timm:vit_tiny_patch16_224", out=out, random_init=True, input_size=(96, 96), workers=0,
                progress=False, report=False, limit=2, null_permutations=10)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="different options"):
        analyze("timm:vit_tiny_patch16_224", out=out, random_init=True, input_size=(96, 96), workers=0,
                progress=False, report=False, limit=2, null_permutations=10, map_mode="point")


def test_torchrun_two_processes_equals_one(reference, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "siftlens", "analyze", *ARGS, "--workers", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    same_outputs(reference, out)
