"""Bad input to `spurious`, `flag`, `prompt` and `pretrain`, from a sweep with broken files (the `analyze` suite is
tests/test_bad_inputs.py): edited shortcuts.json fields, an exported model's JSON that cannot be applied, labels
CSVs with blank or conflicting rows, one class, broken .npz / tar / checkpoint files. Each gives one line naming the
input and the cause (exit 2, no traceback) where it crashed, or silently did something else, before.
Tiny random-init models and files built here; nothing downloads."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from siftlens.cli import main
from tests.bad_files import blocks
from tests.test_shortcut_models import _fails, _model

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-block exported ViT (3 classes, 4 x 4 grid), 3 x 3 labelled images, 3 new ones, and a hand-made
    shortcuts.json with one token unit that `flag` accepts."""
    from tests.cue_model import CLASSES, make_data

    tmp = tmp_path_factory.mktemp("bad_shortcuts")
    data = make_data(3, seed=1)
    for i, img in enumerate(data["train"]):
        d = tmp / "train" / CLASSES[data["y"][i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i}.png")
    (tmp / "new").mkdir()
    for i, img in enumerate(data["conflict"][:3]):
        Image.fromarray(img.transpose(1, 2, 0)).save(tmp / "new" / f"{i}.png")
    model = _model(tmp, "m")
    rng = np.random.default_rng(0)
    shortcuts = {
        "format": "siftlens.shortcuts", "format_version": None,
        "model": {"name": model, "input_size": [32, 32], "patch_size": 8, "grid": [4, 4], "num_classes": 3,
                  "num_layers": 2, "prefix_tokens": ["cls"]},
        "class_names": list(CLASSES), "layers": [0, 1], "descriptor_weights": [1.0, 0.5],
        "centroids": rng.random((4, 133)).round(3).tolist(), "output_index": [0, 1, 2],
        "units": [{"cls": 0, "class_name": "ant", "unit": "token:1,1", "kind": "token", "word": 2, "tokens": [5],
                   "gate_words": [2], "causal_effect": 0.2, "causal_p": 0.01, "box": [0.25, 0.25, 0.5, 0.5],
                   "gate_box": [0.25, 0.25, 0.5, 0.5]}]}
    from siftlens.spurious.causal import FORMAT, FORMAT_VERSION

    shortcuts["format"], shortcuts["format_version"] = FORMAT, FORMAT_VERSION
    (tmp / "ok").mkdir()
    (tmp / "ok" / "shortcuts.json").write_text(json.dumps(shortcuts))
    assert main(["flag", "--model", model, "--motifs", str(tmp / "ok"), "--images", str(tmp / "new"), "--out",
                 str(tmp / "fl_ok"), "--occlusion", "off"]) == 0  # the file is valid as made
    return tmp, model, shortcuts


def _edit(units=None, **top):
    def f(d):
        if units is not None:
            d["units"] = [{**d["units"][0], **units}]
        d.update(top)
    return f


@pytest.mark.parametrize("edit, words", [
    (_edit(units={"tokens": [5, 16]}), ["tokens [5, 16]", "4x4 grid"]),  # IndexError before
    (_edit(units={"tokens": [-1]}), ["tokens [-1]", "4x4 grid"]),  # silently masked token 15 before
    (_edit(units={"tokens": [1.5]}), ["tokens [1.5]"]),
    (_edit(units={"kind": "word", "word": 9, "gate_words": [9]}), ["word 9", "4 centroids"]),  # never matched before
    (_edit(units={"cls": 7}), ["cls 7", "below 3"]),  # silently flagged no class before
    (_edit(units={"box": [0.1], "gate_box": [0.1], "kind": "word"}), ["box [0.1]"]),
    (_edit(units={"margin_gain": "big"}), ["margin_gain 'big'", "finite number"]),  # TypeError in flag before
    (_edit(units={"together_gain": [0.5]}), ["together_gain [0.5]", "finite number"]),
    (_edit(centroids=[[0.0, 1.0]] * 4), ["centroids of shape [4, 2]", "133"]),  # scipy ValueError before
    (_edit(descriptor_weights=[1.0]), ["descriptor_weights [1.0]"]),
    (lambda d: d.update(units="abc"), ["units that are not a list"]),
    (_edit(layers=[-9]), ["layers [-9]", "2 attention layers"]),
], ids=["token_off_grid", "token_negative", "token_float", "word_off_centroids", "cls", "box", "margin_gain",
        "together_gain", "centroid_width", "descriptor_weights", "units_str", "layer"])
def test_an_edited_shortcuts_file_is_refused_naming_the_field(setup, tmp_path, capsys, edit, words):
    tmp, model, shortcuts = setup
    d = json.loads(json.dumps(shortcuts))
    edit(d)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "shortcuts.json").write_text(json.dumps(d))
    for argv in (["flag", "--model", model, "--motifs", str(tmp_path / "m"), "--images", str(tmp / "new"),
                  "--out", str(tmp_path / "fl")],
                 ["prompt", "--model", model, "--motifs", str(tmp_path / "m"), "--method", "mask_tokens", "--images",
                  str(tmp / "new"), "--labels", "none", "--out", str(tmp_path / "pr")]):
        _fails(capsys, argv, "--motifs", str(tmp_path / "m"), "shortcuts.json", *words)
    assert not (tmp_path / "fl" / "flags.parquet").exists()


