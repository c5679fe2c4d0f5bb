"""Nothing wrong is ever written (issue 16): one run per --out, broken models stop the run, no stale
outputs beside a finished run, every numeric argument range-checked, OS errors in one line.

Models are tiny and random-init (nothing is downloaded); images are the bundled ones or made here.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from siftlens.analyze import default_images
from siftlens.cli import main
from siftlens.runguard import LOCK_NAME, OutputLock, OutputLockedError

FAST = ["--quiet", "--workers", "0", "--null-permutations", "10"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more threads only wait for each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def TINY(tmp_path_factory) -> list[str]:
    """--model arguments of a 3-layer random-init timm ViT (32 px, 8-px patches) saved as safetensors + JSON."""
    return ["--model", str(exported_tiny(tmp_path_factory.mktemp("model"), lambda p: None))]


def cli(*args) -> int:
    """main(argv) with argument errors (SystemExit from argparse) turned into their exit status."""
    try:
        return main([*map(str, args)])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def run(capsys, *args) -> tuple[int, str, list[str]]:
    rc = cli(*args)
    cap = capsys.readouterr()
    return rc, cap.out, [ln for ln in cap.err.splitlines() if ln.strip()]


def one_line_error(capsys, *args) -> str:
    rc, _, err = run(capsys, *args)
    assert rc == 2, err
    assert len(err) == 1 and ": error: " in err[0] and "Traceback" not in err[0], err
    return err[0]


def leftovers(out: Path) -> list[str]:
    """Temporary or half-written files anywhere under ``out`` (resume parts themselves are allowed)."""
    return [str(p.relative_to(out)) for p in out.rglob("*")
            if p.name.endswith((".partial", ".tmp")) or ".stale-" in p.name]


def assert_complete_analyze_output(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    per_image = pd.read_parquet(out / "per_image.parquet")
    assert len(per_image) == manifest["counts"]["rows"]
    assert len(pd.read_parquet(out / "images.parquet")) == manifest["counts"]["analysed"]
    for name in manifest["outputs"]:
        assert (out / name).is_file(), name
    assert not leftovers(out) and not (out / LOCK_NAME).exists() and not (out / ".parts").exists()
    return manifest


def png(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    Image.fromarray(np.kron(cells, np.ones((8, 8, 1), np.uint8))[: size[1], : size[0]]).save(path)
    return path


# --- 1. one run per --out ------------------------------------------------------------------------

# A process that runs `analyze` once per round when told to. Once a run is under way (it has started or
# resumed its batches, which happens after the lock is taken) it waits until the other process has
# finished its attempt of the round (at most 15 s): so the two runs always overlap, however the machine
# schedules them, and without a lock both run.
RACER = textwrap.dedent("""
    import contextlib, importlib, io, json, os, sys, time
    from pathlib import Path
    from siftlens.cli import main
    sync, me, rounds, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    args = json.loads(sys.argv[5])
    other = "b" if me == "a" else "a"
    analyze_mod = importlib.import_module("siftlens.analyze")
    start_or_resume = analyze_mod._start_or_resume
    k = 0

    def overlapping(*a, **kw):
        deadline = time.time() + 15
        while not (sync / f"result-{k}-{other}.json").exists() and time.time() < deadline:
            time.sleep(0.005)
        return start_or_resume(*a, **kw)

    analyze_mod._start_or_resume = overlapping
    (sync / f"ready-{me}").touch()
    for k in range(rounds):
        while not (sync / f"go-{k}").exists():
            time.sleep(0.002)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(["analyze", *args, "--out", out])
            except BaseException as e:  # today's code: a raw traceback
                rc, _ = 99, print(repr(e), file=err)
        # written whole, then renamed: the reader polls for the name and must never see a half-written file
        tmp = sync / f".result-{k}-{me}.tmp"
        tmp.write_text(json.dumps({"rc": rc, "err": err.getvalue()}))
        os.replace(tmp, sync / f"result-{k}-{me}.json")
