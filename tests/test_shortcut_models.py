"""`spurious` / `flag` / `prompt` on model shapes other than the tiny CLS ViT of tests/cue_model.py: models that
pool their patch tokens, no CLS token, deeper saved models, motifs from another model, headless models.
Tiny random-init (or seconds-trained) models built here; nothing downloads."""

from __future__ import annotations

import pytest
import torch

from siftlens.models import from_module
from siftlens.prompting import SteeredViT

timm = pytest.importorskip("timm")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2, depth=2, num_classes=3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kw", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False),
                                dict(global_pool="max", class_token=False), dict(global_pool="token"),
                                dict(global_pool="avg", reg_tokens=2)])
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