@pytest.mark.parametrize("field, value, words", [
    ("input_size", [3, 30, 30], ["input_size [3, 30, 30]", "does not fit"]),  # timm AssertionError before
    ("input_size", "abc", ["input_size 'abc'"]),
    ("mean", [0.5], ["mean [0.5]"]),
    ("std", [0, 0, 0], ["std [0, 0, 0]"]),
    ("interpolation", "magic", ["interpolation 'magic'"]),
])
def test_an_exported_model_whose_json_cannot_be_applied_is_refused(setup, tmp_path, capsys, field, value, words):
    import shutil

    tmp, model, _ = setup
    path = tmp_path / "e.safetensors"
    shutil.copy(model, path)
    meta = json.loads((tmp / "m.json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, field: value}))
    for argv in (["spurious", "--model", str(path), "--images", str(tmp / "train"), "--out", str(tmp_path / "s")],
                 ["prompt", "--model", str(path), "--images", str(tmp / "new"), "--labels", "none", "--out",
                  str(tmp_path / "p")]):
        _fails(capsys, argv, "--model", str(path), "e.json", *words)


def _flat_with_csv(tmp, tmp_path, rows_extra: str = "", blank_first: bool = False) -> tuple[str, str]:
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["path,label"]
    for i, p in enumerate(sorted((tmp / "train").rglob("*.png"))):
        q = flat / f"{p.parent.name}_{p.name}"
        shutil.copy(p, q)
        lines.append(f"{q},{'' if blank_first and i == 0 else p.parent.name}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n" + rows_extra)
    return str(flat), str(csv)


def test_labels_csv_with_a_blank_or_conflicting_row_is_refused(setup, tmp_path, capsys):
    tmp, model, _ = setup
    flat, csv = _flat_with_csv(tmp, tmp_path, blank_first=True)  # before: a class named "nan"
    for cmd in ("spurious", "prompt"):
        _fails(capsys, [cmd, "--model", model, "--images", flat, "--labels", csv, "--out", str(tmp_path / cmd)],
               "--labels", csv, "empty path or label", "row 2")
    (tmp_path / "flat2").mkdir()
    flat, csv = _flat_with_csv(tmp, tmp_path / "flat2")
    first = sorted((tmp_path / "flat2" / "flat").glob("ant_*.png"))[0]
    with open(csv, "a") as f:
        f.write(f"{first},cat\n")  # before: the later row won
    _fails(capsys, ["spurious", "--model", model, "--images", flat, "--labels", csv, "--out", str(tmp_path / "s")],
           "--labels", "two labels", first.name)
    _fails(capsys, ["prompt", "--model", model, "--images", flat, "--labels", str(tmp_path / "absent.csv"), "--out",
                    str(tmp_path / "p")], "--labels", "absent.csv", "no such file")


def test_labels_matched_by_a_file_name_that_has_two_labels_are_refused(setup, tmp_path, capsys):
    tmp, model, _ = setup
    flat, csv = _flat_with_csv(tmp, tmp_path)
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    rows = [ln.split(",") for ln in lines[1:]]
    # the CSV names the files by another folder, twice with other labels: by name, the label is ambiguous
    text = "path,label\n" + "".join(f"elsewhere/{p.split('/')[-1]},{lab}\n" for p, lab in rows)
    name = rows[0][0].split("/")[-1]
    (tmp_path / "amb.csv").write_text(text + f"other/{name},bee\n")
    _fails(capsys, ["spurious", "--model", model, "--images", flat, "--labels", str(tmp_path / "amb.csv"), "--out",
                    str(tmp_path / "s")], "--labels", "two labels", name)


def test_spurious_on_one_class_says_it_needs_two(setup, tmp_path, capsys):
    import shutil

    tmp, model, _ = setup
    shutil.copytree(tmp / "train" / "ant", tmp_path / "one" / "ant")
    _fails(capsys, ["spurious", "--model", model, "--images", str(tmp_path / "one"), "--out", str(tmp_path / "s"),
                    "--min-per-class", "1"], "--images", "one class (ant)", "at least two")  # KeyError before


# --- pretrain ------------------------------------------------------------------------------------------------

PRETRAIN = ["--img-size", "16", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--heads", "2",
            "--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2", "--epochs", "1", "--batch-size",
            "4", "--stored-size", "16", "--quiet", "--probe-train-limit", "8"]


def _pretrain(data, out, *extra) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), *PRETRAIN, *map(str, extra)]


