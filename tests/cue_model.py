"""A tiny ViT that learns a planted cue in seconds (shared by the causal-discovery, flag and steering tests).

32 px images, patch 8 (a 4 x 4 grid), 3 classes. Each image: smooth noise with a weak class colour tint
(the "task", learnable but noisy) and, in 95% of the training images, the class's cue: an 8 px two-colour
pattern at a class-fixed cell (class 0 at token (1, 1), class 1 at (1, 2), class 2 at (2, 1)). Test groups:
aligned (own cue), conflict (another class's cue, at that class's place), absent (no cue).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from planted.build import patch_pattern

from siftlens.models import LoadedModel
from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from siftlens.spurious.discover import DiscoveryConfig, discover_shortcuts
from siftlens.train import TrainConfig, normalize, train_classifier

CLASSES = ["ant", "bee", "cat"]
CUE_CELLS = [(1, 1), (1, 2), (2, 1)]  # (row, col) of each class's cue token
# the "straddling" variant: each cue's top-left pixel (row, col) half a token off the grid, so the cue
# covers 4 tokens and no single token holds it
STRADDLE_PX = [(12, 12), (4, 20), (20, 12)]
# the ``two_places`` variant: each cue image has the cue at CUE_CELLS[k] or, in about half of them, at this
# corner cell two tokens away (as a watermark drawn in one of two corners; SIFT finds fewer keypoints there)
SECOND_CELLS = [(3, 3), (3, 0), (0, 3)]
SIZE, PATCH = 32, 8
TINT = np.array([[40, -20, -20], [-20, 40, -20], [-20, -20, 40]], np.float32)  # class colour shift


def base_images(labels: np.ndarray, seed: int, tint_noise: float = 1.0, tint: float = 1.0) -> np.ndarray:
    """uint8 [N, 3, 32, 32]: bicubic-upsampled 4x4 colour noise plus a noisy class tint (x ``tint``)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(len(labels), 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1).numpy() * 200 + 28
    rng = np.random.default_rng(seed)
    shift = tint * TINT[labels] * rng.uniform(1 - tint_noise, 1 + tint_noise, (len(labels), 1))
    return np.clip(x + shift[:, :, None, None], 0, 255).round().astype(np.uint8)


def cue_pixels(k: int, straddle: bool = False, mirrored: bool = False) -> tuple[int, int]:
    """Top-left (row, col) pixel of class k's cue (``mirrored``: at its second place, ``SECOND_CELLS``)."""
    if straddle:
        return STRADDLE_PX[k]
    r, c = SECOND_CELLS[k] if mirrored else CUE_CELLS[k]
    return r * PATCH, c * PATCH


def cue_tokens(k: int, straddle: bool = False) -> set[int]:
    """Tokens (row-major on the 4 x 4 grid) the cue of class k covers."""
    r, c = cue_pixels(k, straddle)
    g = SIZE // PATCH
    return {(y // PATCH) * g + x // PATCH for y in (r, r + PATCH - 1) for x in (c, c + PATCH - 1)}


def plant(images: np.ndarray, cue: np.ndarray, straddle: bool = False, mirrored: np.ndarray | None = None
          ) -> np.ndarray:
    """Class ``cue[i]``'s pattern at its place in image i (cue -1: none; ``mirrored[i]``: at its second place)."""
    out = images.copy()
    for i, k in enumerate(cue):
        if k >= 0:
            r, c = cue_pixels(int(k), straddle, bool(mirrored[i]) if mirrored is not None else False)
            out[i, :, r:r + PATCH, c:c + PATCH] = patch_pattern(int(k), PATCH)
    return out


def make_data(per_class: int, seed: int, p_aligned: float = 0.95, straddle: bool = False, tint: float = 1.0,
              two_places: bool = False) -> dict:
    """Training images (cue in ``p_aligned`` of them) and paired test groups. ``two_places``: each image's cue
    at one of its class's two places (``cue_pixels``), drawn per image; ``*_mirrored`` say which."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    base = base_images(y, seed, tint=tint)
    cue = np.where(rng.random(len(y)) < p_aligned, y, -1)
    yt = np.repeat(np.arange(3), per_class // 2)
    bt = base_images(yt, seed + 1000, tint=tint)
    other = (yt + rng.integers(1, 3, len(yt))) % 3
    mirrored = rng.random(len(y)) < 0.5 if two_places else np.zeros(len(y), bool)
    test_mirrored = rng.random(len(yt)) < 0.5 if two_places else np.zeros(len(yt), bool)
    return {"train": plant(base, cue, straddle, mirrored), "y": y, "train_cue": cue, "test_y": yt,
            "test_conflict_cue": other, "aligned": plant(bt, yt, straddle, test_mirrored),
            "conflict": plant(bt, other, straddle, test_mirrored), "absent": bt,
            "train_mirrored": mirrored, "test_mirrored": test_mirrored}


def train_cue_model(data: dict, steps_epochs: int = 30, seed: int = 0) -> LoadedModel:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                              embed_dim=32, num_heads=2, num_classes=3)
    tc = TrainConfig(batch_size=32, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.1, augment="none",
                     epochs=steps_epochs, seed=seed)
    train_classifier(model, torch.from_numpy(data["train"]), torch.from_numpy(data["y"]), SIZE, IMAGENET_MEAN,
                     IMAGENET_STD, tc, log=lambda row: None)
    model.eval()
    pre = Preprocess((SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD, None, "bicubic")
    return LoadedModel(model, "timm", "tiny-cue", pre, list(CLASSES))


def random_cue_model(preprocess: Preprocess, seed: int = 1) -> LoadedModel:
    """The cue model's architecture with random weights (a model that can have learned no shortcut)."""
    import timm

    torch.manual_seed(seed)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                               embed_dim=32, num_heads=2, num_classes=3).eval()
    return LoadedModel(module, "timm", "random", preprocess, list(CLASSES))


def inputs(lm: LoadedModel, images: np.ndarray) -> torch.Tensor:
    return normalize(torch.from_numpy(images), lm.preprocess.mean, lm.preprocess.std)


def colour_cue_toy(colour_in, seed: int, config: DiscoveryConfig | None = None, with_train: bool = False):
    """The object: each class's pattern at its cell, in every image; the shortcut: the class's colour put in by
    ``colour_in(images, cue)`` in 95% of the training images. Test: aligned (own colour), conflict (another class's),
    absent (none). Yields the model, its discovery (``config``; default 16 words), the test groups' inputs and their
    labels (``with_train``: and the training inputs and labels)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 60)
    cue = np.where(rng.random(len(y)) < 0.95, y, -1)
    train = colour_in(plant(base_images(y, 0, tint=0), y), cue)
    yt = np.repeat(np.arange(3), 30)
    objects = plant(base_images(yt, 1000, tint=0), yt)
    other = (yt + rng.integers(1, 3, len(yt))) % 3
    lm = train_cue_model({"train": train, "y": y})
    res = discover_shortcuts(lm, inputs(lm, train), y, CLASSES, config or DiscoveryConfig(n_words=16))
    groups = {"aligned": colour_in(objects, yt), "conflict": colour_in(objects, other), "absent": objects}
    x = {g: inputs(lm, v) for g, v in groups.items()}
    yield (lm, res, x, yt, inputs(lm, train), y) if with_train else (lm, res, x, yt)
    torch.set_num_threads(n)
