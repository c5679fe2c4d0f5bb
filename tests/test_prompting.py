"""Inference-time attention steering (siftlens.prompting) on tiny random-init ViTs; CPU only, no network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from siftlens.capture import ATTENTION_FINDERS, AttentionCapture
from siftlens.models import LoadedModel, from_module, load_model
from siftlens.preprocess import Preprocess
from siftlens.prompting import (
    METHODS,
    SteeredViT,
    _inject,
    image_maps,
    resolve_layers,
    steered_predict,
)

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY = dict(patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    yield
    torch.set_num_threads(threads)


def _timm_lm(img_size=64, depth=3, num_classes=3, **kw) -> LoadedModel:
    return from_module(VisionTransformer(img_size=img_size, depth=depth, num_classes=num_classes, **{**TINY, **kw}))


def _normalise(lm, rgb01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(lm.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(lm.preprocess.std).view(3, 1, 1)
    return (rgb01 - mean) / std


def _blob_images(lm, n=3, hw=(64, 64), region=(28, 28), seed=0) -> torch.Tensor:
    """Grey images with a few sharp discs in the top-left ``region`` (SIFT fires there only), flat elsewhere."""
    H, W = hw
    yy, xx = np.mgrid[:H, :W]
    out = []
    for s in range(n):
        rng = np.random.default_rng(seed + s)
        a = np.full((H, W), 0.5)
        for _ in range(10):
            cx, cy = rng.integers(4, region[1]), rng.integers(4, region[0])
            a[(xx - cx) ** 2 + (yy - cy) ** 2 < rng.integers(2, 5) ** 2] = rng.uniform(0, 1)
        out.append(_normalise(lm, torch.tensor(a, dtype=torch.float32).expand(3, H, W)))
    return torch.stack(out)


def _capture(lm, fn, x) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad(), AttentionCapture(lm.module, lm.backend, lambda i, a: got.__setitem__(i, a.clone())):
        out = fn(x)
    return got, out


def _mask_fn(flags: torch.Tensor):
    """token_mask_fn flagging the same patches (bool [n]) in every image."""
    return lambda x: flags.expand(x.shape[0], -1)


def _no_hooks_left(lm):
    return all(not m._forward_pre_hooks for m in ATTENTION_FINDERS[lm.backend](lm.module))


# --- identity, restore, layers --------------------------------------------------------------------

def test_resolve_layers():
    assert resolve_layers("late", 12) == [8, 9, 10, 11]
    assert resolve_layers("middle", 12) == [4, 5, 6, 7]
    assert resolve_layers("early", 12) == [0, 1, 2, 3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("late", 3) == [2] and resolve_layers("middle", 3) == [1]
    assert resolve_layers("late", 2) == [1] and resolve_layers("middle", 1) == [0]
    assert resolve_layers("none", 5) == [] and resolve_layers([], 5) == []
    assert resolve_layers([-1, 0, 0], 4) == [0, 3]
    with pytest.raises(IndexError):
        resolve_layers([4], 4)
    with pytest.raises(ValueError):
        resolve_layers("final", 4)


@pytest.mark.parametrize("method", METHODS)
def test_identity_when_off_and_after_remove(method):
    lm = _timm_lm()
    x = _blob_images(lm)
    flags = torch.zeros(64, dtype=torch.bool)
    flags[:10] = True
    kw = dict(token_mask_fn=_mask_fn(flags))
    with torch.no_grad():
        ref = lm.forward(x)
        for steered in (SteeredViT(lm, method, beta=0.0, **kw), SteeredViT(lm, method, layers="none", **kw),
                        SteeredViT(lm, method, layers=[], beta=5.0, **kw)):
            assert torch.equal(steered(x), ref)
        with SteeredViT(lm, method, layers="all", beta=1.0, **kw) as steered:
            on = steered(x)
            steered.reset_rng()  # random_mask draws afresh on every call
            assert not torch.allclose(on, ref, atol=1e-4), f"{method} changed nothing"
            assert _no_hooks_left(lm), "hooks must only live during a steered call"
            assert torch.equal(steered.set_strength(0.0)(x), ref)
            assert torch.equal(steered.set_strength(1.0)(x), on)
        assert _no_hooks_left(lm)
        assert torch.equal(lm.forward(x), ref)
        with pytest.raises(RuntimeError, match="removed"):
            steered(x)


def test_bad_arguments():
    lm = _timm_lm()
    x = _blob_images(lm, 2)
    with pytest.raises(ValueError, match="unknown steering method"):
        SteeredViT(lm, "sift_magic")
    with pytest.raises(ValueError, match="token_mask_fn"):
        SteeredViT(lm, "mask_tokens")
    with pytest.raises(ValueError, match=r"expected \[B, n\]"):
        SteeredViT(lm, "mask_tokens", token_mask_fn=lambda x: torch.zeros(x.shape[0], 7, dtype=torch.bool))(x)
    with pytest.raises(ValueError, match="boolean"):
        SteeredViT(lm, "mask_tokens", token_mask_fn=lambda x: torch.rand(x.shape[0], 64))(x)
    # [B, h, w] numpy masks are accepted
    grid = np.zeros((2, 8, 8), dtype=bool)
    grid[:, 0, :3] = True
    s = SteeredViT(lm, "mask_tokens", token_mask_fn=lambda x: grid)
    s(x)
    assert s.last_mask.sum().item() == 6 and s.last_mask[:, :3].all()


def test_unsupported_attention_module_is_refused():
    class NoMaskAttention(nn.Module):  # looks like timm attention but its forward takes no mask
        fused_attn = False

        def __init__(self):
            super().__init__()
            self.attn_drop = nn.Dropout(0.0)

        def forward(self, x):
            return x

    lm = LoadedModel(nn.Sequential(NoMaskAttention()), "timm", "fake", Preprocess((32, 32)))
    with pytest.raises(NotImplementedError, match="timm attention NoMaskAttention"):
        SteeredViT(lm, "sift_bias", layers="all")


# --- the bias reaches the attention -----------------------------------------------------------------

def test_mask_tokens_zeroes_attention_in_chosen_layers_only():
    lm = _timm_lm(depth=3)
    x = _blob_images(lm, 2)
    flags = torch.zeros(64, dtype=torch.bool)
    flags[[0, 5, 9, 33, 63]] = True
    steered = SteeredViT(lm, "mask_tokens", layers=[1, 2], token_mask_fn=_mask_fn(flags))
    base, _ = _capture(lm, lm.forward, x)
    got, out_eager = _capture(lm, steered, x)
    keys = 1 + flags.nonzero().flatten()  # token index = prefix (cls) + patch index
    torch.testing.assert_close(got[0], base[0], atol=1e-6, rtol=0)  # un-chosen earlier layer untouched
    for layer in (1, 2):
        assert got[layer][..., keys].max() < 1e-6  # every query, every head
        assert base[layer][..., keys].min() > 1e-4
        torch.testing.assert_close(got[layer].sum(-1), torch.ones_like(got[layer].sum(-1)))
    with torch.no_grad():  # the fused SDPA path (no capture) sees the same mask as the eager path
        torch.testing.assert_close(steered(x), out_eager, atol=1e-5, rtol=1e-5)
    assert steered.last_mask.sum(1).tolist() == [5, 5]


def _semantic_ratio(attn_cls: torch.Tensor, c: np.ndarray) -> float:
    a = attn_cls / attn_cls.sum()
    return float(len(c) * (a.numpy() * c).sum())


def test_sift_bias_moves_attention_toward_keypoints():
    lm = _timm_lm(depth=3)
    x = _blob_images(lm, 3, seed=1)
    maps = image_maps(x, lm, "sift")
    assert all(c is not None and (c == 0).sum() > 30 for c in maps)
    base, _ = _capture(lm, lm.forward, x)
    steered = SteeredViT(lm, "sift_bias", layers="late", beta=3.0)
    assert steered.layers == [2]
    got, out_eager = _capture(lm, steered, x)
    torch.testing.assert_close(got[1], base[1], atol=1e-6, rtol=0)
    for i, c in enumerate(maps):
        zero = torch.from_numpy(c == 0)
        b_cls, s_cls = base[2][i, :, 0, 1:], got[2][i, :, 0, 1:]  # CLS -> patches, per head
        b_all, s_all = base[2][i, :, :, 1:], got[2][i, :, :, 1:]  # every query -> patches
        assert s_all[..., zero].sum() < 0.05 * b_all[..., zero].sum()
        for h in range(b_cls.shape[0]):
            assert _semantic_ratio(s_cls[h], c) > _semantic_ratio(b_cls[h], c) + 1.0
    # the patch-mass-preserving shift: mean_j exp(b_j) = 1 per image, prefix keys untouched
    kb = steered.key_bias(x)
    assert torch.equal(kb[:, 0], torch.zeros(3))
    torch.testing.assert_close(kb[:, 1:].exp().mean(1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(steered(x), out_eager, atol=1e-5, rtol=1e-5)
    # literal formula when asked: beta * log(c + eps)
    raw = SteeredViT(lm, "sift_bias", beta=2.0, eps=1e-3, preserve_patch_mass=False).patch_bias(x)
    torch.testing.assert_close(raw[0], torch.from_numpy(2.0 * np.log(maps[0] + 1e-3)).float())


def test_edge_bias_and_flat_images():
    lm = _timm_lm()
    x = torch.cat([_blob_images(lm, 1), _normalise(lm, torch.full((1, 3, 64, 64), 0.3))])  # image 1 is flat
    for method in ("sift_bias", "edge_bias", "sift_suppress_lowconc", "edge_suppress_lowconc"):
        s = SteeredViT(lm, method, layers="all", beta=2.0)
        with torch.no_grad():
            out, ref = s(x), lm.forward(x)
        assert s.last_info["no_map"] == [1], method
        assert torch.equal(s.last_bias[1], torch.zeros(64))
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)  # unsteered image in a steered batch
        assert not torch.allclose(out[0], ref[0], atol=1e-4)
    sift = SteeredViT(lm, "sift_bias").patch_bias(x)[0]
    edge = SteeredViT(lm, "edge_bias").patch_bias(x)[0]
    assert not torch.allclose(sift, edge)
    # suppress: SIFT masks its zero-mass patches; the edge control masks as many, lowest edge density first
    ss, es = SteeredViT(lm, "sift_suppress_lowconc"), SteeredViT(lm, "edge_suppress_lowconc")
    ss.patch_bias(x)
    es.patch_bias(x)
    c = image_maps(x, lm, "sift")[0]
    assert torch.equal(ss.last_mask[0], torch.from_numpy(c == 0))
    assert es.last_mask.sum(1).tolist() == ss.last_mask.sum(1).tolist()


def test_map_cache():
    lm = _timm_lm()
    x = _blob_images(lm, 2)
    s = SteeredViT(lm, "sift_bias", beta=1.0)
    first = s.patch_bias(x).clone()
    assert (s.cache.hits, s.cache.misses) == (0, 2)
    torch.testing.assert_close(s.patch_bias(x), first)
    assert (s.cache.hits, s.cache.misses) == (2, 2)


# --- random control -----------------------------------------------------------------------------------

def test_random_mask_matches_count_and_is_deterministic():
    lm = _timm_lm()
    x = _blob_images(lm, 3)

    def fn(x):  # different counts per image
        m = torch.zeros(x.shape[0], 64, dtype=torch.bool)
        for i in range(x.shape[0]):
            m[i, : 3 + 4 * i] = True
        return m

    flagged = SteeredViT(lm, "mask_tokens", token_mask_fn=fn)
    flagged.patch_bias(x)
    a, b = (SteeredViT(lm, "random_mask", token_mask_fn=fn, seed=7) for _ in range(2))
    masks_a = [a.patch_bias(x) < 0 for _ in range(2)]
    masks_b = [b.patch_bias(x) < 0 for _ in range(2)]
    assert [m.sum(1).tolist() for m in masks_a] == [flagged.last_mask.sum(1).tolist()] * 2 == [[3, 7, 11]] * 2
    assert all(torch.equal(p, q) for p, q in zip(masks_a, masks_b))  # same seed, same call order
    assert not torch.equal(masks_a[0], masks_a[1])  # fresh draws per call
    assert torch.equal(a.reset_rng().patch_bias(x) < 0, masks_a[0])
    other = SteeredViT(lm, "random_mask", token_mask_fn=fn, seed=8).patch_bias(x) < 0
    assert not torch.equal(other, masks_a[0])
    with torch.no_grad():  # through the model: the same attention-level effect as mask_tokens
        got, _ = _capture(lm, a.reset_rng(), x)
    keys = 1 + masks_a[0][1].nonzero().flatten()
    assert got[2][1][..., keys].max() < 1e-6


# --- predictions move the expected way ------------------------------------------------------------------

def test_masking_all_layers_makes_cls_blind_to_the_masked_patches():
    lm = _timm_lm(depth=2)
    x = _blob_images(lm, 2)
    flags = torch.zeros(64, dtype=torch.bool)
    flags[[0, 1, 8, 9]] = True  # the top-left 16 x 16 pixels
    y = x.clone()
    y[:, :, :16, :16] = torch.randn(2, 3, 16, 16) * 3  # different content under the masked patches only
    s = SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=_mask_fn(flags))
    with torch.no_grad():
        assert not torch.allclose(lm.forward(x), lm.forward(y), atol=1e-3)
        torch.testing.assert_close(s(x), s(y), atol=1e-5, rtol=1e-5)


def _train_corner_square_model(steps=40):
    """Class 1 <=> bright 8 x 8 square in the top-left patch; tiny ViT trained for a few steps."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, depth=2, num_classes=2, global_pool="token", **TINY)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.rand(n, 3, 32, 32, generator=g) * 0.5
        y = torch.randint(0, 2, (n,), generator=g)
        x[y == 1, :, :8, :8] = 1.0
        return (x - 0.5) / 0.5, y

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        xb, yb = batch(32)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return from_module(model.eval()), batch(128)


