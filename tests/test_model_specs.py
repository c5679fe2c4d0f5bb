"""Model spec strings end to end: hf:LOCAL_DIR (with its preprocessor config), torchvision with a
local checkpoint, timm with a safetensors checkpoint. Everything is built here; nothing downloads."""

import json

import pytest
import torch

from siftlens.cli import main
from siftlens.models import load_model

transformers = pytest.importorskip("transformers")

ARGS = ["--limit", "2", "--workers", "0", "--quiet", "--no-report", "--null-permutations", "10"]


def test_hf_local_dir_with_preprocessor(tmp_path):
    cfg = transformers.ViTConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3,
                                 id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
                                 architectures=["ViTForImageClassification"])
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "m")
    transformers.ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3,
                                   image_std=[0.25] * 3).save_pretrained(tmp_path / "m")
    lm = load_model(f"hf:{tmp_path / 'm'}")
    assert lm.preprocess.input_size == (48, 48) and lm.preprocess.std == (0.25, 0.25, 0.25)
    assert lm.label_names == ["a", "b", "c"]
    assert main(["analyze", "--model", f"hf:{tmp_path / 'm'}", "--out", str(tmp_path / "o"), *ARGS]) == 0
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["layout"]["grid"] == [3, 3] and man["model"]["num_layers"] == 2


def test_hf_dinov2_with_registers_local_dir(tmp_path):
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("transformers without Dinov2WithRegisters")
    cfg = transformers.Dinov2WithRegistersConfig(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "d")
    assert main(["analyze", "--model", f"hf:{tmp_path / 'd'}", "--out", str(tmp_path / "o"), *ARGS]) == 0
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["layout"]["prefix_tokens"] == ["cls", "reg0", "reg1", "reg2", "reg3"]


def test_torchvision_and_timm_local_checkpoints(tmp_path):
    import timm
    import torchvision
    from safetensors.torch import save_file

    tv = torchvision.models.vit_b_16(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert main(["analyze", "--model", "torchvision:vit_b_16", "--checkpoint", str(tmp_path / "tv.pth"),
                 "--out", str(tmp_path / "o1"), "--limit", "1", "--workers", "0", "--quiet", "--no-report",
                 "--null-permutations", "10"]) == 0
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "t.safetensors"))
    assert main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "t.safetensors"),
                 "--out", str(tmp_path / "o2"), *ARGS]) == 0
    # a checkpoint of another architecture is refused with the reason
    assert main(["analyze", "--model", "timm:vit_small_patch16_224", "--checkpoint", str(tmp_path / "t.safetensors"),
                 "--out", str(tmp_path / "o3"), *ARGS]) == 2


def test_random_init_of_a_named_model_is_seeded_whatever_the_rng_state():
    """`timm:NAME --random-init` drew its weights from the global RNG: two commands in one process (or after other
    random draws) got two different models, so motifs from `spurious` were refused by `prompt` as another model's."""
    pytest.importorskip("timm")
    torch.manual_seed(123)
    a = load_model("timm:vit_tiny_patch16_224", random_init=True, input_size=(32, 32))
    torch.rand(1000)  # the caller's RNG moves on
    b = load_model("timm:vit_tiny_patch16_224", random_init=True, input_size=(32, 32))
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.module.state_dict()[w], b.module.state_dict()[w])
    state = torch.random.get_rng_state()
    c = load_model("timm:vit_tiny_patch16_224", random_init=True, input_size=(32, 32), seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # and the caller's RNG is left as it was
    assert not torch.equal(a.module.state_dict()[w], c.module.state_dict()[w])  # another seed, another model


def test_random_init_on_a_model_that_ships_its_weights_gives_fresh_weights(tmp_path):
    """`--random-init` with the bundled model (or an exported .safetensors) was ignored: the trained weights ran
    under a random-init label, so a calibration run on "random weights" measured the trained model."""
    trained = load_model("vit_tiny_imagenette")
    fresh = load_model("vit_tiny_imagenette", random_init=True)
    again = load_model("vit_tiny_imagenette", random_init=True)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(trained.module.state_dict()[w], fresh.module.state_dict()[w])
    assert torch.equal(fresh.module.state_dict()[w], again.module.state_dict()[w])  # seeded: same every time
    assert "random init" in fresh.name and fresh.preprocess == trained.preprocess
    x = torch.randn(2, 3, *trained.preprocess.input_size)
    with torch.no_grad():
        assert not torch.allclose(trained.module(x), fresh.module(x))
    # the trained model is untouched by building its random twin
    assert torch.equal(load_model("vit_tiny_imagenette").module.state_dict()[w], trained.module.state_dict()[w])