""")


def test_two_concurrent_runs_on_one_out_never_both_run(tmp_path, TINY):
    """Two processes start `analyze` on the same --out at the same instant, 4 times: every time exactly
    one runs and the other is refused in one line naming the holder; the outputs are always complete.
    (Without the lock both run, every time.)"""
    sync, out, rounds = tmp_path / "sync", tmp_path / "out", 4
    sync.mkdir()
    args = [*TINY, "--batch-size", "1", *FAST, "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(sync), me, str(rounds), str(out), json.dumps(args)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for me in "ab"]
    try:
        for k in range(rounds):
            (sync / f"go-{k}").touch()
            deadline = time.time() + 60
            while not all((sync / f"result-{k}-{me}.json").exists() for me in "ab"):
                died = [p.stderr.read().decode()[-2000:] for me, p in zip("ab", procs)
                        if p.poll() is not None and not (sync / f"result-{k}-{me}.json").exists()]
                assert time.time() < deadline and not died, died
                time.sleep(0.01)
            res = {me: json.loads((sync / f"result-{k}-{me}.json").read_text()) for me in "ab"}
            assert sorted(r["rc"] for r in res.values()) == [0, 2], (k, res)
            loser = next(r for r in res.values() if r["rc"] == 2)
            err = [ln for ln in loser["err"].splitlines() if ln.strip()]
            assert len(err) == 1 and "in use by another siftlens run" in err[0], err
            assert "pid " in err[0] and socket.gethostname() in err[0]
            assert_complete_analyze_output(out)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _lock_record(**fields) -> str:
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "command": "analyze", "started": "earlier",
           "token": "someone-else"}
    rec.update(fields)
    return json.dumps(rec)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("holder", ["dead_pid", "reused_pid", "empty_file"])
def test_stale_lock_is_taken_over(tmp_path, capsys, holder, TINY):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text({"dead_pid": _lock_record(pid=_dead_pid()),
                                  "reused_pid": _lock_record(process_start="1"),  # our pid, another process
                                  "empty_file": ""}[holder])
    if holder == "empty_file":  # a creator that died before writing: taken over once it is 2 s old
        os.utime(out / LOCK_NAME, (time.time() - 10, time.time() - 10))
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--no-report", "--out", out)
    assert rc == 0, err
    assert_complete_analyze_output(out)


@pytest.mark.parametrize("holder", ["live_here", "other_host"])
def test_live_lock_refuses_in_one_line(tmp_path, capsys, holder, TINY):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from siftlens.runguard import _process_start

        rec = (_lock_record(pid=sleeper.pid, process_start=_process_start(sleeper.pid)) if holder == "live_here"
               else _lock_record(pid=_dead_pid(), host="another-machine"))
        (out / LOCK_NAME).write_text(rec)
        msg = one_line_error(capsys, "analyze", *TINY, *FAST, "--limit", "1", "--out", out)
    finally:
        sleeper.kill()
        sleeper.wait()
    pid = str(sleeper.pid) if holder == "live_here" else json.loads(rec)["pid"]
    host = socket.gethostname() if holder == "live_here" else "another-machine"
    assert f"pid {pid} on {host}" in msg and str(out / LOCK_NAME) in msg
    assert (out / LOCK_NAME).read_text() == rec  # someone else's lock is never removed
    assert not (out / "manifest.json").exists()


def test_lock_is_released_after_a_failed_run_and_is_exclusive(tmp_path, capsys, TINY):
    out = tmp_path / "out"
    msg = one_line_error(capsys, "analyze", *TINY, *FAST, "--images", tmp_path / "nothing_here", "--out", out)
    assert "nothing_here" in msg
    assert not (out / LOCK_NAME).exists()
    with OutputLock(out, "analyze"):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            OutputLock(out, "spurious").acquire()
    assert not (out / LOCK_NAME).exists()


# --- 2. non-finite weights, attention and logits --------------------------------------------------

def exported_tiny(tmp_path: Path, edit, **more) -> Path:
    """A tiny timm ViT saved as safetensors + JSON (what `siftlens pretrain` exports), after ``edit``."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 3, **more}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    with torch.no_grad():
        edit(dict(model.named_parameters()))
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "timm_arch": "vit_tiny_patch16_224", "timm_kwargs": kwargs, "input_size": [3, 32, 32],
        "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}))
    return path


