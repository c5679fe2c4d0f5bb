"""`spurious` / `flag` / `prompt` on model shapes other than the tiny CLS ViT of tests/cue_model.py: models that
pool their patch tokens, no CLS token, deeper saved models, motifs from another model, headless models.
Tiny random-init (or seconds-trained) models built here; nothing downloads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from siftlens.cli import main
from siftlens.models import from_module
from siftlens.prompting import SteeredViT

timm = pytest.importorskip("timm")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2, depth=2, num_classes=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kw", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False),
                                dict(global_pool="max", class_token=False), dict(global_pool="token"),
                                dict(global_pool="avg", reg_tokens=2), dict(global_pool="map", class_token=False)])
def test_a_masked_token_is_removed_from_the_prediction_whatever_the_pooling(kw):
    """Masked in every layer, a token's content must not reach the prediction. Key masking alone leaves it in an
    average over the final patch tokens (the token's own output is pooled), so for pooled models it must also be
    taken out of the pool."""
    torch.manual_seed(0)
    lm = from_module(timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}))
    x = torch.randn(2, 3, 32, 32)
    changed = x.clone()
    changed[:, :, 8:16, 8:16] = torch.randn(2, 3, 8, 8) * 3  # token (1, 1) = patch index 5 on the 4 x 4 grid
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True
    with torch.no_grad():
        assert not torch.allclose(lm.forward(x), lm.forward(changed), atol=1e-4)  # the token matters unmasked
        with SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=lambda _: mask) as steered:
            assert torch.allclose(steered(x), steered(changed), atol=1e-5)


# --- the CLI chain with models and motifs that do not fit ----------------------------------------------------


def _export(model, kw: dict, path) -> str:
    """Save a timm model as `siftlens pretrain` exports one (safetensors + JSON of how to build it)."""
    from safetensors.torch import save_file

    from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "timm_arch": "vit_tiny_patch16_224", "timm_kwargs": kw, "input_size": [3, 32, 32], "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD), "crop_pct": None}))
    return str(path)


def _model(tmp, name: str, seed: int = 0, **kw) -> str:
    torch.manual_seed(seed)
    kw = {**TINY, **kw}
    return _export(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw), kw, tmp / f"{name}.safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `spurious` run of a 3-block random-init ViT on 3 x 5 planted-cue images, and a folder of new images."""
    from tests.cue_model import CLASSES, make_data

    tmp = tmp_path_factory.mktemp("shortcut_models")
    data = make_data(6, seed=3)
    for folder, images, labels in (("train", data["train"], data["y"]), ("new", data["conflict"], None)):
        for i, img in enumerate(images):
            d = tmp / folder / (CLASSES[labels[i]] if labels is not None else "")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:03d}.png")
    model = _model(tmp, "d3", depth=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["spurious", "--model", model, "--images", str(tmp / "train"), "--out", str(tmp / "sp"),
                 "--words", "8", "--layers", "all", "--causal-images", "6", "--region-images", "0"]) == 0
    torch.set_num_threads(threads)
    return tmp, model


def _fails(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("siftlens ")]  # not a library's progress bar
    assert len(ours) == 1 and "Traceback" not in err, err
    err = ours[0]
    for w in words:
        assert w in err, err
    return err


def test_flag_refuses_motifs_from_a_model_of_another_depth_or_token_layout(run, tmp_path, capsys):
    tmp, _ = run
    sp = str(tmp / "sp")
    assert json.loads((tmp / "sp" / "shortcuts.json").read_text())["model"]["num_layers"] == 3
    out = tmp_path / "fl"
    out.mkdir()
    (out / "flags.parquet").write_bytes(b"an earlier run's output")
    for name, kw, why in (("d2", dict(depth=2), "3 attention layers"), ("d4", dict(depth=4), "3 attention layers"),
                          ("reg", dict(depth=3, reg_tokens=2), "prefix tokens")):
        model = _model(tmp_path, name, **kw)  # same input size, patch, grid and classes: only the model differs
        _fails(capsys, ["flag", "--model", model, "--motifs", sp, "--images", str(tmp / "new"), "--out", str(out)],
               "--motifs", why, "motifs from another model")
        _fails(capsys, ["prompt", "--model", model, "--motifs", sp, "--method", "mask_tokens", "--images",
                        str(tmp / "new"), "--labels", "none", "--out", str(tmp_path / "pr")],
               "motifs from another model")
    assert (out / "flags.parquet").read_bytes() == b"an earlier run's output"  # nothing written is lost

    # a file from before num_layers was stored: the layers it masks must exist in the model
    old = json.loads((tmp / "sp" / "shortcuts.json").read_text())
    for key in ("num_layers", "prefix_tokens"):
        del old["model"][key]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "shortcuts.json").write_text(json.dumps(old))
    _fails(capsys, ["flag", "--model", _model(tmp_path, "d2"), "--motifs", str(tmp_path / "old"), "--images",
                    str(tmp / "new"), "--out", str(out)], "at least 3 attention layers", "motifs from another model")


