"""`spurious` resumes after a real kill in any pass with the numbers of an uninterrupted run, and refuses other
arguments; `flag` and `spurious` under torchrun (2 gloo processes) write what one process writes."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from siftlens.cli import main
from siftlens.resume import KILL_HOOK, RunParts
from tests.cue_model import make_data, train_cue_model
from tests.test_causal import _save_folder, _save_model

OUTPUTS = ("reliance.parquet", "motifs.csv", "occlusion_control.csv", "shortcuts.json", "manifest.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process reference (set_num_threads(1)): same numbers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scale")
    data = make_data(30, seed=0)
    lm = train_cue_model(data)
    _save_model(lm, root / "m.safetensors")
    _save_folder(root / "train", data["train"], data["y"])
    (root / "train" / "bee" / "000_broken.png").write_bytes(b"not an image")  # skipped, inside a chunk
    _save_folder(root / "new", np.concatenate([data["aligned"][:9], data["conflict"][:9], data["absent"][:9]]))
    (root / "new" / "010_broken.png").write_bytes(b"not an image")
    args = ["spurious", "--model", str(root / "m.safetensors"), "--images", str(root / "train"), "--words", "16",
            "--batch-size", "16", "--causal-images", "8"]
    assert main([*args, "--out", str(root / "ref")]) == 0
    yield root, args
    torch.set_num_threads(n)


def same_spurious(a, b):
    pd.testing.assert_frame_equal(pd.read_parquet(a / "reliance.parquet"), pd.read_parquet(b / "reliance.parquet"),
                                  check_exact=True)
    for f in OUTPUTS[1:]:
        assert (a / f).read_text() == (b / f).read_text(), f


def _cli(args, kill=None):
    env = {**ENV, KILL_HOOK: kill} if kill else ENV
    return subprocess.run([sys.executable, "-m", "siftlens", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _mtimes(d):
    return {p.name: p.stat().st_mtime_ns for p in d.glob("*.json")}


def test_spurious_killed_in_every_pass_resumes_to_the_same_outputs(setup, capsys):
    root, args = setup
    out = root / "killed"
    parts = out / ".parts" / "spurious"
    r = _cli([*args, "--out", str(out)], kill="extract:2")  # SIGKILL after the 2nd image batch
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(_mtimes(parts / "extract")) == ["000000.json", "000001.json"]
    assert not (out / "manifest.json").exists()
    first = _mtimes(parts / "extract")

    # other arguments: refused in one line naming --out and the setting; nothing already written is removed
    assert main([*args, "--words", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err and "n_words (16 there, 8 now)" in err, err
    assert _mtimes(parts / "extract") == first

    r = _cli([*args, "--out", str(out)], kill="causal:2")  # the image pass resumes, then dies in the causal one
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    extract = _mtimes(parts / "extract")
    assert {k: extract[k] for k in first} == first  # the two finished batches were read back, not redone
    assert len(extract) == 6 and len(_mtimes(parts / "causal")) == 2  # 91 files in chunks of 16
    r = _cli([*args, "--out", str(out)], kill="counterfactual:1")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _mtimes(parts / "control") and len(_mtimes(parts / "counterfactual")) == 1
    r = _cli([*args, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    same_spurious(root / "ref", out)
    assert not (out / ".parts").exists()
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["path"].endswith("000_broken.png") for s in skipped] == [True]


def test_spurious_resumed_in_process_equals_uninterrupted_and_redoes_only_what_was_unfinished(setup, monkeypatch):
    root, args = setup
    out = root / "interrupted"
    real_write, written = RunParts.write, []

    def interrupted_in_the_control_pass(self, name, i, part):
        if name == "control" and i == 1:
            raise KeyboardInterrupt  # after the control pass's first batch
        written.append((name, i))
        return real_write(self, name, i, part)

    monkeypatch.setattr(RunParts, "write", interrupted_in_the_control_pass)
    assert main([*args, "--out", str(out)]) == 130
    before = set(written)
    assert ("control", 0) in before and ("counterfactual", 0) not in before
    written.clear()
    monkeypatch.setattr(RunParts, "write", lambda self, name, i, part: (written.append((name, i)),
                                                                       real_write(self, name, i, part))[1])
    assert main([*args, "--out", str(out)]) == 0
    assert not before & set(written)  # nothing finished before the interruption was computed again
    # margin: the shortcuts' margin gains; cast_colours, cast: the colour-cast units (spurious/cast.py); together:
    # every class's units removed at once (with the dense units some class's own do not cover the others')
    assert {n for n, _ in written} == {"control", "margin", "cast_colours", "cast", "counterfactual", "together"}
    same_spurious(root / "ref", out)


def test_spurious_holds_at_most_one_batch_of_images(setup, monkeypatch):
    """Memory flat in the number of images: no pass keeps more than --batch-size decoded images alive."""
    import weakref

    from siftlens.spurious.source import PathSource

    root, args = setup
    real_load, alive, most = PathSource._load, [0], [0]

    def counted(self, p):
        x = real_load(self, p)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(x, lambda: alive.__setitem__(0, alive[0] - 1))
        return x

    monkeypatch.setattr(PathSource, "_load", counted)
    assert main([*args, "--out", str(root / "flat")]) == 0
    assert 1 <= most[0] <= 16, most  # 90 readable images, batches of 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = """import json, os, sys
