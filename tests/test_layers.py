"""One layer rule for every command: spurious discovery, its counterfactual scores and prompt agree."""

import pytest
import timm

from siftlens.layers import LAYER_PRESETS, resolve_layers
from siftlens.models import LoadedModel
from siftlens.preprocess import Preprocess
from siftlens.prompting import SteeredViT
from siftlens.spurious.discover import select_layers


def _lm(depth: int) -> LoadedModel:
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=depth,
                          embed_dim=8, num_heads=1, num_classes=2).eval()
    return LoadedModel(m, "timm", f"d{depth}", Preprocess((16, 16)))


@pytest.mark.parametrize("L", [2, 5, 8, 12, 32])
def test_every_command_picks_the_same_layers(L):
    lm = _lm(L)
    for preset in ("late", "middle", "early", "all", "last"):
        spurious = select_layers(L, preset)  # spurious discovery + its causal ranking
        with SteeredViT(lm, "mask_tokens", layers=preset, token_mask_fn=lambda x: None) as st:
            steered = st.layers  # prompt and the counterfactual scores (both steer through SteeredViT)
        assert spurious == steered == resolve_layers(preset, L)
        assert spurious, f"{preset} is empty for {L} layers"
    k = max(1, round(L / 3))
    assert resolve_layers("late", L) == list(range(L - k, L))
    assert sorted(resolve_layers("early", L) + resolve_layers("middle", L) + resolve_layers("late", L)) == \
        list(range(L)) or L == 2


def test_hand_cases_and_errors():
    assert resolve_layers("late", 8) == [5, 6, 7] and resolve_layers("middle", 8) == [3, 4]
    assert resolve_layers("middle", 2) == [1] and resolve_layers("early", 2) == [0]
    assert resolve_layers("none", 4) == [] and "none" in LAYER_PRESETS
    with pytest.raises(ValueError):
        select_layers(4, "none")
    with pytest.raises(ValueError, match="out of range"):  # also a ValueError: the CLI reports it in one line
        select_layers(4, [4])