def test_flag_refuses_motifs_from_the_same_architecture_with_other_weights(run, tmp_path, capsys):
    """Depth, grid, prefix tokens and classes all match; only the weights differ (another seed, or another
    fine-tuning of the same architecture): the stored output probe tells them apart."""
    tmp, model = run
    sp = str(tmp / "sp")
    assert len(json.loads((tmp / "sp" / "shortcuts.json").read_text())["model"]["output_probe"]) == TINY["num_classes"]
    other = _model(tmp_path, "d3_seed1", seed=1, depth=3)
    _fails(capsys, ["flag", "--model", other, "--motifs", sp, "--images", str(tmp / "new"), "--out",
                    str(tmp_path / "fl")], "--motifs", "other weights", "motifs from another model")
    _fails(capsys, ["prompt", "--model", other, "--motifs", sp, "--method", "mask_tokens", "--images",
                    str(tmp / "new"), "--labels", "none", "--out", str(tmp_path / "pr")], "other weights")
    # the same weights under another file name pass the check
    import shutil

    copy = tmp_path / "renamed.safetensors"
    shutil.copy(model, copy)
    shutil.copy(model.replace(".safetensors", ".json"), copy.with_suffix(".json"))
    capsys.readouterr()
    assert main(["flag", "--model", str(copy), "--motifs", sp, "--images", str(tmp / "new"), "--out",
                 str(tmp_path / "ok")]) == 0


@pytest.mark.parametrize("drop", ["units", "centroids", "model.grid", "units[].tokens"])
def test_flag_names_what_an_incomplete_shortcuts_file_lacks(run, tmp_path, capsys, drop):
    tmp, model = run
    d = json.loads((tmp / "sp" / "shortcuts.json").read_text())
    if drop == "units[].tokens":
        d["units"] = [{"cls": 0, "class_name": "ant", "unit": "token:1,1", "kind": "token", "word": 0,
                       "box": [0.25, 0.25, 0.5, 0.5]}]
    elif drop.startswith("model."):
        del d["model"][drop.split(".")[1]]
    else:
        del d[drop]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "shortcuts.json").write_text(json.dumps(d))
    _fails(capsys, ["flag", "--model", model, "--motifs", str(tmp_path / "m"), "--images", str(tmp / "new"),
                    "--out", str(tmp_path / "fl")], "--motifs", f"lacks {drop}")


def test_models_without_a_classifier_head_or_with_too_few_outputs_are_refused(run, tmp_path, capsys):
    tmp, _ = run
    headless = _model(tmp_path, "enc", depth=3, num_classes=0)
    _fails(capsys, ["spurious", "--model", headless, "--images", str(tmp / "train"), "--out", str(tmp_path / "s")],
           "no classifier head")
    _fails(capsys, ["prompt", "--model", headless, "--images", str(tmp / "new"), "--labels", "none", "--out",
                    str(tmp_path / "p")], "no classifier head")
    two = _model(tmp_path, "two", depth=3, num_classes=2)  # 3 class folders, 2 outputs
    _fails(capsys, ["spurious", "--model", two, "--images", str(tmp / "train"), "--out", str(tmp_path / "s")],
           "3 label classes", "2 outputs")
    assert not (tmp_path / "s" / "motifs.csv").exists()
    # prompt takes class folders as labels only where they can be: here it predicts without accuracy
    assert main(["prompt", "--model", two, "--images", str(tmp / "train"), "--out", str(tmp_path / "p2")]) == 0
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert "accuracy_before" not in summary and "2 model outputs" in summary["note"]


def test_hf_model_without_a_classification_head_is_refused(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tmp, _ = run
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "enc")  # pooler output [B, 32], no logits
    _fails(capsys, ["flag", "--model", f"hf:{tmp_path / 'enc'}", "--motifs", str(tmp / "sp"), "--images",
                    str(tmp / "new"), "--out", str(tmp_path / "fl")], "no classifier head")


# --- models that pool their patch tokens learn the planted cue: discovery must find it --------------------------


@pytest.mark.parametrize("kw", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False)],
                         ids=["avg_pool", "no_cls_token"])
