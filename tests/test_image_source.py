"""image_source: one listing / split / label / decode rule for every command, with the pixels each caller got
before the module existed (reference decoders written out here from the code it replaced)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from siftlens.analyze import default_images
from siftlens.image_source import (
    HELD_OUT_SPLITS,
    class_folder,
    decode_square,
    find_images,
    find_split_dir,
    image_folder,
    load_image_folder,
    read_labels,
    read_model_input,
    split_aliases,
)
from siftlens.models import load_model
from siftlens.preprocess import load_rgb
from siftlens.pretrain.data import load_pretrain_data
from siftlens.validation import UserValueError

CLASSES = ("n01440764", "n02102040", "zebra")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ds/{train,val}/<class>/ of crops of the bundled photos (JPEG and PNG), and ds.tar of it."""
    root = tmp_path_factory.mktemp("src")
    photos = sorted(Path(default_images()).glob("*.jpg"))
    for split, n in (("train", 4), ("val", 2)):
        for ci, cls in enumerate(CLASSES):
            d = root / "ds" / split / cls
            d.mkdir(parents=True)
            for j in range(n):
                im = Image.open(photos[(ci * 3 + j) % len(photos)]).convert("RGB")
                w, h = im.size
                im = im.crop((j * 7, ci * 5, w - j * 3, h - ci * 2))  # every image a different aspect ratio
                im.save(d / f"img{j}.png") if j % 2 else im.save(d / f"img{j}.jpg", quality=90)
    with tarfile.open(root / "ds.tar", "w") as tf:
        tf.add(root / "ds", arcname="ds")
    return root


# the decoders the module replaced, written out: planted.py (draft + ImageOps.fit), train.load_image_folder
# (ImageOps.fit, full decode) and pretrain/data.py (resize the short side, then crop the centre)
def _fit_reference(path: Path, size: int, draft: bool) -> np.ndarray:
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageOps.fit(im, (size, size), Image.BICUBIC)
    return np.asarray(im).transpose(2, 0, 1)


def _resize_crop_reference(path: Path, size: int) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def _reference_split(tree: Path, split: str, size: int, draft: bool) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for ci, cls in enumerate(CLASSES):
        for f in sorted((tree / "ds" / split / cls).iterdir()):
            xs.append(_fit_reference(f, size, draft))
            ys.append(ci)
    return np.stack(xs), np.array(ys)


@pytest.mark.parametrize("draft", [True, False])
def test_folder_and_tar_decode_to_the_same_pixels_as_before(tree, draft):
    ref_x, ref_y = _reference_split(tree, "train", 40, draft)
    for src in (tree / "ds", tree / "ds.tar"):
        got = load_image_folder(src, "train", size=40, crop="fit", draft=draft)
        assert got.class_names == list(CLASSES)
        np.testing.assert_array_equal(got.images.numpy(), ref_x)
        np.testing.assert_array_equal(got.labels.numpy(), ref_y)
    # draft changes the pixels of a JPEG larger than twice the size: the option is not a no-op
    jpg = tree / "ds" / "train" / CLASSES[0] / "img0.jpg"
    assert not np.array_equal(_fit_reference(jpg, 40, True), _fit_reference(jpg, 40, False))


def test_seeded_class_subset_and_display_names(tree):
    a = load_image_folder(tree / "ds", "train", ["tench", "zebra"], per_class=2, size=24, seed=3,
                          display_names={"n01440764": "tench"})
    b = load_image_folder(tree / "ds.tar", "train", ["n01440764", "zebra"], per_class=2, size=24, seed=3)
    assert a.class_names == b.class_names == ["n01440764", "zebra"]
    np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())
    np.testing.assert_array_equal(a.labels.numpy(), [0, 0, 1, 1])
    # the draw is the seeded one: rng([seed, class index]).choice without replacement, in file order
    files = sorted((tree / "ds" / "train" / "zebra").iterdir())
    idx = np.sort(np.random.default_rng([3, 1]).choice(len(files), size=2, replace=False))
    ref = np.stack([_fit_reference(files[i], 24, True) for i in idx])
    np.testing.assert_array_equal(a.images.numpy()[2:], ref)
    with pytest.raises(ValueError, match="fewer than per_class"):
        load_image_folder(tree / "ds", "val", per_class=3, size=24)
    with pytest.raises(ValueError, match="'nope' is not in the source"):
        load_image_folder(tree / "ds", "val", ["nope"], size=24)


def test_split_aliases_one_rule(tree, tmp_path):
    assert split_aliases("train") == ["train"]
    for s in HELD_OUT_SPLITS:
        assert split_aliases(s)[0] == s and sorted(split_aliases(s)) == sorted(HELD_OUT_SPLITS)
    # a source that calls its held-out split "test" (CIFAR) or "validation" is found under "val", and back
    for name in ("test", "validation"):
        d = tmp_path / name
        (d / "data" / name / "a").mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(d / "data" / name / "a" / "x.png")
        assert find_split_dir(d / "data", "val") == d / "data" / name
        assert find_split_dir(d, "val") == d / "data" / name  # one level down
        assert find_split_dir(d, "val", nested=False) is None
        assert load_image_folder(d, "val", size=8).class_names == ["a"]
    assert find_split_dir(tree / "ds", "test") == tree / "ds" / "val"
    assert find_split_dir(tree / "ds", "train") == tree / "ds" / "train"
    vt = load_image_folder(tree / "ds.tar", "test", size=16)  # the tar has val/: "test" finds it
    np.testing.assert_array_equal(vt.images.numpy(), load_image_folder(tree / "ds", "val", size=16).images.numpy())
    with pytest.raises(FileNotFoundError, match="no split folder 'train'"):
        load_image_folder(tmp_path / "test", "train", size=8)


