"""Class folders matched to model outputs by name (siftlens.label_map) in `spurious`, `flag` and `prompt`.

A model whose outputs are named (exported label names, HF id2label, a timm ImageNet head) and whose folder
classes are not outputs 0..C-1 must be read at the folders' own outputs; a model without names (or whose names
are exactly the folders, in order) keeps the positional numbering."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from siftlens.label_map import map_labels, output_names
from siftlens.models import from_module, load_model
from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD
from siftlens.train import TrainConfig, train_classifier
from siftlens.validation import UserValueError
from tests.cue_model import CLASSES, CUE_CELLS, PATCH, SIZE, make_data

# six outputs; the folders ant, bee, cat are outputs 4, 1, 5 (by position they would be 0, 1, 2)
OUTPUT_NAMES = ["eel", "bee", "fox", "gnu", "ant", "cat"]
OUTPUT_OF = [OUTPUT_NAMES.index(c) for c in CLASSES]  # [4, 1, 5]
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888257"]
IMAGENET_INDEX = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]  # the Imagenette wnids' ImageNet-1k outputs


def _tiny_timm(num_classes: int):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                             embed_dim=32, num_heads=2, num_classes=num_classes)


def _export(module, path, label_names):
    """The model as `siftlens pretrain` exports one: safetensors + JSON (its label names included)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    meta = {"timm_arch": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": SIZE, "patch_size": PATCH, "depth": 2,
            "embed_dim": 32, "num_heads": 2, "num_classes": module.num_classes},
            "input_size": [3, SIZE, SIZE], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": None,
            "label_names": label_names}
    path.with_suffix(".json").write_text(json.dumps(meta))


def _save_folder(root, images, labels):
    for i, img in enumerate(images):
        d = root / CLASSES[labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:03d}.png")


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A 6-output model that learned the planted cues with the classes at outputs 4, 1, 5, exported with names."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    data = make_data(60, seed=0)
    torch.manual_seed(0)
    model = _tiny_timm(6)
    tc = TrainConfig(batch_size=32, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.1, augment="none", epochs=30, seed=0)
    y_out = np.asarray(OUTPUT_OF)[data["y"]]
    train_classifier(model, torch.from_numpy(data["train"]), torch.from_numpy(y_out), SIZE, IMAGENET_MEAN,
                     IMAGENET_STD, tc, log=lambda row: None)
    root = tmp_path_factory.mktemp("named")
    _export(model.eval(), root / "m.safetensors", OUTPUT_NAMES)
    _save_folder(root / "train", data["train"], data["y"])
    yield data, root
    torch.set_num_threads(n)


def _fails(args, capsys, pattern):
    """The CLI exits non-zero with one error line matching ``pattern``."""
    from siftlens.cli import main

    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert re.search(pattern, err) and len(err.splitlines()) == 1, err