def test_discovery_finds_the_cue_of_a_model_that_averages_its_patch_tokens(kw):
    """Before: on the avg-pooled model every causal effect was ~1e-5 (the masked cue token's own output was still
    averaged in) and no shortcut was selected; without a CLS token discovery refused to run."""
    from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
    from siftlens.spurious.discover import DiscoveryConfig, discover_shortcuts
    from siftlens.train import TrainConfig, train_classifier
    from tests.cue_model import CLASSES, CUE_CELLS, PATCH, SIZE, inputs, make_data

    torch.manual_seed(0)
    data = make_data(30, seed=0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw})
    train_classifier(model, torch.from_numpy(data["train"]), torch.from_numpy(data["y"]), SIZE, IMAGENET_MEAN,
                     IMAGENET_STD, TrainConfig(batch_size=32, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.1,
                                               augment="none", epochs=30, seed=0), log=lambda row: None)
    lm = from_module(model.eval(), Preprocess((SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD, None, "bicubic"))
    with torch.no_grad():
        pred = lm.forward(inputs(lm, data["conflict"])).argmax(1).numpy()
    assert (pred == data["test_conflict_cue"]).mean() > 0.6  # the model mostly follows the cue
    res = discover_shortcuts(lm, inputs(lm, data["train"]), data["y"], CLASSES,
                             DiscoveryConfig(n_words=16, layers="all"))
    grid = SIZE // PATCH
    for k, (r, c) in enumerate(CUE_CELLS):
        top = res.causal.units[(res.causal.units["cls"] == k) & (res.causal.units["kind"] != "region")].iloc[0]
        assert r * grid + c in [int(t) for t in top["tokens"].split()], (k, top)
        assert top["causal_effect"] > 0.05 and top["causal_p"] <= 0.05, (k, top)
    assert {u["cls"] for u in res.shortcuts.units} == {0, 1, 2}


@pytest.mark.parametrize("arch", ["Dinov2", "Beit"])
def test_hf_classifiers_that_average_patch_tokens_drop_a_masked_token(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                 use_mean_pooling=True)
    lm = from_module(getattr(transformers, f"{arch}ForImageClassification")(cfg))
    x = torch.randn(2, 3, 32, 32)
    changed = x.clone()
    changed[:, :, 8:16, 8:16] = torch.randn(2, 3, 8, 8) * 3
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True
    with torch.no_grad():
        assert not torch.allclose(lm.forward(x), lm.forward(changed), atol=1e-4)
        with SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=lambda _: mask) as steered:
            assert torch.allclose(steered(x), steered(changed), atol=1e-5)


def test_timm_name_with_a_fine_tuned_or_encoder_checkpoint_takes_its_classifier(tmp_path):
    """`--model timm:NAME --checkpoint FILE` builds NAME with its pretrained head (1000 classes); a user's fine-tuned
    checkpoint has its own classes, an encoder's has none. Before: refused as 'does not match'."""
    from safetensors.torch import save_file

    from siftlens.models import ModelSpecError, load_model

    for classes in (3, 0):
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"c{classes}.safetensors"))
        lm = load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / f"c{classes}.safetensors")
        assert lm.module.num_classes == classes
        assert torch.equal(lm.module.state_dict()["pos_embed"], m.state_dict()["pos_embed"])  # its weights
    with pytest.raises(ModelSpecError, match="does not match"):  # another architecture is still refused
        load_model("timm:vit_small_patch16_224", checkpoint=tmp_path / "c3.safetensors")


def test_flag_on_a_no_causal_run_says_so_not_that_it_is_old(run, tmp_path, capsys):
    tmp, model = run
    assert main(["spurious", "--model", model, "--images", str(tmp / "train"), "--out", str(tmp_path / "nc"),
                 "--words", "8", "--no-causal"]) == 0
    err = _fails(capsys, ["flag", "--model", model, "--motifs", str(tmp_path / "nc"), "--images", str(tmp / "new"),
                          "--out", str(tmp_path / "fl")], "no shortcuts.json", "--no-causal")
    assert "older" not in err


def test_hf_distilled_deit_classifier_is_loaded_with_its_heads(tmp_path):
    """DeiTForImageClassificationWithTeacher (cls + distillation heads) was loaded as the headless DeiTModel: its
    pooled features were taken for 32 class logits."""
    transformers = pytest.importorskip("transformers")
    from siftlens.models import load_model
    from siftlens.spurious.flag import check_classifier

    cfg = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3,
                                  architectures=["DeiTForImageClassificationWithTeacher"])
    torch.manual_seed(0)
    saved = transformers.DeiTForImageClassificationWithTeacher(cfg).eval()
    saved.save_pretrained(tmp_path / "deit")
    lm = load_model(f"hf:{tmp_path / 'deit'}")
    assert check_classifier(lm) == 3 and lm.layout().prefix_names == ("cls", "dist")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lm.forward(x), saved(pixel_values=x).logits, atol=1e-5)  # the saved heads
