"""Attention capture adapters (timm, Hugging Face, torchvision) against plain reference attention.

Every reference is computed independently of ``siftlens.capture``: from each attention module's own
projections on the input it actually received (a forward pre-hook), with the model in its normal
(fused / SDPA) mode, as softmax(q k^T * scale). Tiny randomly initialised models, CPU only, no network.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from siftlens.capture import AttentionCapture, NoAttentionLayersError, detect_backend, hf_attention_modules
from siftlens.models import LoadedModel, _torchvision_preprocess, from_module, load_model, token_layout

timm = pytest.importorskip("timm")

ATOL = 1e-5
SMALL = dict(depth=2, embed_dim=32, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _collect(model, backend, x, **fwd):
    """Run ``model`` inside AttentionCapture; return (captured {layer: attn}, output)."""
    got: dict[int, torch.Tensor] = {}

    def on_attention(i, a):
        assert i not in got, f"layer {i} reported twice"
        got[i] = a.detach().clone()

    with torch.no_grad(), AttentionCapture(model, backend, on_attention) as cap:
        out = model(x, **fwd)
    assert cap.calls == len(got)
    return got, out


def _softmax_ref(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain attention: q, k [B, heads, T, d] -> softmax(q k^T * scale) [B, heads, T, T], in float64."""
    return torch.softmax((q.double() @ k.double().transpose(-2, -1)) * scale, dim=-1).float()