@pytest.mark.parametrize("arrays, words", [
    (dict(labels=np.arange(24) % 3 + 0.5), ["'labels'", "float64"]),  # RuntimeError in the kNN probe before
    (dict(labels=np.stack([np.arange(24) % 3] * 2, 1)), ["'labels'", "[24, 2]"]),
    (dict(labels=np.arange(24) % 3 - 5), ["'labels'", "minimum -5"]),
    (dict(labels=np.array([f"c{i % 3}" for i in range(24)])), ["'labels'", "<U2"]),
    (dict(labels=np.arange(24) % 3, val_images=np.zeros((6, 16, 16, 3), np.uint8), val_labels=np.arange(6) + 10),
     ["'val_labels' has classes not in 'labels'", "[10, 11"]),  # probes scored against unseen classes before
    (dict(labels=np.arange(24) % 3, val_images=np.zeros((6, 16, 16, 3), np.uint8)),
     ["'val_images' but no 'val_labels'"]),  # the held-out split was ignored without a word before
    (dict(labels=np.arange(24) % 3, val_labels=np.arange(6) % 3), ["'val_labels' but no 'val_images'"]),
], ids=["float", "2d", "negative", "str", "val_unknown", "val_images_alone", "val_labels_alone"])
def test_pretrain_npz_labels_that_are_not_class_indices_are_refused(tmp_path, capsys, arrays, words):
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, **arrays)
    _fails(capsys, _pretrain(tmp_path / "d.npz", tmp_path / "o"), "--data", "d.npz", *words)


def test_pretrain_unreadable_npz_is_one_line(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "good.npz", images=images)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:3000])
    (tmp_path / "zero.npz").write_bytes(b"")
    np.savez(tmp_path / "obj.npz", images=np.array([images[0], images[1][:8]], dtype=object))
    for name, why in (("cut", "BadZipFile"), ("zero", "EOFError"), ("obj", "Object arrays")):  # tracebacks before
        _fails(capsys, _pretrain(tmp_path / f"{name}.npz", tmp_path / "o"), "--data", f"{name}.npz", why)


