"""Planted-cue benchmark (METHOD.md §4): data recipe, cue masks, SIFT on the cue, the shortcut is learned."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from planted.build import (
    CUE_COLOURS,
    GROUPS,
    CueSpec,
    PlantedModelConfig,
    PlantedSplit,
    SourceImages,
    apply_cue,
    build_planted_dataset,
    cue_region,
    group_accuracy,
    load_planted_model,
    load_source_images,
    main,
    patch_pattern,
    planted_preprocess,
    predict,
    save_planted_model,
    train_planted_model,
)

from siftlens.semantic_maps import detect_sift
from siftlens.train import TrainConfig

SHARED_TAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenette2-160.tar"
CLASSES = ["ant", "bee", "cat"]


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random smooth colour images: uint8 [n, 3, size, size] (bicubic upsampling of 4x4 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_source(per_class: int = 20, size: int = 32, seed: int = 0) -> SourceImages:
    images = smooth_images(per_class * len(CLASSES), size, seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    return SourceImages(images, labels, list(CLASSES))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder tree cifar10/{train,test}/<class>/NNNN.png of smooth images (lossless)."""
    root = tmp_path_factory.mktemp("src")
    for split, seed in (("train", 1), ("test", 2)):
        imgs = smooth_images(6 * len(CLASSES), 40, seed)
        for i, img in enumerate(imgs):
            d = root / "cifar10" / split / CLASSES[i % len(CLASSES)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


def test_source_from_folder_and_tar_agree(folder, tmp_path):
    a = load_source_images(folder, "train", None, 4, 32, seed=3)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.class_names == CLASSES and a.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    tar_path = tmp_path / "src.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder / "cifar10", arcname="cifar10")
    b = load_source_images(tar_path, "train", None, 4, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.class_names == b.class_names
    # val and test are aliases; classes by name; per_class=None takes everything
    c = load_source_images(tar_path, "val", ["bee", "cat"], None, 32)
    assert c.class_names == ["bee", "cat"] and len(c.labels) == 12
    d = load_source_images(folder / "cifar10" / "train", None, 2, 2, 16, seed=0)
    assert d.images.shape == (4, 3, 16, 16)
    assert not torch.equal(load_source_images(folder, "train", None, 4, 32, seed=4).images, a.images)


def test_source_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_source_images(tmp_path / "nowhere.tar", "train", None, 1)
    with pytest.raises(ValueError, match="'bee'.*fewer than per_class=7"):
        load_source_images(folder, "train", ["bee"], 7, 32)
    with pytest.raises(ValueError, match="'dog' is not in the source"):
        load_source_images(folder, "train", ["dog"], 1, 32)


def test_group_proportions_and_cue_ids():
    src = synthetic_source()
    ds = build_planted_dataset(src, "patch", p_aligned=0.8, seed=0, test_fraction=0.25)
    tr, te = ds.train, ds.test
    assert len(tr) == 45 and len(te) == 3 * 15
    for c in range(3):  # 15 train images per class -> exactly round(0.8 * 15) = 12 carry their class cue
        rows = tr.labels.numpy() == c
        assert (tr.groups[rows] == "aligned").sum() == 12 and (tr.groups[rows] == "absent").sum() == 3
    al_rows = torch.from_numpy(tr.groups == "aligned")
    assert (tr.cue_ids[al_rows] == tr.labels[al_rows]).all()
    assert (tr.cue_ids[torch.from_numpy(tr.groups == "absent")] == -1).all()
    assert ds.recipe["train_groups"] == {"aligned": 36, "absent": 9, "conflict": 0}
    # train and held-out test images do not overlap
    assert not set(tr.source_index.tolist()) & set(te.source_index.tolist())
    # paired test groups: each test image once per group
    for g in GROUPS:
        sub = te.group(g)
        assert len(sub) == 15
        assert torch.equal(sub.source_index, te.group("aligned").source_index)
    al, ab, co = te.group("aligned"), te.group("absent"), te.group("conflict")
    assert torch.equal(al.cue_ids, al.labels) and (ab.cue_ids == -1).all()
    assert (co.cue_ids != co.labels).all() and ((co.cue_ids >= 0) & (co.cue_ids < 3)).all()
    # minority "random": the non-aligned training images carry another class's cue
    ds2 = build_planted_dataset(src, "patch", p_aligned=0.8, seed=0, minority="random")
    mino = torch.from_numpy(ds2.train.groups == "conflict")
    assert mino.sum() == 9 and (ds2.train.cue_ids[mino] != ds2.train.labels[mino]).all()
    assert (ds2.train.cue_ids[mino] >= 0).all()


def test_conflict_cue_uniform_over_other_classes():
    src = SourceImages(smooth_images(3 * 200, 16, 0), torch.arange(3).repeat_interleave(200), CLASSES)
    te = build_planted_dataset(src, CueSpec("patch", position=(4, 4)), seed=1, test_fraction=0.5).test
    co = te.group("conflict")
    for c in range(3):
        cues = co.cue_ids[co.labels == c]
        counts = torch.bincount(cues, minlength=3)
        assert counts[c] == 0 and abs(counts.max().item() - counts[counts > 0].min().item()) < 35


@pytest.mark.parametrize("kind", ["patch", "texture"])
def test_masks_cover_exactly_the_cue(kind):
    src = synthetic_source()
    ds = build_planted_dataset(src, kind, p_aligned=0.9, seed=2)
    for split in (ds.train, ds.test):
        region = torch.from_numpy(cue_region(kind, (32, 32)))
        originals = src.images[split.source_index]
        for i in range(len(split)):
            k = int(split.cue_ids[i])
            if k < 0:
                assert not split.masks[i].any() and torch.equal(split.images[i], originals[i])
                assert split.bboxes[i].tolist() == [-1, -1, -1, -1]
                continue
            assert torch.equal(split.masks[i], region)
            assert torch.equal(split.images[i][:, ~region], originals[i][:, ~region])  # untouched outside
            ys, xs = torch.nonzero(region, as_tuple=True)
            assert split.bboxes[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            inside = split.images[i][:, region]
            if kind == "patch":
                assert torch.equal(inside, torch.from_numpy(patch_pattern(k)).reshape(3, -1))
            else:  # two class-specific colours only
                colours = {tuple(c) for c in inside.T.tolist()}
                assert colours <= {tuple(c) for c in CUE_COLOURS[k % len(CUE_COLOURS)]}
    if kind == "patch":
        assert int(region.sum()) == 64
    else:
        assert int(region.sum()) == 32 * 32 - 16 * 16


def test_cues_are_class_specific():
    pats = [patch_pattern(k).tobytes() for k in range(10)]
    assert len(set(pats)) == 10
    imgs = smooth_images(1, 32, 0).repeat(4, 1, 1, 1)
    out, _ = apply_cue(imgs, [0, 1, 2, 3], "texture", np.random.default_rng(0))
    assert len({out[i].numpy().tobytes() for i in range(4)}) == 4


def test_deterministic_for_a_seed():
    src = synthetic_source()
    for kind in ("patch", "texture"):
        a = build_planted_dataset(src, kind, p_aligned=0.9, seed=5)
        b = build_planted_dataset(src, kind, p_aligned=0.9, seed=5)
        c = build_planted_dataset(src, kind, p_aligned=0.9, seed=6)
        for x, y in ((a.train, b.train), (a.test, b.test)):
            assert torch.equal(x.images, y.images) and torch.equal(x.cue_ids, y.cue_ids)
            assert torch.equal(x.masks, y.masks) and (x.groups == y.groups).all()
        assert a.recipe == b.recipe
        assert not (torch.equal(a.train.images, c.train.images) and torch.equal(a.test.cue_ids, c.test.cue_ids))


def test_sift_finds_the_patch_cue():
    imgs = smooth_images(12, 64, 7)
    for k in range(10):
        out, masks = apply_cue(imgs, [k] * len(imgs), "patch", np.random.default_rng(0))
        hits = 0
        for img, m in zip(out, masks):
            gray = np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L"))
            kp = detect_sift(gray)
            inside = [m[int(y), int(x)] for x, y in kp.xy if 0 <= x < 64 and 0 <= y < 64]
            hits += any(inside)
        assert hits >= 9, f"cue {k}: SIFT keypoints inside the patch on only {hits}/12 images"


def test_tiny_model_learns_the_cue_and_round_trips(tmp_path, one_torch_thread):
    src = SourceImages(smooth_images(60, 32, 3), torch.arange(3).repeat_interleave(20), list(CLASSES))
    ds = build_planted_dataset(src, "patch", p_aligned=0.95, seed=0)
    cfg = PlantedModelConfig(depth=2, embed_dim=64, num_heads=2)
    tc = TrainConfig(batch_size=16, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.0, augment="none")
    model, meta = train_planted_model(ds, epochs=20, seed=0, model_cfg=cfg, train_cfg=tc, log=None)
    acc = meta["group_accuracy"]
    assert set(acc) == {"aligned", "absent", "conflict", "average", "worst_group"}
    assert acc["aligned"] >= 0.8 and acc["conflict"] < acc["aligned"] - 0.4, acc
    assert acc["worst_group"] == min(acc[g] for g in GROUPS)
    assert acc == group_accuracy(model, ds.test)
    assert meta["train_config"]["augment"] == "none" and meta["recipe"] == ds.recipe

    save_planted_model(model, meta, tmp_path / "m")
    model2, meta2 = load_planted_model(tmp_path / "m")
    assert meta2["class_names"] == CLASSES and meta2["input_size"] == [3, 32, 32]
    assert torch.equal(predict(model, ds.test.images), predict(model2, ds.test.images))
    pre = planted_preprocess(meta2)
    assert pre.input_size == (32, 32) and pre.crop_pct is None

    ds.test.save_npz(tmp_path / "test.npz", ds.class_names, ds.recipe)
    split, names, recipe = PlantedSplit.load_npz(tmp_path / "test.npz")
    assert names == CLASSES and recipe == ds.recipe
    assert torch.equal(split.images, ds.test.images) and torch.equal(split.masks, ds.test.masks)
    assert (split.groups == ds.test.groups).all() and torch.equal(split.cue_ids, ds.test.cue_ids)


def test_cli_on_a_folder(folder, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    res = main(["--data", str(folder), "--kind", "texture", "--out", str(out), "--classes", "bee,cat",
                "--per-class", "5", "--test-per-class", "3", "--size", "32", "--epochs", "1", "--threads", "1"])
    assert set(res) >= {"aligned", "absent", "conflict", "average", "worst_group"}
    assert (out / "model.safetensors").exists() and (out / "model.json").exists()
    split, names, recipe = PlantedSplit.load_npz(out / "test.npz")
    assert names == ["bee", "cat"] and len(split) == 18 and recipe["cue"]["kind"] == "texture"


def test_train_config_augment_is_checked():
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="mixup")


@pytest.mark.skipif(not SHARED_TAR.exists(), reason="../shared/data/imagenette2-160.tar not available")
def test_imagenette_tar_streams():
    src = load_source_images(SHARED_TAR, "val", ["tench", "n03028079"], 2, 64, seed=0)
    assert src.images.shape == (4, 3, 64, 64) and src.class_names == ["n01440764", "n03028079"]


def test_bundled_init_fine_tunes_the_bundled_weights_with_a_new_head():
    from planted.build import build_planted_architecture, cue_for_patch_size

    from siftlens.bundled_model import load_bundled_model

    cfg = PlantedModelConfig(init="bundled")
    assert cfg.token_size == 16
    model = build_planted_architecture(3, 128, cfg, pretrained=True)
    bundled = load_bundled_model()[0]
    assert model.head.out_features == 3
    assert torch.equal(model.blocks[-1].mlp.fc2.weight, bundled.blocks[-1].mlp.fc2.weight)
    fresh = build_planted_architecture(3, 128, cfg)  # what load_planted_model rebuilds before loading weights
    assert set(fresh.state_dict()) == set(model.state_dict())
    assert not torch.equal(fresh.blocks[-1].mlp.fc2.weight, bundled.blocks[-1].mlp.fc2.weight)
    assert cue_for_patch_size("patch", 8) == CueSpec("patch")  # the defaults are the patch-8 geometry
    spec = cue_for_patch_size("patch", 16)
    assert (spec.size, spec.position, spec.width, spec.period) == (16, (16, 16), 16, 8.0)
    with pytest.raises(ValueError, match="init"):
        PlantedModelConfig(init="imagenet")