def _input_recorder(modules):
    """Forward pre-hooks that keep the first input each module receives; returns (inputs, handles)."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, m in enumerate(modules):
        def hook(_m, args, kwargs, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return inputs, handles


# --- timm -----------------------------------------------------------------------------------------

def _timm_attn_modules(model):
    return [blk.attn for blk in model.blocks]


def _timm_reference(model, x):
    """Reference attention per block from attn.qkv / q_norm / k_norm / scale on the block's normed input,
    with the model in its own (fused) mode. Returns (list of [B, heads, T, T], model output)."""
    attns = _timm_attn_modules(model)
    inputs, handles = _input_recorder(attns)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    refs = []
    for i, a in enumerate(attns):
        h = inputs[i]
        B, N, _ = h.shape
        with torch.no_grad():
            qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _v = qkv.unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
        refs.append(_softmax_ref(q, k, a.scale))
    return refs, out


def _sdpa_reference(model, x):
    """Reference for attention that needs more than qkv (e.g. EVA's RoPE): intercept the q and k that
    the fused path hands to scaled_dot_product_attention and compute softmax(q k^T / sqrt(d)) ourselves."""
    refs = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        scale = kwargs.get("scale") or 1 / math.sqrt(q.shape[-1])
        s = q.double() @ k.double().transpose(-2, -1) * scale
        if attn_mask is not None:
            s = s + attn_mask.double()
        refs.append(torch.softmax(s, -1).float())
        return original(q, k, v, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return refs, out


def _vit(name, **kw):
    return timm.create_model(name, pretrained=False, **{**SMALL, **kw}).eval()


TIMM_CASES = {
    # id: (builder, input (H, W), prefix names, grid)
    "p16": (lambda: _vit("vit_tiny_patch16_224", img_size=48), (48, 48), ("cls",), (3, 3)),
    "p8": (lambda: _vit("vit_small_patch8_224", img_size=32), (32, 32), ("cls",), (4, 4)),
    "p14": (lambda: _vit("vit_small_patch14_dinov2", img_size=42), (42, 42), ("cls",), (3, 3)),
    "p32": (lambda: _vit("vit_base_patch32_224", img_size=64), (64, 64), ("cls",), (2, 2)),
    "qk_norm": (lambda: _vit("vit_tiny_patch16_224", img_size=32, qk_norm=True), (32, 32), ("cls",), (2, 2)),
    "reg4": (lambda: _vit("vit_small_patch14_reg4_dinov2", img_size=28, reg_tokens=4, class_token=True,
                          no_embed_class=True),
             (28, 28), ("cls", "reg0", "reg1", "reg2", "reg3"), (2, 2)),
    "deit_distilled": (lambda: _vit("deit_tiny_distilled_patch16_224", img_size=32), (32, 32),
                       ("cls", "dist"), (2, 2)),
    "non_square": (lambda: _vit("vit_tiny_patch16_224", dynamic_img_size=True), (224, 320), ("cls",), (14, 20)),
    "no_cls": (lambda: _vit("vit_tiny_patch16_224", img_size=32, global_pool="avg", class_token=False),
               (32, 32), (), (2, 2)),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_capture_matches_reference(case):
    build, (H, W), prefix, grid = TIMM_CASES[case]
    model = build()
    mods = _timm_attn_modules(model)
    if case == "p8":  # a mixed setting must come back exactly as it was
        mods[1].fused_attn = False
    flags = [m.fused_attn for m in mods]
    x = torch.randn(2, 3, H, W)

    refs, out_ref = _timm_reference(model, x)
    got, out_cap = _collect(model, "timm", x)

    assert [m.fused_attn for m in mods] == flags, "fused_attn flags not restored"
    assert sorted(got) == list(range(len(model.blocks))) == list(range(2))
    T = len(prefix) + grid[0] * grid[1]
    for i, ref in enumerate(refs):
        assert got[i].shape == (2, model.blocks[i].attn.num_heads, T, T)
        torch.testing.assert_close(got[i].sum(-1), torch.ones(got[i].shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_cap, out_ref, atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), out_ref), "model not restored after the capture"

    layout = token_layout(model, "timm", (H, W))
    assert layout.prefix_names == prefix
    assert layout.grid == grid
    assert layout.num_tokens == got[0].shape[-1]
    assert layout.cls_index == (0 if "cls" in prefix else None)
    assert layout.num_prefix == model.num_prefix_tokens


def test_timm_eva02_with_rope():
    try:
        model = _vit("eva02_tiny_patch14_224", img_size=28)
    except Exception as e:  # pragma: no cover - depends on the timm version
        pytest.skip(f"no tiny eva02 in this timm: {e}")
    x = torch.randn(2, 3, 28, 28)
    assert all(b.attn.fused_attn for b in model.blocks)
    refs, out_ref = _sdpa_reference(model, x)
    assert len(refs) == 2, "the reference did not see the fused attention calls"
    got, out_cap = _collect(model, "timm", x)
    assert all(b.attn.fused_attn for b in model.blocks)
    assert sorted(got) == [0, 1]
    for i in range(2):
        torch.testing.assert_close(got[i], refs[i], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_cap, out_ref, atol=ATOL, rtol=1e-5)
    layout = token_layout(model, "timm", (28, 28))
    assert layout.prefix_names == ("cls",) and layout.grid == (2, 2)
    assert layout.num_tokens == got[0].shape[-1]


def test_timm_capture_restores_on_error():
    model = _vit("vit_tiny_patch16_224", img_size=32)

    def boom(i, a):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), AttentionCapture(model, "timm", boom):
        model(torch.randn(1, 3, 32, 32))
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(b.attn.attn_drop._forward_hooks for b in model.blocks)


# --- Hugging Face ---------------------------------------------------------------------------------

def _hf():
    return pytest.importorskip("transformers")


def _hf_reference(model, attn_cls, x, **fwd):
    """Reference from each attention module's q_proj / k_proj / scaling on its input hidden states."""
    mods = [m for m in model.modules() if isinstance(m, attn_cls)]
    inputs, handles = _input_recorder(mods)
    try:
        with torch.no_grad():
            out = model(pixel_values=x, **fwd)
    finally:
        for h in handles:
            h.remove()
    refs = []
    for i, m in enumerate(mods):
        h = inputs[i]
        B, T, _ = h.shape
        with torch.no_grad():
            q = m.q_proj(h).view(B, T, -1, m.head_dim).transpose(1, 2)
            k = m.k_proj(h).view(B, T, -1, m.head_dim).transpose(1, 2)
        refs.append(_softmax_ref(q, k, m.scaling))
    return refs, out


def _hf_vit_config(tf, cls_name="ViTConfig", **kw):
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=3)
    base.update(kw)
    return getattr(tf, cls_name)(**base)


def _hf_build(tf, model_cls, cfg):
    model = getattr(tf, model_cls)._from_config(cfg, attn_implementation="sdpa").eval()
    return model