def test_class_labels_first_folder_under_the_root(tree, tmp_path):
    root = tree / "ds" / "train"
    files = find_images(root)
    assert len(files) == 12 and files == sorted(files)
    assert [class_folder(f, root) for f in files] == [c for c in CLASSES for _ in range(4)]
    assert class_folder(root / "x.jpg", root) is None
    assert list(image_folder(root)) == list(CLASSES)
    y, classes = read_labels(files, None, root)
    assert classes == list(CLASSES) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(UserValueError, match="no class folder"):
        flat = tree / "ds" / "train" / CLASSES[0]
        read_labels(find_images(flat), None, flat)
    # a CSV overrides the folders (by path or by file name)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{f.name if i % 2 else f},{'odd' if i % 3 else 'even'}\n"
                                            for i, f in enumerate(files[:3])))
    y, classes = read_labels(files[:3], str(csv), None)
    assert classes == ["even", "odd"] and y.tolist() == [0, 1, 1]
    # integer CSV labels are class indices: numeric order ("2" before "10"), not string order
    csv.write_text("path,label\n" + "".join(f"{f},{lab}\n" for f, lab in zip(files[:4], [10, 2, 2, 0])))
    y, classes = read_labels(files[:4], str(csv), None)
    assert classes == ["0", "2", "10"] and y.tolist() == [2, 1, 1, 0]
    # class folders keep torchvision ImageFolder's string order, which models trained with it learned
    for name in ("2", "10"):
        (tmp_path / "num" / name).mkdir(parents=True)
        shutil.copy(files[0], tmp_path / "num" / name / ("a" + files[0].suffix))
    num = find_images(tmp_path / "num")
    y, classes = read_labels(num, None, tmp_path / "num")
    assert classes == ["10", "2"] and sorted(y.tolist()) == [0, 1]


def test_symlinked_class_folders_are_listed_once(tree, tmp_path):
    # a subset made of links to class folders (as torchvision's ImageFolder reads it); a link cycle ends
    root = tree / "ds" / "train"
    sub = tmp_path / "subset"
    sub.mkdir()
    for c in CLASSES[:2]:
        (sub / c).symlink_to(root / c, target_is_directory=True)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "back").symlink_to(tmp_path / "extra", target_is_directory=True)
    files = find_images(sub)
    assert len(files) == 8 and len({f.resolve() for f in files}) == 8
    assert list(image_folder(sub)) == list(CLASSES[:2])
    y, classes = read_labels(files, None, sub)
    assert classes == list(CLASSES[:2]) and y.tolist() == [0] * 4 + [1] * 4
    shutil.copy(files[0], tmp_path / "extra" / files[0].name)
    assert len(find_images(tmp_path / "extra")) == 1  # extra/back -> extra is not walked twice


def test_pretrain_decodes_resize_then_crop(tree):
    d = load_pretrain_data(tree / "ds", 32, val_fraction=0)
    ref_x = np.stack([_resize_crop_reference(f, 32) for f in find_images(tree / "ds" / "train")])
    ref_v = np.stack([_resize_crop_reference(f, 32) for f in find_images(tree / "ds" / "val")])
    np.testing.assert_array_equal(d.train.numpy(), ref_x)
    np.testing.assert_array_equal(d.val.numpy(), ref_v)
    assert d.classes == list(CLASSES) and d.val_source == "held-out split"
    assert d.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.val_labels.tolist() == [0] * 2 + [1] * 2 + [2] * 2
    # the two crops give different pixels (each caller keeps its own)
    differ = [not np.array_equal(decode_square(f, 32, "fit", draft=False), _resize_crop_reference(f, 32))
              for f in find_images(tree / "ds" / "train")]
    assert sum(differ) >= len(differ) // 2


def test_model_input_is_the_models_preprocessing(tree):
    lm = load_model("vit_tiny_imagenette")
    f = find_images(tree / "ds" / "val")[0]
    torch.testing.assert_close(read_model_input(lm, f), lm.preprocess(load_rgb(f)), rtol=0, atol=0)
    assert tuple(read_model_input(lm, f).shape) == (3, *lm.preprocess.input_size)


def test_tar_member_errors_name_the_member(tmp_path):
    bad = tmp_path / "bad.tar"
    (tmp_path / "s" / "train" / "a").mkdir(parents=True)
    (tmp_path / "s" / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with tarfile.open(bad, "w") as tf:
        tf.add(tmp_path / "s", arcname="s")
    with pytest.raises(UserValueError, match=r"bad\.tar:s/train/a/x\.jpg: not a readable image"):
        load_image_folder(bad, "train", size=8)