def _nan_qkv(p):
    p["blocks.2.attn.qkv.weight"][0, :5] = float("nan")


def _inf_patch_embed(p):
    p["patch_embed.proj.weight"][1, 0, 0, 0] = float("inf")


def _huge_qkv(p):  # finite weights whose attention logits overflow float32: the softmax gives NaN
    p["blocks.1.attn.qkv.weight"].mul_(1e25)


def _huge_head(p):  # finite attention, logits overflow to Inf
    p["head.weight"].fill_(3e38)
    p["fc_norm.weight" if "fc_norm.weight" in p else "norm.weight"].fill_(1e10)


@pytest.mark.parametrize("edit, needles", [
    (_nan_qkv, ["parameter blocks.2.attn.qkv.weight has NaN"]),
    (_inf_patch_embed, ["parameter patch_embed.proj.weight has Inf"]),
    (_huge_qkv, ["layer 1 attention has NaN", "model weights"]),
    (_huge_head, ["model output (logits) has"]),
])
def test_non_finite_model_stops_the_run_naming_where(tmp_path, capsys, edit, needles):
    model = exported_tiny(tmp_path, edit)
    out = tmp_path / "out"
    msg = one_line_error(capsys, "analyze", "--model", model, *FAST, "--limit", "3", "--out", out)
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists() or not {"manifest.json", "per_image.parquet", "report.html"} & {
        p.name for p in out.iterdir()}


def test_finite_model_file_runs(tmp_path, capsys):
    """The control for the test above: the same exported model without the edit is analysed."""
    model = exported_tiny(tmp_path, lambda p: None)
    rc, _, err = run(capsys, "analyze", "--model", model, *FAST, "--limit", "2", "--out", tmp_path / "out")
    assert rc == 0, err


# --- 3. stale outputs ------------------------------------------------------------------------------

def test_reused_out_keeps_no_file_of_the_earlier_run(tmp_path, capsys, TINY):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "3", "--examples", "2", "--keep-full-maps", "1",
                     "--out", out)
    assert rc == 0, err
    first = assert_complete_analyze_output(out)
    assert {"report.html", "examples.npz", "attention_maps.npz"} <= set(first["outputs"])
    (out / "my_notes.txt").write_text("not siftlens's")
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--examples", "0", "--no-report",
                     "--groups", "3", "--out", out)
    assert rc == 0, err
    second = assert_complete_analyze_output(out)
    assert sorted(second["outputs"]) == ["images.parquet", "lift.npz", "manifest.json", "per_image.parquet"]
    twin = ["twin"] if second["twin"]["mode"] != "none" else []  # the random-weights twin's own run directory
    assert sorted(p.name for p in out.iterdir()) == sorted([*second["outputs"], "my_notes.txt", *twin])


def test_prompt_and_analyze_share_an_out_without_removing_each_other(tmp_path, capsys, TINY):
    out = tmp_path / "out"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        png(imgs / f"{i}.png", seed=i)
    assert run(capsys, "analyze", *TINY, *FAST, "--images", imgs, "--no-report", "--out", out)[0] == 0
    (out / "predictions.parquet").write_text("left by an old prompt run")
    rc, _, err = run(capsys, "prompt", *TINY, "--images", imgs,
                     "--labels", "none", "--out", out)
    assert rc == 0, err
    assert len(pd.read_parquet(out / "predictions.parquet")) == 3  # rewritten, not the old file
    assert json.loads((out / "summary.json").read_text())["outputs"] == ["predictions.parquet", "summary.json"]
    assert_complete_analyze_output(out)  # analyze's files are untouched by prompt


# --- 4. argument ranges ----------------------------------------------------------------------------