def test_masking_the_cue_moves_predictions_away_from_its_class():
    lm, (x, y) = _train_corner_square_model()
    assert lm.layout().prefix_names == ("cls",)
    flags = torch.zeros(16, dtype=torch.bool)
    flags[0] = True  # the patch under the square
    with torch.no_grad():
        p = lm.forward(x).softmax(-1)[:, 1]
        p_mask = steered_predict(lm, x, "mask_tokens", layers="all", token_mask_fn=_mask_fn(flags)).softmax(-1)[:, 1]
        p_rand = steered_predict(lm, x, "random_mask", layers="all", token_mask_fn=_mask_fn(flags),
                                 batch_size=50).softmax(-1)[:, 1]
    cue = y == 1
    assert ((p > 0.5) == cue).float().mean() > 0.95  # the model learned the cue
    assert p_mask[cue].mean() < 0.5 < p[cue].mean()  # masking the cue's keys removes the evidence
    assert (p_mask[cue] < p[cue]).float().mean() > 0.95
    assert p_rand[cue].mean() > p_mask[cue].mean() + 0.3  # one random patch masked: the control barely moves


def test_steered_predict_batches_and_grad():
    lm = _timm_lm()
    x = _blob_images(lm, 5)
    whole = steered_predict(lm, x, "sift_bias", layers="middle", beta=2.0)
    parts = steered_predict(lm, x, "sift_bias", layers="middle", beta=2.0, batch_size=2)
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)
    assert _no_hooks_left(lm)
    s = SteeredViT(lm, "sift_bias", layers="all", beta=2.0)
    xg = x.clone().requires_grad_(True)
    s(xg).sum().backward()  # usable outside no_grad: the bias is a constant
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# --- layouts: non-square grid, registers, other families -----------------------------------------------

