"""A benchmark with a planted shortcut: natural images plus a class-tied synthetic cue.

METHOD.md §4 needs ground truth for shortcut discovery and attention prompting. This module builds
it from any ImageFolder source (Imagenette, CIFAR-10, a user folder; a directory or a tar):

* :func:`load_source_images` decodes a seeded, class-balanced subset to uint8 ``[N, 3, S, S]``
  (``siftlens.image_source.load_image_folder``: the listing, split names and decoding every command uses).
* :func:`apply_cue` plants a cue: ``patch`` (a small high-contrast class-specific pattern at a fixed
  position: 8x8 px at row 8, col 8 by default, i.e. exactly token (1, 1) of a patch-8 ViT; not flush
  with the corner, because SIFT finds no keypoints within ~5 px of the image border) or ``texture``
  (a border frame filled with a class-specific oriented stripe texture). It also returns the boolean
  per-pixel mask of the cue (discovery ground truth).
* :func:`build_planted_dataset` ties cue ``k`` to class ``k`` in a fraction ``p_aligned`` of the
  training images and builds test groups ``aligned`` (cue of the true class), ``absent`` (no cue) and
  ``conflict`` (the cue of another class, chosen uniformly). Every test image appears once in each group
  (a paired design: the groups differ only in the cue).
* :func:`train_planted_model` trains a small timm ViT on it with :func:`siftlens.train.train_classifier`;
  :func:`group_accuracy` reports per-group, average and worst-group accuracy.

Augmentation: the patch cue sits at a fixed pixel position, and random resized crops and flips would
move it, so the planted model is trained without geometric augmentation (``TrainConfig.augment =
"none"``; a flip would also mirror the texture stripes onto another class's orientation). The model is
meant to learn the shortcut: aligned accuracy high, conflict accuracy low.

Benchmark code, not part of the library (the commands never import it). CLI:
``python benchmarks/planted/build.py --data DATA --kind patch --seed 0 --out runs/planted_patch_s0``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from siftlens.bundled_model import IMAGENETTE_NAMES
from siftlens.image_source import SourceImages, load_image_folder
from siftlens.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from siftlens.train import TrainConfig, normalize, train_classifier

CUE_KINDS = ("patch", "texture")
GROUPS = ("aligned", "absent", "conflict")
MINORITY = ("none", "random")

# (bright, dark) colour pairs with a large luminance gap, so the cue is high-contrast in grey as well
# (SIFT runs on grey).
CUE_COLOURS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((255, 255, 255), (0, 0, 0)),
    ((255, 255, 0), (0, 0, 200)),
    ((0, 255, 255), (200, 0, 0)),
    ((255, 150, 255), (0, 100, 0)),
    ((255, 200, 0), (80, 0, 120)),
)
# Blob- and corner-like layouts: each gives SIFT keypoints inside an 8 px patch on ~82-100 % of 64 px
# Imagenette images (measured with cv2.SIFT_create defaults); thin stripes do not (23-48 %).
PATCH_SHAPES = ("quadrants", "twodots", "triangle", "checker3", "tshape", "diamond", "lshape", "square")
TEXTURE_ANGLES = (0.0, 90.0, 45.0, 135.0, 22.5, 112.5, 67.5, 157.5)  # degrees


# --------------------------------------------------------------------------------------------------
# source images


def display_name(cls: str) -> str:
    """Readable class name (Imagenette wnids map to their names; anything else is returned as is)."""
    return IMAGENETTE_NAMES.get(cls, cls)


def load_source_images(path: str | Path, split: str | None = "train", classes: Sequence[str] | int | None = None,
                       per_class: int | None = None, size: int = 64, seed: int = 0) -> SourceImages:
    """A seeded class-balanced subset of an ImageFolder source (a folder or a tar) as uint8 ``[N, 3, size, size]``:
    ``siftlens.image_source.load_image_folder`` with the centre square resized (``fit``), JPEGs decoded at a
    reduced scale (``draft``) and Imagenette display names accepted in ``classes``."""
    return load_image_folder(path, split, classes, per_class, size, seed, crop="fit", draft=True,
                             display_names=IMAGENETTE_NAMES)


# --------------------------------------------------------------------------------------------------
# cues


@dataclass(frozen=True)
class CueSpec:
    """Geometry of a cue. ``patch``: ``size`` px square with its top-left corner at ``position``
    (row, col); the default (8, 8) keeps it off the image border, where SIFT detects nothing.
    ``texture``: a border frame ``width`` px wide filled with stripes of ``period`` px.
    ``alpha``: opacity (1 = the cue replaces the pixels)."""

    kind: str = "patch"
    size: int = 8
    position: tuple[int, int] = (8, 8)
    width: int = 8
    period: float = 4.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in CUE_KINDS:
            raise ValueError(f"cue kind {self.kind!r} is not one of {CUE_KINDS}")
        if self.size < 2 or self.width < 1 or self.period < 2 or not 0 < self.alpha <= 1:
            raise ValueError(f"bad cue geometry: {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["position"] = list(self.position)
        return d


def cue_for_patch_size(kind: str, patch_size: int) -> CueSpec:
    """The default cue geometry scaled to a ViT's patch size: a patch cue exactly covering token (1, 1),
    a texture frame one token wide, stripes of half a token (the defaults are for patch 8)."""
    return CueSpec(kind=kind, size=patch_size, position=(patch_size, patch_size), width=patch_size,
                   period=patch_size / 2)


def _as_spec(kind: str | CueSpec) -> CueSpec:
    return kind if isinstance(kind, CueSpec) else CueSpec(kind=kind)


def _style(k: int, n_shapes: int) -> tuple[int, int]:
    """(shape or angle index, colour index) of class k; distinct for k < n_shapes * len(CUE_COLOURS)."""
    if not 0 <= k < n_shapes * len(CUE_COLOURS):
        raise ValueError(f"cue id {k} out of range: at most {n_shapes * len(CUE_COLOURS)} distinct cues")
    return k % n_shapes, (k % len(CUE_COLOURS) + k // n_shapes) % len(CUE_COLOURS)


def patch_pattern(k: int, size: int = 8) -> np.ndarray:
    """The patch cue of class ``k``: uint8 ``[3, size, size]``, two colours in a class-specific layout."""
    shape_i, colour_i = _style(k, len(PATCH_SHAPES))
    u = (np.arange(size)[:, None] + 0.5) / size  # rows
    v = (np.arange(size)[None, :] + 0.5) / size  # cols
    u, v = np.broadcast_arrays(u, v)
    shape = PATCH_SHAPES[shape_i]
    if shape == "quadrants":  # 2x2 checkerboard
        on = (u < 0.5) ^ (v < 0.5)
    elif shape == "twodots":  # two discs on the main diagonal
        on = ((u - 0.25) ** 2 + (v - 0.25) ** 2 < 0.04) | ((u - 0.75) ** 2 + (v - 0.75) ** 2 < 0.04)
    elif shape == "triangle":  # lower-left half
        on = u > v
    elif shape == "checker3":  # 3x3 checkerboard
        on = (np.floor(u * 3) + np.floor(v * 3)) % 2 == 0
    elif shape == "tshape":
        on = (u < 0.35) | (abs(v - 0.5) < 0.2)
    elif shape == "diamond":
        on = abs(u - 0.5) + abs(v - 0.5) < 0.35
    elif shape == "lshape":
        on = (u > 0.62) | (v < 0.38)
    else:  # square: a centred square in a frame
        on = np.maximum(abs(u - 0.5), abs(v - 0.5)) < 0.25
    bright, dark = (np.array(c, dtype=np.uint8) for c in CUE_COLOURS[colour_i])
    return np.where(on[None], bright[:, None, None], dark[:, None, None]).astype(np.uint8)


def texture_pattern(k: int, hw: tuple[int, int], period: float = 4.0, phase: float = 0.0) -> np.ndarray:
    """Class ``k``'s stripe texture over a whole ``hw`` image: uint8 ``[3, H, W]``."""
    angle_i, colour_i = _style(k, len(TEXTURE_ANGLES))
    theta = math.radians(TEXTURE_ANGLES[angle_i])
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float64) + 0.5
    on = ((xx * math.cos(theta) + yy * math.sin(theta)) / period + phase) % 1.0 < 0.5
    bright, dark = (np.array(c, dtype=np.uint8) for c in CUE_COLOURS[colour_i])
    return np.where(on[None], bright[:, None, None], dark[:, None, None]).astype(np.uint8)