from siftlens.cli import main
from siftlens.resume import RunParts
written, real_write = [], RunParts.write
def write(self, name, i, part):  # which rank computed which part (kept in out/.parts, not in memory)
    if self.root is not None:
        written.append([self.command, name, i])
    return real_write(self, name, i, part)
RunParts.write = write
for args in json.loads(sys.argv[1]):  # one process group for every command: one start-up for the test
    rc = main(args)
    if rc:
        sys.exit(rc)
open(sys.argv[2] + os.environ["RANK"], "w").write(json.dumps(written))
"""


def test_flag_prompt_and_spurious_under_torchrun_two_processes_equal_one(setup):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root, spurious = setup
    flag = ["flag", "--model", str(root / "m.safetensors"), "--motifs", str(root / "ref"), "--images",
            str(root / "new"), "--batch-size", "4", "--window", "1"]
    prompt = ["prompt", "--model", str(root / "m.safetensors"), "--motifs", str(root / "ref"), "--images",
              str(root / "new"), "--method", "random_mask", "--layers", "all", "--labels", "none", "--batch-size",
              "4", "--seed", "3", "--gate", "presence"]
    assert main([*flag, "--out", str(root / "flag1")]) == 0
    assert main([*prompt, "--out", str(root / "prompt1")]) == 0
    (root / "driver.py").write_text(DRIVER)
    cmds = [[*flag, "--out", str(root / "flag2")], [*prompt, "--out", str(root / "prompt2")],
            [*spurious, "--out", str(root / "dist")]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), str(root / "driver.py"), json.dumps(cmds), str(root / "written")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    by_rank = [{tuple(w) for w in json.loads((root / f"written{rank}").read_text())} for rank in (0, 1)]
    assert not by_rank[0] & by_rank[1]  # each part computed once, by one rank: rank r takes items r, r + 2, ...
    for rank in (0, 1):
        assert {i for c, n, i in by_rank[rank] if n == "flag"} == set(range(rank, 7, 2))
        few = {"margin", "cast", "cast_colours", "together"}
        assert {n for _, n, _ in by_rank[rank]} - few == {"flag", "prompt", "extract", "region", "region_parts",
                                                          "causal", "control", "transplant", "counterfactual"}
    # the margin gains', colour casts' and together passes are one or two batches here: a rank may take none of one
    assert few <= {n for _, n, _ in by_rank[0] | by_rank[1]}

    one, two = pd.read_parquet(root / "flag1" / "flags.parquet"), pd.read_parquet(root / "flag2" / "flags.parquet")
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    m1, m2 = (json.loads((root / d / "manifest.json").read_text()) for d in ("flag1", "flag2"))
    assert m1 == m2 and (root / "flag2" / "flags.html").is_file()
    # 28 files in 7 chunks of 4 over two ranks: each scored or skipped with its reason (one unreadable; one without
    # keypoints, skipped where the claims hold no fixed-token unit to test it by), none lost
    assert len(one) + len(m1["skipped"]) == 28 and any("010_broken" in s["path"] for s in m1["skipped"])

    one = pd.read_parquet(root / "prompt1" / "predictions.parquet")
    two = pd.read_parquet(root / "prompt2" / "predictions.parquet")
    # random draws on the images where a claimed unit's words are found (presence gate): some, so that the two runs'
    # equality below covers steered rows (9 with a token unit claimed, 5 with class 0's word:6 since the keypoint
    # colour windows were centred)
    assert len(one) == 27 and one["steered"].sum() >= 3
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    s1, s2 = (json.loads((root / d / "summary.json").read_text()) for d in ("prompt1", "prompt2"))
    assert s1 == s2

    same_spurious(root / "ref", root / "dist")
    assert not any((root / d / ".parts").exists() for d in ("flag2", "prompt2", "dist"))


def test_run_parts_progress_bar_counts_only_the_batches_left(tmp_path, capsys, monkeypatch):
    """A resumed pass shows (and computes) only the unfinished batches; no bar without ``progress``, nor where
    stderr is not a terminal (there a CLI error stays one line)."""
    from siftlens.resume import Part

    def compute(i: int) -> Part:
        return Part(arrays={"v": np.array([i])})

    quiet = RunParts(tmp_path, "flag", {"a": 1})
    assert [p.arrays["v"][0] for p in quiet.run("score", 3, compute)] == [0, 1, 2]
    assert "flag score" not in capsys.readouterr().err
    loud = RunParts(tmp_path, "flag", {"a": 1}, progress=True)
    assert [p.arrays["v"][0] for p in loud.run("score", 4, compute)] == [0, 1, 2, 3]
    assert "flag score" not in capsys.readouterr().err  # captured stderr: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    done = list(loud.run("score", 6, compute))  # 0..3 finished above: two batches left
    assert [p.arrays["v"][0] for p in done] == [0, 1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert "flag score" in err and "2/2" in err and "6/6" not in err
