"""Property (issue 16): whatever the arguments and images, `siftlens analyze` either exits 0 with
complete, readable outputs, or exits 2 with a one-line message, and never leaves a traceback, a
temporary file or its lock behind.

Random argument combinations (valid and out-of-range values) and random small images (sizes from
1 px, several modes, formats, empty and corrupt files) are fed to the CLI's main() in-process with a
tiny random-init model. Deterministic by default (derandomize) so that CI is reproducible; run more
examples with SIFTLENS_HYPOTHESIS_EXAMPLES=500.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from siftlens.cli import main
from siftlens.runguard import LOCK_NAME

from .test_run_safety import exported_tiny

N_EXAMPLES = int(os.environ.get("SIFTLENS_HYPOTHESIS_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def tiny_model_args(tmp_path_factory) -> list[str]:
    # dynamic_img_size: any --input-size that is a whole number of patches is accepted
    return ["--model", str(exported_tiny(tmp_path_factory.mktemp("model"), lambda p: None, dynamic_img_size=True))]


def _image_bytes(kind: str, w: int, h: int, mode: str, seed: int, fmt: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "garbage":
        return np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    img = img.convert(mode) if mode != "RGB" else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


images = st.lists(st.tuples(
    st.sampled_from(["ok", "ok", "ok", "ok", "ok", "empty", "garbage", "truncated"]),
    st.one_of(st.integers(8, 80), st.integers(1, 7)), st.integers(8, 80),
    st.sampled_from(["RGB", "L", "RGBA", "P"]),
    st.integers(0, 2**16),
    st.sampled_from([("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("PNG", ".heic")]),
), min_size=1, max_size=4)

# each option: absent or a valid value; then at most one option replaced by a value outside its range
VALID = {
    "--groups": st.integers(2, 16),
    "--limit": st.integers(1, 5),
    "--seed": st.sampled_from([0, 1, 2**32 - 1]),
    "--null-permutations": st.integers(0, 30),
    "--batch-size": st.integers(1, 4),
    "--examples": st.integers(0, 5),
    "--keep-full-maps": st.integers(0, 3),
    "--input-size": st.tuples(st.sampled_from([8, 16, 24, 32, 40]), st.sampled_from([8, 16, 32])),
    "--map-mode": st.sampled_from(["footprint", "point"]),
    "--weight": st.sampled_from(["response", "unit"]),
    "--null-mode": st.sampled_from(["permute", "shift"]),
    "--sift-sigma": st.sampled_from(["1.6", "0.5", "3"]),
    "--sift-contrast-threshold": st.sampled_from(["0.04", "0", "1e9"]),
    "--sift-nfeatures": st.sampled_from([0, 3]),
    "--no-report": st.booleans(),
}
INVALID = st.sampled_from([
    ("--groups", 1), ("--groups", 1000), ("--limit", 0), ("--limit", -1), ("--seed", -1), ("--seed", 2**32),
    ("--null-permutations", -5), ("--batch-size", 0), ("--examples", -1), ("--keep-full-maps", -1),
    ("--input-size", (0, 0)), ("--input-size", (12, 16)), ("--input-size", (4, 32)), ("--map-mode", "bogus"),
    ("--sift-sigma", "nan"), ("--sift-sigma", "0"), ("--sift-contrast-threshold", "inf"), ("--sift-nfeatures", -4),
])
options = st.tuples(st.fixed_dictionaries({}, optional=VALID),
                    st.one_of(st.none(), st.none(), st.none(), INVALID)).map(
    lambda t: {**t[0], **({t[1][0]: t[1][1]} if t[1] else {})})


def _argv(opts: dict) -> list[str]:
    argv = []
    for flag, value in opts.items():
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _check_outputs(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    per_image = pd.read_parquet(out / "per_image.parquet")
    assert len(per_image) == manifest["counts"]["rows"] > 0
    assert len(pd.read_parquet(out / "images.parquet")) == manifest["counts"]["analysed"]
    for name in manifest["outputs"]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".npz"):
            with np.load(path) as z:
                assert z.files
    assert not (out / LOCK_NAME).exists() and not (out / ".parts").exists()


@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(imgs=images, opts=options)
def test_analyze_writes_complete_outputs_or_one_line_error(tiny_model_args, capsys, imgs, opts):
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "imgs"
        d.mkdir()
        for i, (kind, w, h, mode, seed, (fmt, suffix)) in enumerate(imgs):
            if fmt == "JPEG" and mode in ("RGBA", "P"):
                mode = "RGB"
            (d / f"img{i}{suffix}").write_bytes(_image_bytes(kind, w, h, mode, seed, fmt))
        out = Path(tmp) / "out"
        argv = ["analyze", *tiny_model_args, "--images", str(d), "--out", str(out), "--quiet", "--workers", "0",
                *_argv(opts)]
        if "--null-permutations" not in opts:
            argv += ["--null-permutations", "10"]
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: an argument error, already printed in one line
            rc = e.code
        finally:
            torch.set_num_threads(old_threads)
        cap = capsys.readouterr()
        err = [ln for ln in cap.err.splitlines() if ln.strip()]
        assert "Traceback" not in cap.err, (argv, cap.err)
        assert rc in (0, 2), (argv, rc, err)
        event(f"exit {rc}" + (": argument error" if rc == 2 and ": error: argument " in err[0] else ""))
        if rc == 2:
            assert len(err) == 1 and err[0].startswith("siftlens analyze: error: "), (argv, err)
            assert not (out / "manifest.json").exists()
        else:
            _check_outputs(out)
        if out.exists():
            stray = [p.name for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
            assert not stray and not (out / LOCK_NAME).exists(), (argv, stray)