def test_spurious_flag_prompt_read_the_folders_own_outputs(named, tmp_path, capsys):
    from siftlens.cli import main

    data, root = named
    model, sp = str(root / "m.safetensors"), tmp_path / "sp"
    assert main(["spurious", "--model", model, "--images", str(root / "train"), "--out", str(sp), "--words", "16",
                 "--layers", "all"]) == 0
    manifest = json.loads((sp / "manifest.json").read_text())
    assert manifest["label_map"]["matched_by"] == "name" and manifest["label_map"]["output_index"] == OUTPUT_OF
    units = pd.read_csv(sp / "motifs.csv")
    g = SIZE // PATCH
    for k, (r, c) in enumerate(CUE_CELLS):
        # the top keypoint unit (bee's cue, effect ~0.01, can be outranked by a scene-colour dense set of 0.014)
        top = units[(units["cls"] == k) & (units["family"] == "keypoint")].sort_values("causal_rank").iloc[0]
        # the cue of the class, found through its own output: read at output k (positional), "ant" and "cat"
        # would be outputs the model never predicts, and no removal could lower them by 0.1
        assert r * g + c in [int(t) for t in str(top["tokens"]).split()], (k, top)
        if OUTPUT_OF[k] != k:  # ant, cat (bee is output 1 either way; its cue is the weakest: effect ~0.01)
            assert top["causal_effect"] > 0.1 and top["causal_p"] <= 0.05, (k, top)
    rel = pd.read_parquet(sp / "reliance.parquet")
    assert (rel["label"].to_numpy() == np.asarray(OUTPUT_OF)[data["y"]]).all()  # labels as output indices
    assert (rel["pred"] == rel["label"]).mean() > 0.9 and set(rel["pred_name"]) <= set(CLASSES)
    shortcuts = json.loads((sp / "shortcuts.json").read_text())
    assert shortcuts["output_index"] == OUTPUT_OF

    # prompt on labelled test folders: accuracy against the labels' outputs (by position: ~1/3, bee only)
    test = tmp_path / "test"
    _save_folder(test, data["aligned"], data["test_y"])
    assert main(["prompt", "--model", model, "--images", str(test), "--method", "mask_tokens", "--motifs", str(sp),
                 "--layers", "all", "--out", str(tmp_path / "pr")]) == 0
    summary = json.loads((tmp_path / "pr" / "summary.json").read_text())
    assert summary["accuracy_before"] > 0.9 and summary["label_map"]["output_index"] == OUTPUT_OF

    # flag on conflicting images: predictions named by the model's outputs
    conflict = tmp_path / "conflict"
    _save_folder(conflict, data["conflict"][:30], data["test_conflict_cue"][:30])
    assert main(["flag", "--model", model, "--motifs", str(sp), "--images", str(conflict), "--out",
                 str(tmp_path / "fl"), "--occlusion", "off"]) == 0
    flags = pd.read_parquet(tmp_path / "fl" / "flags.parquet")
    cue_of = {f"{i:03d}.png": CLASSES[k] for i, k in enumerate(data["test_conflict_cue"][:30])}
    named_cue = [cue_of[p.split("/")[-1]] == name for p, name in zip(flags["path"], flags["pred_name"])]
    assert np.mean(named_cue) > 0.7  # the prediction follows the cue, and is named as that class

    # the same weights with the outputs named in another order: the motifs' classes are other outputs there
    other = tmp_path / "other.safetensors"
    import safetensors.torch

    sd = safetensors.torch.load_file(str(root / "m.safetensors"))
    safetensors.torch.save_file(sd, str(other))
    swapped = list(OUTPUT_NAMES)
    swapped[4], swapped[0] = swapped[0], swapped[4]  # "ant" is output 0 here
    meta = json.loads((root / "m.json").read_text())
    meta["label_names"] = swapped
    other.with_suffix(".json").write_text(json.dumps(meta))
    _fails(["flag", "--model", str(other), "--motifs", str(sp), "--images", str(conflict), "--out",
            str(tmp_path / "fl2")], capsys, "'ant' was model output 4 .* is output 0")
    # a motifs file from before the mapping was stored (output k assumed) on a model that names them elsewhere
    old = json.loads((sp / "shortcuts.json").read_text())
    del old["output_index"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "shortcuts.json").write_text(json.dumps(old))
    _fails(["flag", "--model", model, "--motifs", str(tmp_path / "old"), "--images", str(conflict), "--out",
            str(tmp_path / "fl3")], capsys, "from before labels were matched")


def test_some_labels_matching_is_a_one_line_error(named, tmp_path, capsys):
    data, root = named
    imgs = tmp_path / "imgs"
    _save_folder(imgs, data["train"][:12], data["y"][:12] * 0)  # all "ant"
    (imgs / "zebra").mkdir()
    for i in range(5):
        Image.fromarray(data["train"][i].transpose(1, 2, 0)).save(imgs / "zebra" / f"{i}.png")
    _fails(["spurious", "--model", str(root / "m.safetensors"), "--images", str(imgs), "--out", str(tmp_path / "sp")],
           capsys, "labels 'zebra' match no output .* 'ant' is output 4")
    _fails(["prompt", "--model", str(root / "m.safetensors"), "--images", str(imgs), "--out", str(tmp_path / "p")],
           capsys, "labels 'zebra' match no output")


def test_unnamed_model_keeps_positions_and_says_so():
    lm = from_module(_tiny_timm(6))
    m = map_labels(lm, ["zebra", "yak"], 6, "--images d")
    assert m.output_index == [0, 1] and not m.by_name
    assert "by position" in m.note and "6 outputs for 2 labels" in m.note
    assert map_labels(lm, ["a", "b", "c", "d", "e", "f"], 6).note == ""  # as many outputs as labels: nothing to say
    with pytest.raises(UserValueError, match="7 label classes, but --model"):
        map_labels(lm, list("abcdefg"), 6, "--images d")
    # names that are none of the labels (a model fine-tuned on other folders): positional too
    lm.label_names = OUTPUT_NAMES
    assert map_labels(lm, ["zebra", "yak"], 6).output_index == [0, 1]