HF_CASES = {
    # id: (model class, attention class, config class, config extras, input size, prefix names)
    "vit_cls": ("ViTForImageClassification", "ViTAttention", "ViTConfig", {}, (32, 32), ("cls",)),
    "vit_model": ("ViTModel", "ViTAttention", "ViTConfig", {}, (32, 32), ("cls",)),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTAttention", "DeiTConfig", {}, (32, 32),
                     ("cls", "dist")),
    "deit_model": ("DeiTModel", "DeiTAttention", "DeiTConfig", {}, (32, 32), ("cls", "dist")),
    "dinov2": ("Dinov2Model", "Dinov2Attention", "Dinov2Config",
               dict(image_size=28, patch_size=14, mlp_ratio=2), (28, 42), ("cls",)),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersAttention", "Dinov2WithRegistersConfig",
                   dict(image_size=28, patch_size=14, mlp_ratio=2, num_register_tokens=4), (28, 28),
                   ("cls", "reg0", "reg1", "reg2", "reg3")),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_capture_matches_reference(case):
    tf = _hf()
    model_cls, attn_cls, cfg_cls, extra, (H, W), prefix = HF_CASES[case]
    if not hasattr(tf, model_cls):
        pytest.skip(f"transformers {tf.__version__} has no {model_cls}")
    module = __import__(getattr(tf, model_cls).__module__, fromlist=[attn_cls])
    cfg = _hf_vit_config(tf, cfg_cls, **extra)
    model = _hf_build(tf, model_cls, cfg)
    assert model.config._attn_implementation == "sdpa"
    x = torch.randn(2, 3, H, W)

    refs, out_ref = _hf_reference(model, getattr(module, attn_cls), x)
    modes = []
    got: dict[int, torch.Tensor] = {}

    def on_attention(i, a):
        modes.append(model.config._attn_implementation)
        got[i] = a.detach().clone()

    with torch.no_grad(), AttentionCapture(model, "hf", on_attention):
        out_cap = model(pixel_values=x)
    assert set(modes) == {"eager"}, "capture did not switch to eager attention"
    assert model.config._attn_implementation == "sdpa", "attention implementation not restored"
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))

    assert sorted(got) == [0, 1]
    for i in range(2):
        torch.testing.assert_close(got[i], refs[i], atol=ATOL, rtol=0)
    for key in ("logits", "last_hidden_state"):
        if getattr(out_ref, key, None) is not None:
            torch.testing.assert_close(getattr(out_cap, key), getattr(out_ref, key), atol=ATOL, rtol=1e-5)

    # the model's own eager output_attentions agrees with the capture
    model.set_attn_implementation("eager")
    with torch.no_grad():
        own = model(pixel_values=x, output_attentions=True).attentions
    assert len(own) == 2
    for i in range(2):
        torch.testing.assert_close(got[i], own[i], atol=ATOL, rtol=0)

    layout = token_layout(model, "hf", (H, W))
    assert layout.prefix_names == prefix
    assert layout.grid == (H // cfg.patch_size, W // cfg.patch_size)
    assert layout.num_tokens == got[0].shape[-1]


def test_hf_non_square_input_through_loaded_model():
    """LoadedModel.forward must ask HF ViT to interpolate its position embeddings for other sizes
    (forward is wrapped by decorators, so its __code__ does not show the parameter)."""
    tf = _hf()
    model = _hf_build(tf, "ViTForImageClassification", _hf_vit_config(tf))
    lm = load_model(model, input_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    got = {}
    with torch.no_grad(), AttentionCapture(lm.module, "hf", lambda i, a: got.__setitem__(i, a)):
        logits = lm.forward(x)
    assert logits.shape == (1, 3)
    assert got[0].shape[-1] == lm.layout().num_tokens == 1 + 4 * 6


# --- torchvision ----------------------------------------------------------------------------------

def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64).eval()


def test_torchvision_capture_matches_reference():
    model = _tv_vit()
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    x = torch.randn(2, 3, 32, 32)
    inputs, handles = _input_recorder(mhas)
    with torch.no_grad():
        out_ref = model(x)
    for h in handles:
        h.remove()

    got, out_cap = _collect(model, "torchvision", x)
    assert sorted(got) == [0, 1]
    for i, m in enumerate(mhas):
        h = inputs[i]  # [B, T, E], batch_first
        B, T, E = h.shape
        hd = E // m.num_heads
        qkv = torch.nn.functional.linear(h, m.in_proj_weight, m.in_proj_bias)
        q, k, _v = qkv.view(B, T, 3, m.num_heads, hd).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(got[i], _softmax_ref(q, k, hd ** -0.5), atol=ATOL, rtol=0)
    torch.testing.assert_close(out_cap, out_ref, atol=ATOL, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in mhas), "instance forward left behind"
    with torch.no_grad():
        assert torch.equal(model(x), out_ref)
    layout = token_layout(model, "torchvision", (32, 32))
    assert layout.prefix_names == ("cls",) and layout.grid == (4, 4)
    assert layout.num_tokens == got[0].shape[-1]


def test_torchvision_restores_a_forward_someone_else_patched():
    model = _tv_vit()
    mha = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    calls = []
    bound = mha.forward

    def theirs(*a, **k):
        calls.append(1)
        return bound(*a, **k)

    mha.forward = theirs
    got, _ = _collect(model, "torchvision", torch.randn(1, 3, 32, 32))
    assert len(got) == 2 and calls == [1]
    assert mha.__dict__.get("forward") is theirs


# --- loading, backend detection, errors -----------------------------------------------------------

def test_load_model_timm():
    model = _vit("vit_small_patch14_reg4_dinov2", img_size=28)
    assert detect_backend(model) == "timm"
    lm = load_model(model)
    assert isinstance(lm, LoadedModel) and lm.backend == "timm"
    # the size the model was built for (its pretrained_cfg still says 518)
    assert lm.preprocess.input_size == (28, 28)
    assert lm.patch_size == 14 and lm.num_layers == 2
    assert lm.layout().prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
    with torch.no_grad():
        assert lm.forward(torch.randn(1, 3, 28, 28)).ndim == 2

    from timm.models.vision_transformer import VisionTransformer

    direct = VisionTransformer(img_size=(32, 48), patch_size=16, **SMALL)
    lm = from_module(direct)
    assert lm.preprocess.input_size == (32, 48) and lm.layout().grid == (2, 3)
    assert load_model(direct, input_size=(48, 48)).preprocess.input_size == (48, 48)


def test_load_model_hf_and_torchvision():
    tf = _hf()
    hf = _hf_build(tf, "DeiTForImageClassificationWithTeacher", _hf_vit_config(tf, "DeiTConfig"))
    assert detect_backend(hf) == "hf"
    lm = load_model(hf)
    assert lm.backend == "hf" and lm.preprocess.input_size == (32, 32)
    assert lm.preprocess.crop_pct is None and lm.preprocess.mean == (0.5, 0.5, 0.5)
    assert lm.layout().prefix_names == ("cls", "dist") and lm.num_layers == 2
    # the attention modules come from the model's own output recorder; the name-based fallback
    # (for transformers without _can_record_outputs) must find the same ones
    recorded = hf_attention_modules(hf)
    assert [type(m).__name__ for m in recorded] == ["DeiTAttention"] * 2
    hf._can_record_outputs = {}
    assert hf_attention_modules(hf) == recorded
    del hf._can_record_outputs
    with torch.no_grad():
        assert lm.forward(torch.randn(1, 3, 32, 32)).shape == (1, 3)

    tv = _tv_vit()
    assert detect_backend(tv) == "torchvision"
    lm = load_model(tv)
    assert lm.backend == "torchvision" and lm.preprocess.input_size == (32, 32)
    assert lm.layout().grid == (4, 4) and lm.num_layers == 2


def test_torchvision_preprocess_follows_the_weights_recipe():
    """Metadata of the weights enum only (nothing downloaded): vit_h_14's SWAG weights are 518 px,
    bicubic, no crop margin; vit_b_16's are 256 -> 224 bilinear."""
    import torchvision

    class Fake(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.image_size = size

    w = torchvision.models.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    pre = _torchvision_preprocess(Fake(518), w, None)
    assert pre.input_size == (518, 518) and pre.crop_pct == 1.0 and pre.interpolation == "bicubic"
    pre = _torchvision_preprocess(Fake(224), torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1, None)
    assert pre.crop_pct == pytest.approx(224 / 256) and pre.interpolation == "bilinear"


def test_models_without_attention_are_refused():
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    for fn in (load_model, from_module):
        with pytest.raises(NoAttentionLayersError, match="no attention layers.*MultiheadAttention"):
            fn(resnet)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(NoAttentionLayersError, match="not a timm, Hugging Face or torchvision ViT"):
        detect_backend(seq)
    for fn in (load_model, from_module):
        with pytest.raises(NoAttentionLayersError, match="Sequential"):
            fn(seq)


# --- end to end: analyze() per family -------------------------------------------------------------

@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (56, 64, 3), dtype=np.uint8)).save(d / f"n{i}.png")
    return d


def _family_model(family):
    if family == "timm":
        return _vit("vit_small_patch14_reg4_dinov2", img_size=42)
    if family == "hf":
        tf = _hf()
        return _hf_build(tf, "DeiTForImageClassificationWithTeacher", _hf_vit_config(tf, "DeiTConfig"))
    return _tv_vit()


@pytest.mark.parametrize("family", ["timm", "hf", "torchvision"])
def test_analyze_end_to_end(family, noise_dir, tmp_path):
    from siftlens import analyze

    module = _family_model(family)
    model = load_model(module) if family == "hf" else module  # both entry points
    res = analyze(model, images=noise_dir, out=tmp_path / "o", workers=0, report=False, progress=False,
                  batch_size=2)
    layers, heads = 2, 2
    assert len(res.per_image) == layers * heads * 3
    assert sorted(res.per_image["image_id"].unique()) == [0, 1, 2]
    assert res.manifest["model"]["backend"] == family
    assert res.manifest["model"]["num_layers"] == layers
    if family == "hf":
        assert res.manifest["layout"]["prefix_tokens"] == ["cls", "dist"]
        assert res.manifest["model"]["class"] == "DeiTForImageClassificationWithTeacher"
        assert module.config._attn_implementation == "sdpa"