@pytest.mark.parametrize("class_token", [True, False])
def test_non_square_grid_with_registers(class_token):
    lm = _timm_lm(img_size=(32, 48), depth=2, reg_tokens=4, class_token=class_token,
                  global_pool="token" if class_token else "avg")
    layout = lm.layout()
    assert layout.grid == (4, 6) and layout.num_prefix == (5 if class_token else 4)
    P = layout.num_prefix
    x = _blob_images(lm, 2, hw=(32, 48), region=(20, 20))
    s = SteeredViT(lm, "sift_bias", layers="all", beta=2.0)
    kb = s.key_bias(x)
    assert kb.shape == (2, P + 24) and torch.equal(kb[:, :P], torch.zeros(2, P))
    assert (kb[:, P:] != 0).any()
    got, _ = _capture(lm, s, x)
    assert got[0].shape[-1] == P + 24
    # mask every patch key: attention goes to the prefix tokens only, and stays finite
    every = SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=lambda x: torch.ones(x.shape[0], 24, dtype=bool))
    got, out = _capture(lm, every, x)
    for a in got.values():
        assert a[..., P:].max() < 1e-6
        torch.testing.assert_close(a[..., :P].sum(-1), torch.ones(a.shape[:-1]))
    assert torch.isfinite(out).all()