@pytest.mark.parametrize("command, args, flag", [
    ("analyze", ["--groups", "1000"], "--groups"),
    ("analyze", ["--groups", "1"], "--groups"),
    ("analyze", ["--limit", "-1"], "--limit"),
    ("analyze", ["--limit", "0"], "--limit"),
    ("analyze", ["--seed", "-1"], "--seed"),
    ("analyze", ["--input-size", "0", "0"], "--input-size"),
    ("analyze", ["--null-permutations", "-5"], "--null-permutations"),
    ("analyze", ["--batch-size", "0"], "--batch-size"),
    ("analyze", ["--examples", "-1"], "--examples"),
    ("analyze", ["--keep-full-maps", "-3"], "--keep-full-maps"),
    ("analyze", ["--workers", "-1"], "--workers"),
    ("analyze", ["--sift-sigma", "nan"], "--sift-sigma"),
    ("analyze", ["--sift-octave-layers", "0"], "--sift-octave-layers"),
    ("analyze", ["--sift-edge-threshold", "-inf"], "--sift-edge-threshold"),
    ("analyze", ["--limit", "two"], "--limit"),
    ("prompt", ["--images", "x", "--batch-size", "0"], "--batch-size"),
    ("prompt", ["--images", "x", "--beta", "inf"], "--beta"),
    ("spurious", ["--images", "x", "--words", "0"], "--words"),
    ("spurious", ["--images", "x", "--colour-weight", "-1"], "--colour-weight"),
    ("spurious", ["--images", "x", "--min-per-class", "0"], "--min-per-class"),
    ("pretrain", ["--data", "x", "--mask-ratio", "1"], "--mask-ratio"),
    ("pretrain", ["--data", "x", "--epochs", "0"], "--epochs"),
    ("pretrain", ["--data", "x", "--lr", "0"], "--lr"),
    ("pretrain", ["--data", "x", "--seed", "-2"], "--seed"),
])
def test_out_of_range_arguments_are_refused_at_parse_time(tmp_path, capsys, command, args, flag):
    out = tmp_path / "out"
    msg = one_line_error(capsys, command, *args, "--out", out)
    assert msg.startswith(f"siftlens {command}: error: argument {flag}"), msg
    assert not out.exists()  # refused before anything was created


def test_help_states_the_ranges(capsys):
    assert cli("analyze", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("range 2..16", "range 0..10000", "range >= 1", "range 0..4294967295"):
        assert needle in text, needle


@pytest.mark.parametrize("size, needle", [(["30", "32"], "not divisible by the patch size 16"),
                                          (["8", "32"], "smaller than one 16-px patch")])
def test_input_size_is_checked_against_the_patch_size(tmp_path, capsys, size, needle):
    out = tmp_path / "out"
    msg = one_line_error(capsys, "analyze", "--model", "timm:vit_tiny_patch16_224", "--random-init",
                         "--input-size", *size, *FAST, "--out", out)
    assert needle in msg and f"--input-size {size[0]} {size[1]}" in msg
    assert not out.exists()


def test_failed_runs_that_finished_no_batch_do_not_block_the_next(tmp_path, capsys, TINY):
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    msg = one_line_error(capsys, "analyze", *TINY, *FAST, "--images", bad, "--out", out)
    assert "no image could be analysed" in msg
    # the leftover state of a run that failed before any batch (what older versions left behind)
    (out / ".parts").mkdir(exist_ok=True)
    (out / ".parts" / "run.json").write_text(json.dumps({"model": "something else"}))
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--out", out)
    assert rc == 0, err
    assert_complete_analyze_output(out)


# --- 5. OS errors, image formats, model paths -------------------------------------------------------

def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_the_final_merge(tmp_path, capsys, monkeypatch, TINY):
    out = tmp_path / "out"

    class FullDiskWriter(pq.ParquetWriter):  # fails when writing to a file (parts are written to memory)
        def write_table(self, table, *a, **k):
            if isinstance(self.where, (str, os.PathLike)):
                _disk_full()
            return super().write_table(table, *a, **k)

    monkeypatch.setattr(pq, "ParquetWriter", FullDiskWriter)
    msg = one_line_error(capsys, "analyze", *TINY, *FAST, "--limit", "3", "--batch-size", "2", "--out", out)
    # the random-weights twin (OUT/twin) is merged first, so the first full disk may be its table
    assert (str(out / "per_image.parquet") in msg or str(out / "twin" / "per_image.parquet") in msg) \
        and "No space left on device" in msg
    assert not leftovers(out) and not (out / "per_image.parquet").exists() and not (out / "manifest.json").exists()
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "3", "--batch-size", "2", "--out", out)
    assert rc == 0, err  # resumes from the finished batches
    assert_complete_analyze_output(out)