def test_bundled_model_reads_imagenette_folders_by_wnid_or_name():
    lm = load_model("vit_tiny_imagenette")
    assert map_labels(lm, WNIDS, 10).output_index == list(range(10))  # its own order: as before
    readable = sorted(["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                       "garbage truck", "gas pump", "golf ball", "parachute"])  # sorted: not the output order
    m = map_labels(lm, readable, 10)
    assert m.by_name and [WNIDS[j] for j in m.output_index] == ["n02102040", "n03394916", "n02979186", "n03000684",
                                                                 "n03028079", "n03417042", "n03425413",
                                                                 "n03445777", "n03888257", "n01440764"]


def test_timm_imagenet_head_maps_wordnet_ids_and_descriptions():
    lm = from_module(_tiny_timm(1000))  # random init: only the head's identity matters here
    assert map_labels(lm, WNIDS, 1000).output_index == IMAGENET_INDEX
    m = map_labels(lm, ["English_springer", "tench"], 1000)  # a part of "tench, Tinca tinca", "_" for " "
    assert m.output_index == [217, 0] and m.output_name(1) == "goldfish"
    with pytest.raises(UserValueError, match="'crane' \\(outputs 134, 517\\) names more than one output"):
        map_labels(lm, ["crane", "tench"], 1000)
    with pytest.raises(UserValueError, match="'n01440764' and 'tench' both name output 0"):
        map_labels(lm, ["n01440764", "tench"], 1000)


def test_torchvision_imagenet_categories_gain_wordnet_ids():
    # a torchvision ViT loaded with --checkpoint: its architecture's default weights name the 1000 outputs
    # (metadata only, nothing is downloaded) and they are ImageNet-1k's in order, so wnids match too
    lm = SimpleNamespace(backend="torchvision", name="torchvision:vit_b_16", label_names=None, module=None)
    names = output_names(lm, 1000)
    assert names[0][0] == "tench" and "n01440764" in names[0] and "n02102040" in names[217]
    assert map_labels(lm, WNIDS, 1000).output_index == IMAGENET_INDEX


def test_hf_id2label_names_the_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64,
                                 id2label=dict(enumerate(OUTPUT_NAMES)),
                                 label2id={n: i for i, n in enumerate(OUTPUT_NAMES)})
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    lm = load_model(f"hf:{tmp_path / 'hf'}")
    assert map_labels(lm, CLASSES, 6).output_index == OUTPUT_OF
    # HF's default names (LABEL_0 ...) name nothing: positional
    cfg2 = transformers.ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, num_labels=6)
    transformers.ViTForImageClassification(cfg2).save_pretrained(tmp_path / "hf2")
    lm2 = load_model(f"hf:{tmp_path / 'hf2'}")
    assert lm2.label_names is not None and map_labels(lm2, CLASSES, 6).output_index == [0, 1, 2]


def test_hf_imagenet_head_gains_wordnet_ids(tmp_path):
    # an HF ImageNet-1k classifier's id2label holds timm's descriptions ("tench, Tinca tinca"), in ImageNet order:
    # folders named by WordNet id match too
    transformers = pytest.importorskip("transformers")
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    id2label = {j: info.index_to_description(j) for j in range(1000)}
    cfg = transformers.ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, id2label=id2label,
                                 label2id={v: k for k, v in id2label.items()})
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    lm = load_model(f"hf:{tmp_path / 'hf'}")
    assert map_labels(lm, WNIDS, 1000).output_index == IMAGENET_INDEX
    assert map_labels(lm, ["goldfish", "tench"], 1000).output_index == [1, 0]
    # "crane" is the description of outputs 134 (the bird) and 517 (the machine): their WordNet ids tell them apart
    assert map_labels(lm, ["n02012849", "n03126707"], 1000).output_index == [134, 517]


@pytest.mark.parametrize("names, why", [(["a", "b"], r"\(2 entries\) is not a list of 3 names"),
                                        ("abc", r"\(str\) is not a list of 3 names"),
                                        (["a", "b", 3], r"\(3 entries\) is not a list of 3 names")])
def test_exported_model_with_label_names_that_do_not_fit_its_outputs_is_refused(tmp_path, names, why):
    # outputs are matched to labels by these names: a list of the wrong length or type would pair them wrongly
    from siftlens.models import ModelSpecError, load_model

    path = tmp_path / "m.safetensors"
    _export(_tiny_timm(3), path, names)
    with pytest.raises(ModelSpecError, match=rf"--model {path}: m.json's label_names {why}"):
        load_model(str(path))
    _export(_tiny_timm(3), path, ["a", "b", "c"])
    assert load_model(str(path)).label_names == ["a", "b", "c"]