def cue_region(kind: str | CueSpec, hw: tuple[int, int]) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels a cue of this kind covers (the same for every class)."""
    spec = _as_spec(kind)
    h, w = hw
    mask = np.zeros((h, w), dtype=bool)
    if spec.kind == "patch":
        r, c = spec.position
        if r < 0 or c < 0 or r + spec.size > h or c + spec.size > w:
            raise ValueError(f"patch cue at {spec.position} of size {spec.size} does not fit a {h}x{w} image")
        mask[r:r + spec.size, c:c + spec.size] = True
    else:
        if 2 * spec.width >= min(h, w):
            raise ValueError(f"texture frame width {spec.width} leaves no interior in a {h}x{w} image")
        mask[:] = True
        mask[spec.width:h - spec.width, spec.width:w - spec.width] = False
    return mask


def cue_bbox(kind: str | CueSpec, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the cue region's bounding box."""
    ys, xs = np.nonzero(cue_region(kind, hw))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def apply_cue(images: torch.Tensor, cue_ids: torch.Tensor | np.ndarray | Sequence[int], kind: str | CueSpec,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plant cue ``cue_ids[i]`` (-1: none) into ``images[i]``; returns new images and the cue masks.

    ``images``: uint8 ``[N, 3, H, W]`` (left untouched). Returns uint8 ``[N, 3, H, W]`` and bool
    ``[N, H, W]``: True exactly where a cue was drawn (all False for cue id -1). ``rng`` draws the
    texture's stripe phase per image (the patch cue is fixed).
    """
    spec = _as_spec(kind)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    ids = np.asarray(cue_ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} cue ids for {len(images)} images")
    h, w = images.shape[-2:]
    region = cue_region(spec, (h, w))
    out = images.numpy().copy()
    masks = np.zeros((len(images), h, w), dtype=bool)
    patterns: dict[int, np.ndarray] = {}
    for i, k in enumerate(ids):
        if k < 0:
            continue
        if spec.kind == "patch":
            if k not in patterns:
                full = np.zeros((3, h, w), dtype=np.uint8)
                r, c = spec.position
                full[:, r:r + spec.size, c:c + spec.size] = patch_pattern(int(k), spec.size)
                patterns[k] = full
            cue = patterns[k]
        else:
            cue = texture_pattern(int(k), (h, w), spec.period, phase=float(rng.random()))
        if spec.alpha >= 1:
            out[i][:, region] = cue[:, region]
        else:
            blend = (1 - spec.alpha) * out[i][:, region] + spec.alpha * cue[:, region].astype(np.float64)
            out[i][:, region] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
        masks[i] = region
    return torch.from_numpy(out), torch.from_numpy(masks)


# --------------------------------------------------------------------------------------------------
# dataset


@dataclass
class PlantedSplit:
    """One split of a planted benchmark. ``groups[i]`` is aligned/absent/conflict; ``cue_ids[i]`` is
    the class whose cue image i carries (-1: none); ``masks[i]`` is True on the cue's pixels;
    ``bboxes[i]`` is the cue's (x0, y0, x1, y1) box, exclusive ends (-1s when there is no cue);
    ``source_index[i]`` is the image's row in the source it was drawn from."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    groups: np.ndarray  # str [N]
    cue_ids: torch.Tensor  # int64 [N]
    masks: torch.Tensor  # bool [N, S, S]
    bboxes: torch.Tensor  # int64 [N, 4]
    source_index: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def group(self, name: str) -> PlantedSplit:
        """The samples of one group."""
        idx = np.flatnonzero(self.groups == name)
        t = torch.from_numpy(idx)
        return PlantedSplit(self.images[t], self.labels[t], self.groups[idx], self.cue_ids[t], self.masks[t],
                            self.bboxes[t], self.source_index[t])

    def save_npz(self, path: str | Path, class_names: Sequence[str] = (), recipe: dict | None = None) -> Path:
        """Compressed npz: images uint8 [N,3,S,S], labels, groups, cue_ids, masks, bboxes, source_index,
        class_names and the recipe as a JSON string."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, images=self.images.numpy(), labels=self.labels.numpy(), groups=self.groups.astype(str),
            cue_ids=self.cue_ids.numpy(), masks=self.masks.numpy(), bboxes=self.bboxes.numpy(),
            source_index=self.source_index.numpy(), class_names=np.array(list(class_names), dtype=str),
            recipe=np.array(json.dumps(recipe or {})))
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> tuple[PlantedSplit, list[str], dict]:
        """Inverse of :meth:`save_npz`: (split, class_names, recipe)."""
        with np.load(path, allow_pickle=False) as z:
            split = cls(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), z["groups"].astype(str),
                        torch.from_numpy(z["cue_ids"]), torch.from_numpy(z["masks"]),
                        torch.from_numpy(z["bboxes"]), torch.from_numpy(z["source_index"]))
            return split, [str(c) for c in z["class_names"]], json.loads(str(z["recipe"]))


@dataclass
class PlantedDataset:
    """A planted-cue benchmark: a training split and a paired test split (every test image once per
    group), the class names (source folder names) and the recipe that rebuilds it."""

    train: PlantedSplit
    test: PlantedSplit
    class_names: list[str]
    recipe: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def _bboxes(cue_ids: np.ndarray, box: tuple[int, int, int, int]) -> torch.Tensor:
    out = np.full((len(cue_ids), 4), -1, dtype=np.int64)
    out[cue_ids >= 0] = box
    return torch.from_numpy(out)


def _other_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A class != label, uniform over the other k - 1 classes, per sample."""
    return (labels + rng.integers(1, k, size=len(labels))) % k


def _split_source(source: SourceImages, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split of one source into (train rows, test rows)."""
    labels = source.labels.numpy()
    rng = np.random.default_rng([seed, 7])
    tr, te = [], []
    for c in range(len(source.class_names)):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_te = int(round(test_fraction * len(rows)))
        if n_te < 1 or n_te >= len(rows):
            raise ValueError(f"class {source.class_names[c]!r}: {len(rows)} images cannot be split "
                             f"with test_fraction={test_fraction}")
        te.append(np.sort(rows[:n_te]))
        tr.append(np.sort(rows[n_te:]))
    return np.concatenate(tr), np.concatenate(te)


def build_planted_dataset(source: SourceImages, kind: str | CueSpec = "patch", p_aligned: float = 0.95,
                          seed: int = 0, *, test_source: SourceImages | None = None, test_fraction: float = 0.25,
                          minority: str = "none") -> PlantedDataset:
    """Plant a class-tied cue into ``source``.

    Train: in each class k exactly ``round(p_aligned * n_k)`` images (chosen at random) carry cue k
    (group ``aligned``); the rest carry no cue (``minority="none"``, group ``absent``) or the cue of a
    random other class (``minority="random"``, group ``conflict``). Test: the images of
    ``test_source`` (or, when it is None, a seeded per-class ``test_fraction`` of ``source``, held out
    of training) each appear three times: with cue of their class (``aligned``), without a cue
    (``absent``) and with the cue of another class chosen uniformly (``conflict``).
    """
    spec = _as_spec(kind)
    if not 0.0 <= p_aligned <= 1.0:
        raise ValueError(f"p_aligned must be in [0, 1], got {p_aligned}")
    if minority not in MINORITY:
        raise ValueError(f"minority {minority!r} is not one of {MINORITY}")
    k = len(source.class_names)
    if k < 2:
        raise ValueError("a planted benchmark needs at least 2 classes")
    if test_source is None:
        tr_rows, te_rows = _split_source(source, test_fraction, seed)
        test_images, test_labels = source.images[te_rows], source.labels[te_rows]
        train_images, train_labels = source.images[tr_rows], source.labels[tr_rows]
    else:
        if list(test_source.class_names) != list(source.class_names):
            raise ValueError(f"test classes {test_source.class_names} differ from train classes "
                             f"{source.class_names}")
        tr_rows, te_rows = np.arange(len(source.labels)), np.arange(len(test_source.labels))
        train_images, train_labels = source.images, source.labels
        test_images, test_labels = test_source.images, test_source.labels
    if train_images.shape[-2:] != test_images.shape[-2:]:
        raise ValueError("train and test images differ in size")
    hw = tuple(train_images.shape[-2:])
    box = cue_bbox(spec, hw)
    rng = np.random.default_rng([seed, 1])

    # train
    y = train_labels.numpy()
    cue = np.full(len(y), -1, dtype=np.int64)
    for c in range(k):
        rows = np.flatnonzero(y == c)
        n_al = int(round(p_aligned * len(rows)))
        aligned = rng.permutation(rows)[:n_al]
        cue[aligned] = c
    minority_rows = np.flatnonzero(cue < 0)
    if minority == "random":
        cue[minority_rows] = _other_class(y[minority_rows], k, rng)
    groups = np.where(cue == y, "aligned", "absent" if minority == "none" else "conflict").astype("<U8")
    imgs, masks = apply_cue(train_images, cue, spec, rng)
    train = PlantedSplit(imgs, train_labels.clone(), groups, torch.from_numpy(cue), masks, _bboxes(cue, box),
                         torch.from_numpy(tr_rows.astype(np.int64)))

    # test: paired groups
    yt = test_labels.numpy()
    n = len(yt)
    cue_t = np.concatenate([yt, np.full(n, -1), _other_class(yt, k, rng)]).astype(np.int64)
    imgs_t, masks_t = apply_cue(test_images.repeat(3, 1, 1, 1), cue_t, spec, rng)
    groups_t = np.repeat(np.array(GROUPS), n)
    test = PlantedSplit(imgs_t, test_labels.repeat(3), groups_t, torch.from_numpy(cue_t), masks_t,
                        _bboxes(cue_t, box), torch.from_numpy(np.tile(te_rows.astype(np.int64), 3)))

    recipe = {
        "cue": spec.to_dict(), "p_aligned": p_aligned, "seed": seed, "minority": minority,
        "image_size": int(hw[0]), "num_classes": k, "class_names": list(source.class_names),
        "display_names": [display_name(c) for c in source.class_names],
        "test_source": "given" if test_source is not None else f"held out ({test_fraction})",
        "n_train": len(train), "n_test_per_group": n,
        "train_groups": {g: int((groups == g).sum()) for g in GROUPS},
    }
    return PlantedDataset(train, test, list(source.class_names), recipe)


# --------------------------------------------------------------------------------------------------
# model


INITS = ("scratch", "bundled")


@dataclass(frozen=True)
class PlantedModelConfig:
    """The small timm ViT trained on a planted benchmark.

    ``init="scratch"``: a timm ViT of the given shape, randomly initialised. ``init="bundled"``: the
    bundled model's architecture (patch 16, dim 192, depth 6; the shape fields are ignored) started
    from its Imagenette weights with a new head, i.e. fine-tuned, as users fine-tune pretrained ViTs.
    A model trained from scratch on a few hundred images per class learns almost nothing but the cue
    (no content to fall back on), so no inference-time fix can restore accuracy; the fine-tuned model
    is the realistic case of a shortcut learned on top of real features."""

    model_name: str = "vit_tiny_patch16_224"
    patch_size: int = 8
    depth: int = 4
    embed_dim: int = 128
    num_heads: int = 4
    init: str = "scratch"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not one of {INITS}")

    @property
    def token_size(self) -> int:
        return 16 if self.init == "bundled" else self.patch_size

    @property
    def default_image_size(self) -> int:
        """The bundled model was trained at 128 px; the small scratch ViT runs at 64 px."""
        return 128 if self.init == "bundled" else 64


def build_planted_architecture(num_classes: int, img_size: int, cfg: PlantedModelConfig = PlantedModelConfig(),
                               pretrained: bool = False) -> torch.nn.Module:
    """Planted-benchmark ViT (no network access): randomly initialised, or with ``pretrained`` and
    ``init="bundled"`` the bundled model's weights with a new ``num_classes`` head."""
    import timm

    if cfg.init == "bundled":
        from siftlens.bundled_model import build_bundled_architecture, load_bundled_model

        model = load_bundled_model()[0].train() if pretrained else build_bundled_architecture()
        model.reset_classifier(num_classes)
        return model
    return timm.create_model(cfg.model_name, pretrained=False, img_size=img_size, patch_size=cfg.patch_size,
                             depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                             num_classes=num_classes)


def default_train_config(init: str = "scratch") -> TrainConfig:
    """Training recipe of the planted model: from scratch lr 1e-3; fine-tuning the bundled model lr 2e-4
    (a larger step erases the pretrained features in the first epoch). No geometric augmentation."""
    lr = 2e-4 if init == "bundled" else 1e-3
    return TrainConfig(batch_size=64, lr=lr, weight_decay=0.05, warmup_epochs=1.0, label_smoothing=0.1,
                       augment="none")


def train_planted_model(dataset: PlantedDataset, epochs: int = 12, seed: int = 0, *,
                        model_cfg: PlantedModelConfig = PlantedModelConfig(), train_cfg: TrainConfig | None = None,
                        mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                        log: Callable[[dict], None] | None = print) -> tuple[torch.nn.Module, dict]:
    """Train a small ViT on ``dataset.train`` (no geometric augmentation; see the module docstring).

    Returns the model in eval mode and its meta dict (architecture, preprocessing, class names, recipe,
    training config and history, group accuracies on ``dataset.test``), ready for
    :func:`save_planted_model`. ``train_cfg`` overrides the defaults (its ``epochs`` and ``seed``
    are replaced by the arguments).
    """
    tc = train_cfg or default_train_config(model_cfg.init)
    tc = replace(tc, epochs=epochs, seed=seed)
    torch.manual_seed(seed)
    size = dataset.image_size
    model = build_planted_architecture(dataset.num_classes, size, model_cfg, pretrained=True)
    t0 = time.time()
    history = train_classifier(model, dataset.train.images, dataset.train.labels, size, mean, std, tc,
                               log=log or (lambda row: None))
    model.eval()
    meta = {
        "architecture": asdict(model_cfg) | {"num_classes": dataset.num_classes, "img_size": size},
        "input_size": [3, size, size], "crop_pct": None, "interpolation": "bicubic",
        "mean": list(mean), "std": list(std),
        "class_names": list(dataset.class_names),
        "display_names": [display_name(c) for c in dataset.class_names],
        "recipe": dataset.recipe,
        "train_config": asdict(tc) | {"crop_scale": list(tc.crop_scale)},
        "history": history, "train_seconds": round(time.time() - t0, 1),
        "group_accuracy": group_accuracy(model, dataset.test, mean, std),
    }
    return model, meta


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes for uint8 images ``[N, 3, S, S]`` at their own size."""
    model.eval()
    out = [model(normalize(images[i:i + batch_size], tuple(mean), tuple(std))).argmax(-1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def group_accuracy(model: torch.nn.Module, test: PlantedSplit, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> dict[str, float]:
    """Accuracy per group, ``average`` over all test samples, ``worst_group`` (min over groups present)."""
    correct = (predict(model, test.images, mean, std) == test.labels).numpy()
    out = {g: float(correct[test.groups == g].mean()) for g in GROUPS if (test.groups == g).any()}
    return out | {"average": float(correct.mean()), "worst_group": min(out.values())}


def save_planted_model(model: torch.nn.Module, meta: dict, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` (meta); returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "model.json").write_text(json.dumps(meta, indent=1))
    return path


def load_planted_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Inverse of :func:`save_planted_model`: the model in eval mode and its meta dict."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no planted model in {path} (expected model.safetensors and model.json)")
    meta = json.loads((path / "model.json").read_text())
    arch = dict(meta["architecture"])
    num_classes, img_size = arch.pop("num_classes"), arch.pop("img_size")
    model = build_planted_architecture(num_classes, img_size, PlantedModelConfig(**arch))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), meta


def planted_preprocess(meta: dict) -> Preprocess:
    """The model's preprocessing (benchmark images are already at the input size: resize, no crop)."""
    return Preprocess(tuple(meta["input_size"][1:]), tuple(meta["mean"]), tuple(meta["std"]),
                      meta.get("crop_pct"), meta.get("interpolation", "bicubic"))


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/planted/build.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder source: a folder or a tar(.gz)")
    p.add_argument("--kind", choices=CUE_KINDS, default="patch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (model.safetensors, model.json, test.npz)")
    p.add_argument("--classes", default="5", help="an int n (first n classes) or comma-separated class names")
    p.add_argument("--per-class", type=int, default=300, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class (from the val split)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="val", help="'val' and 'test' are aliases of each other")
    p.add_argument("--init", choices=INITS, default="scratch",
                   help="scratch: small ViT from random init; bundled: fine-tune the bundled Imagenette ViT")
    p.add_argument("--size", type=int, default=None, help="image size (default 64 from scratch, 128 bundled)")
    p.add_argument("--p-aligned", type=float, default=0.95)
    p.add_argument("--minority", choices=MINORITY, default="none")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    classes: Sequence[str] | int = int(a.classes) if a.classes.isdigit() else a.classes.split(",")
    model_cfg = PlantedModelConfig(init=a.init)
    size = a.size or model_cfg.default_image_size
    t0 = time.time()
    train_src = load_source_images(a.data, a.train_split, classes, a.per_class, size, a.seed)
    test_src = load_source_images(a.data, a.test_split, train_src.class_names, a.test_per_class, size, a.seed + 1)
    cue = cue_for_patch_size(a.kind, model_cfg.token_size)
    ds = build_planted_dataset(train_src, cue, a.p_aligned, a.seed, test_source=test_src, minority=a.minority)
    ds.recipe["data"] = str(a.data)
    ds.recipe["source"] = {"train_split": a.train_split, "test_split": a.test_split, "per_class": a.per_class,
                           "test_per_class": a.test_per_class, "seed": a.seed}
    load_s = time.time() - t0
    model, meta = train_planted_model(ds, a.epochs, a.seed, model_cfg=model_cfg,
                                      log=lambda row: print(json.dumps(row), flush=True))
    out = save_planted_model(model, meta, a.out)
    ds.test.save_npz(out / "test.npz", ds.class_names, ds.recipe)
    result = meta["group_accuracy"] | {"load_seconds": round(load_s, 1), "train_seconds": meta["train_seconds"]}
    (out / "group_accuracy.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