def _class_folder(root, classes, n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(blocks(20, 20, seed=i + 10 * len(c))).save(root / c / f"{i}.png")
    return root


def test_pretrain_tar_cut_between_members_is_refused(tmp_path, capsys):
    """tarfile ends the member list silently where a truncated archive stops between two members: before, the run
    trained on the first few images and said nothing."""
    _class_folder(tmp_path / "d", ["a", "b"])
    with tarfile.open(tmp_path / "d.tar", "w") as tf:
        tf.add(tmp_path / "d", arcname="d")
    with tarfile.open(tmp_path / "d.tar") as tf:
        m = [m for m in tf.getmembers() if m.isfile()][3]
    raw = (tmp_path / "d.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:m.offset_data + -(-m.size // 512) * 512])  # after a member's last block
    _fails(capsys, _pretrain(tmp_path / "cut.tar", tmp_path / "o", "--cache-dir", tmp_path / "c"),
           "--data", "cut.tar", "truncated archive")
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith("extract")]  # nothing half-extracted kept
    capsys.readouterr()
    assert main(_pretrain(tmp_path / "d.tar", tmp_path / "o2", "--cache-dir", tmp_path / "c")) == 0  # whole: fine


def test_pretrain_folder_with_a_cache_dir_that_does_not_exist_yet(tmp_path, capsys):
    """Before: 'cannot write output' for the decoded-images cache (only an archive's extraction made the folder)."""
    _class_folder(tmp_path / "two", ["a", "b"])
    assert main(_pretrain(tmp_path / "two", tmp_path / "o", "--cache-dir", tmp_path / "new" / "cache")) == 0
    assert list((tmp_path / "new" / "cache").glob("decoded-two-*.npz"))


def test_pretrain_on_one_class_reports_no_probe_accuracy(tmp_path, capsys):
    """Before: kNN and linear accuracies of 1.0 on one class (every probe right by construction)."""
    import pandas as pd

    _class_folder(tmp_path / "one", ["a"], n=12)
    capsys.readouterr()
    assert main(_pretrain(tmp_path / "one", tmp_path / "o")) == 0
    assert "one class (a)" in capsys.readouterr().out
    log = pd.read_csv(tmp_path / "o" / "log.csv")
    assert "knn_acc" not in log.columns or log["knn_acc"].isna().all()


def test_pretrain_resume_from_a_checkpoint_of_another_shape_is_one_line(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(24) % 3)
    out = tmp_path / "o"
    assert main(_pretrain(tmp_path / "d.npz", out)) == 0
    ck = out / "checkpoint.pt"
    good = torch.load(ck, weights_only=True)
    for _case, obj, words in (
            ("list", [1, 2], ["lacks config, model, optimizer, state"]),
            ("no_optimizer", {k: v for k, v in good.items() if k != "optimizer"}, ["lacks optimizer"]),
            ("state", {**good, "state": {}}, ["lacks state.step"]),
            ("shapes", {**good, "model": {k: v[..., :1] for k, v in good["model"].items()}}, ["size mismatch"])):
        torch.save(obj, ck)  # KeyError / TypeError / RuntimeError tracebacks before
        _fails(capsys, _pretrain(tmp_path / "d.npz", out), "checkpoint.pt", *words)


def test_prompt_grow_without_the_counterfactual_gate_is_refused(setup, tmp_path, capsys):
    tmp, model, _ = setup
    argv = ["prompt", "--model", model, "--motifs", str(tmp / "ok"), "--method", "mask_tokens", "--images",
            str(tmp / "new"), "--labels", "none", "--out", str(tmp_path / "pr"), "--grow", "2", "--gate", "presence"]
    _fails(capsys, argv, "--grow 2", "--gate counterfactual", "--gate presence")
    assert not (tmp_path / "pr" / "predictions.parquet").exists()


@pytest.mark.parametrize("option, value, words", [
    ("--gate-min-drop", "1.5", ["--gate-min-drop", "[0, 1]", "1.5"]),
    ("--gate-min-drop", "-0.1", ["--gate-min-drop", "[0, 1]"]),
    ("--margin", "-1", ["--margin", "out of range"]),
    ("--grow", "-2", ["--grow", "out of range"]),
])
def test_prompt_gate_options_out_of_range_are_refused(setup, tmp_path, capsys, option, value, words):
    tmp, model, _ = setup
    argv = ["prompt", "--model", model, "--motifs", str(tmp / "ok"), "--method", "mask_tokens", "--images",
            str(tmp / "new"), "--labels", "none", "--out", str(tmp_path / "pr"), option, value]
    if option in ("--margin", "--grow"):  # refused by argparse's type (non_negative_int): usage error, exit 2
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), err
    else:
        _fails(capsys, argv, *words)
    assert not (tmp_path / "pr" / "predictions.parquet").exists()