def test_inject_adds_to_an_existing_mask():
    add = torch.full((2, 1, 1, 3), -1.0)
    allowed = torch.tensor([[True, True, False]]).expand(3, 3)  # SDPA convention: True = attend
    args, kwargs = _inject((torch.zeros(2, 3, 8),), {"attn_mask": allowed}, "attn_mask", 1, add)
    m = kwargs["attn_mask"]
    assert m.shape == (2, 1, 3, 3) and torch.isinf(m[..., 2]).all() and (m[..., :2] == -1).all()
    args, kwargs = _inject((torch.zeros(1), torch.ones(2, 1, 1, 3)), {}, "attn_mask", 1, add)
    assert torch.equal(args[1], torch.zeros(2, 1, 1, 3)) and "attn_mask" not in kwargs
    blocked = torch.tensor([[False, True, False]]).expand(3, 3)  # MHA convention: True = blocked
    _, kwargs = _inject((), {"attn_mask": blocked}, "attn_mask", 5, add, true_means_masked=True)
    assert torch.isinf(kwargs["attn_mask"][..., 1]).all() and (kwargs["attn_mask"][..., 0] == -1).all()


def _hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_vit_steering(impl):
    tf = _hf()
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    model = tf.ViTForImageClassification._from_config(cfg, attn_implementation=impl).eval()
    lm = load_model(model, input_size=(32, 48))
    x = torch.randn(2, 3, 32, 48)
    flags = torch.zeros(24, dtype=torch.bool)
    flags[[0, 7, 23]] = True
    s = SteeredViT(lm, "mask_tokens", layers="late", token_mask_fn=_mask_fn(flags))
    base, ref = _capture(lm, lm.forward, x)
    got, out_eager = _capture(lm, s, x)
    torch.testing.assert_close(got[0], base[0], atol=1e-6, rtol=0)
    assert got[1][..., 1 + flags.nonzero().flatten()].max() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(s(x), out_eager, atol=1e-5, rtol=1e-5)  # the model's own implementation
        assert torch.equal(SteeredViT(lm, "mask_tokens", beta=0, token_mask_fn=_mask_fn(flags))(x), lm.forward(x))
    assert model.config._attn_implementation == impl and _no_hooks_left(lm)


