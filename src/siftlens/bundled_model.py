"""The small ViT this project trained itself and ships inside the package (see MODEL_CARD.md)."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

from .preprocess import IMAGENET_MEAN, IMAGENET_STD

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_NAME = "vit_tiny_imagenette"

# Preprocessing travels with the model, timm-style (pretrained_cfg keys).
BUNDLED_CONFIG = {
    "architecture": "vit_tiny_patch16 (depth 6, dim 192, 3 heads)",
    "input_size": [3, 128, 128],
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "num_classes": 10,
}

IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
    "n03888257": "parachute",
}


def build_bundled_architecture() -> torch.nn.Module:
    """Randomly initialised architecture of the bundled model."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=BUNDLED_CONFIG["input_size"][-1],
        depth=6, num_classes=BUNDLED_CONFIG["num_classes"], dynamic_img_size=True,
    )


def load_bundled_model() -> tuple[torch.nn.Module, dict]:
    """Bundled model in eval mode and its config (preprocessing, label names, accuracy)."""
    weights = BUNDLED_DIR / f"{BUNDLED_NAME}.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"bundled model weights missing: {weights} (run scripts/train_bundled_model.py)")
    from safetensors.torch import load_file

    model = build_bundled_architecture()
    model.load_state_dict(load_file(str(weights)))
    meta = json.loads((BUNDLED_DIR / f"{BUNDLED_NAME}.json").read_text())
    return model.eval(), meta