def test_disk_full_while_writing_the_report(tmp_path, capsys, monkeypatch, TINY):
    import tempfile

    out = tmp_path / "out"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        if k.get("prefix", "").startswith(".report.html"):
            os.close(fd)
            os.unlink(name)
            _disk_full()
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    msg = one_line_error(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--out", out)
    assert str(out / "report.html") in msg and "No space left on device" in msg
    assert not leftovers(out) and not (out / "report.html").exists()
    assert not (out / "manifest.json").exists()  # no manifest without its report: not mistaken for a result
    monkeypatch.undo()
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--out", out)
    assert rc == 0, err
    assert "report.html" in assert_complete_analyze_output(out)["outputs"]


def test_formats_pillow_cannot_open_are_listed_as_skipped(tmp_path, capsys, TINY):
    from siftlens.image_source import find_images
    from siftlens.preprocess import PILLOW_SUFFIXES

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    png(imgs / "good.png")
    (imgs / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (imgs / "new.jxl").write_bytes(b"\xff\x0a" + bytes(64))
    assert {p.name for p in find_images(imgs)} == {"good.png", "phone.heic", "new.jxl"}
    if ".avif" in PILLOW_SUFFIXES:  # this Pillow decodes AVIF: such a file is analysed, not skipped
        Image.open(imgs / "good.png").save(imgs / "photo.avif")
    rc, _, err = run(capsys, "analyze", *TINY, *FAST, "--images", imgs, "--no-report", "--out", tmp_path / "out")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"phone.heic", "new.jxl"}
    assert "cannot be decoded here" in reasons["phone.heic"] and ".heic" in reasons["phone.heic"]
    assert manifest["counts"]["analysed"] == 1 + (".avif" in PILLOW_SUFFIXES)


def test_hf_path_that_does_not_exist(tmp_path, capsys):
    msg = one_line_error(capsys, "analyze", "--model", "hf:./missing_dir", "--random-init", "--out", tmp_path / "o")
    assert "hf:./missing_dir: no such folder" in msg


def test_bundled_images_are_still_found():
    assert len(list(default_images().glob("*.jpg"))) == 8


# --- 6. user errors in one line, bugs with their traceback --------------------------------------------

def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, TINY):
    import importlib

    analyze_mod = importlib.import_module("siftlens.analyze")  # the package re-exports analyze()

    def bug(*_a, **_k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(analyze_mod, "rows_from_stacked", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli("analyze", *TINY, *FAST, "--limit", "1", "--out", tmp_path / "out")
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released on any exception


@pytest.mark.parametrize("args, needle", [
    (["analyze", "--device", "nonsense"], "--device nonsense: not a device"),
    (["analyze", "--device", "cuda:7" if torch.cuda.device_count() < 8 else "mps"], "--device"),
    (["spurious", "--images", "x", "--layers", "3,x"], "argument --layers"),
])
def test_more_user_errors_are_one_line(tmp_path, capsys, args, needle):
    assert needle in one_line_error(capsys, *args, "--out", tmp_path / "out")


def test_corrupt_run_files_are_one_line_errors(tmp_path, capsys, TINY):
    run_a = tmp_path / "a"
    assert run(capsys, "analyze", *TINY, *FAST, "--limit", "2", "--no-report", "--out", run_a)[0] == 0
    run_b = tmp_path / "b"
    run_b.mkdir()
    for name in ("manifest.json", "per_image.parquet", "images.parquet", "lift.npz"):
        (run_b / name).write_bytes((run_a / name).read_bytes())
    (run_b / "images.parquet").write_bytes(b"PAR1 truncated")
    msg = one_line_error(capsys, "compare", run_a, run_b, "--out", tmp_path / "cmp")
    assert str(run_b) in msg and "not a readable" in msg
    words = tmp_path / "motifs"
    words.mkdir()
    (words / "shortcuts.json").write_bytes(b"{ not json")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    png(imgs / "0.png")
    msg = one_line_error(capsys, "prompt", *TINY, "--images", imgs, "--labels", "none", "--method", "mask_tokens",
                         "--motifs", words, "--out", tmp_path / "p")
    assert str(words) in msg and "shortcuts.json is not valid JSON" in msg


# --- the same rules for the other commands ------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["spurious", "--images", "x"], ["prompt", "--images", "x"], ["compare", "a", "b"], ["pretrain", "--data", "x"]])
def test_every_command_respects_the_lock(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, "analyze"):
        msg = one_line_error(capsys, *command, "--out", out)
    assert "in use by another siftlens run (analyze, pid" in msg


def test_pretrain_stops_on_a_non_finite_loss(tmp_path):
    from siftlens.pretrain.loop import pretrain
    from siftlens.validation import NonFiniteError

    from .test_pretrain import synthetic_npz, tiny_cfg

    npz = synthetic_npz(tmp_path / "toy.npz", n=48)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="training loss is (nan|inf)"):
        pretrain(tiny_cfg(npz, out, epochs=3, lr=1e30, warmup_epochs=0, eval_every=0, checkpoint_every=1))
    assert not (out / "encoder.safetensors").exists() and not (out / LOCK_NAME).exists()
    if (out / "checkpoint.pt").exists():  # whatever was checkpointed before the loss diverged is finite
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("option, value", [("groups", 1000), ("limit", -1), ("seed", -1), ("batch_size", 0),
                                           ("null_permutations", -5), ("keep_full_maps", -1),
                                           ("twin_images", 0)])
def test_library_callers_get_the_same_ranges(tmp_path, option, value):
    from siftlens.analyze import analyze
    from siftlens.validation import UserValueError

    with pytest.raises(UserValueError, match=f"--{option.replace('_', '-')}: {value} is out of range"):
        analyze("timm:vit_tiny_patch16_224", out=tmp_path / "out", random_init=True, **{option: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["part_parquet", "run_json"])
def test_damaged_resume_state_is_a_one_line_error(tmp_path, capsys, monkeypatch, TINY, damage):
    import importlib

    analyze_mod = importlib.import_module("siftlens.analyze")
    out = tmp_path / "out"
    args = ["analyze", *TINY, *FAST, "--limit", "3", "--batch-size", "2", "--no-report", "--out", out]
    monkeypatch.setattr(analyze_mod, "_merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli(*args) == 130  # interrupted before the merge: the parts stay
    capsys.readouterr()
    monkeypatch.undo()
    target = out / ".parts" / ("part-0000001.parquet" if damage == "part_parquet" else "run.json")
    target.write_bytes(b"damaged")
    msg = one_line_error(capsys, *args)
    assert str(out / ".parts") in msg
    assert not leftovers(out) and not (out / "manifest.json").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["spurious", "prompt"])
@pytest.mark.parametrize("edit", [_nan_qkv, _huge_qkv])
def test_spurious_and_prompt_stop_on_a_broken_model(tmp_path, capsys, command, edit):
    model = exported_tiny(tmp_path, edit)
    imgs = tmp_path / "imgs"
    for c in "ab":
        (imgs / c).mkdir(parents=True)
        for i in range(5):
            png(imgs / c / f"{i}.png", seed=i + 10 * (c == "b"))
    msg = one_line_error(capsys, command, "--model", model, "--images", imgs, "--out", tmp_path / "out")
    assert "NaN" in msg or "Inf" in msg, msg
    assert not {p.name for p in (tmp_path / "out").iterdir()} - {".siftlens.lock"}
    assert not (tmp_path / "out" / LOCK_NAME).exists()