def test_hf_dinov2_registers_steering():
    tf = _hf()
    if not hasattr(tf, "Dinov2WithRegistersModel"):
        pytest.skip("no Dinov2WithRegistersModel in this transformers")
    cfg = tf.Dinov2WithRegistersConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, mlp_ratio=2, num_register_tokens=4)
    model = tf.Dinov2WithRegistersModel._from_config(cfg, attn_implementation="sdpa").eval()
    lm = load_model(model, input_size=(28, 42))
    assert lm.layout().num_prefix == 5 and lm.layout().grid == (2, 3)
    s = SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=lambda x: torch.ones(x.shape[0], 6, dtype=bool))
    got, _ = _capture(lm, s, torch.randn(2, 3, 28, 42))
    for a in got.values():
        assert a[..., 5:].max() < 1e-6


def test_torchvision_steering():
    from torchvision.models.vision_transformer import VisionTransformer as TVViT

    model = TVViT(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: logits would all be 0
    lm = from_module(model)
    x = torch.randn(2, 3, 32, 32)
    flags = torch.zeros(16, dtype=torch.bool)
    flags[[2, 3, 15]] = True
    s = SteeredViT(lm, "mask_tokens", layers=[1, 2], token_mask_fn=_mask_fn(flags))
    base, _ = _capture(lm, lm.forward, x)
    got, out_capture = _capture(lm, s, x)
    torch.testing.assert_close(got[0], base[0], atol=1e-6, rtol=0)
    for layer in (1, 2):
        assert got[layer][..., 1 + flags.nonzero().flatten()].max() < 1e-6
    with torch.no_grad():  # MHA's own path (need_weights=False, possibly the fast path) agrees
        torch.testing.assert_close(s(x), out_capture, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(s(x), lm.forward(x), atol=1e-4)
    assert _no_hooks_left(lm)


def test_edge_mask_takes_the_most_edge_dense_patches_in_the_flagged_count():
    from siftlens.prompting import image_maps

    lm = _timm_lm()
    x = _blob_images(lm, 3)

    def fn(x):  # different counts per image, none for the last
        m = torch.zeros(x.shape[0], 64, dtype=torch.bool)
        m[0, :5], m[1, 10:12] = True, True
        return m

    st = SteeredViT(lm, "edge_mask", token_mask_fn=fn)
    mask = st.patch_bias(x) < 0
    assert mask.sum(1).tolist() == [5, 2, 0]
    edges = image_maps(x, lm, "edges")
    for i in (0, 1):
        e = torch.as_tensor(edges[i])
        assert e[mask[i]].min() >= e[~mask[i]].max()  # the k most edge-dense patches
    with pytest.raises(ValueError, match="token_mask_fn"):
        SteeredViT(lm, "edge_mask")
