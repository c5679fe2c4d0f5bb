"""Generate the shortcut suite's planted-cue data sets (issue 11, item 4): one seeded script for all variants.

    python benchmarks/shortcut_suite/generate.py --data ../shared/data/imagenette2-160.tar \
        --split dev --settings scratch --seeds 0 --out runs/suite

Per (variant, setting, seed) it writes ``OUT/VARIANT/SETTING/s{SEED}/`` with

* ``train/CLASS/*.png``      training set: 95% of class k carries cue k (group ``aligned``), the rest none;
* ``discovery/CLASS/*.png``  other training-split images, same distribution (what ``siftlens spurious`` sees);
* ``test/CLASS/*.png``       val-split images, per class 1/3 ``aligned``, 1/3 ``conflict`` (another class's
                             cue, uniform), 1/3 ``none``;
* ``twins/CLASS/*.png``      for every aligned (and conflicting) test image, the same image without the cue
                             (aligned: scores "right for the wrong reason"; both: the cue-removed oracle);
* ``{train,discovery,test}.csv``: ``path`` (relative to the folder), ``label``, ``class_name``, ``group``,
  ``cue_class`` (-1 none), ``box_x0, box_y0, box_x1, box_y1`` (the cue's bounding box in [0, 1], x = column
  / width; -1 when none), ``region`` (box | frame | global), ``frame_width`` ([0, 1], frames only),
  ``twin_path`` (aligned and conflicting test images), ``source`` (the source image's archive member);
* ``variant.json``: the variant, its per-class cue parameters, the recipe.

The three class-folder trees are ImageFolders (``siftlens spurious --images DIR/discovery``). Images are
PNG (lossless: a twin differs from its image only inside the cue region). Test images are disjoint
across seeds: the val split of each class is permuted once (fixed seed) and cut into slots, dev seeds
0-2 take slots 0-2 and held-out seeds 100-102 slots 3-5. Same arguments -> byte-identical files.

Held-out variants are refused unless ``--frozen-commit HASH`` names the commit the method was frozen at.
A finished (variant, setting, seed) folder is skipped (it is written to a temporary folder and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from planted.build import SourceImages, display_name, load_source_images  # noqa: E402

from shortcut_suite.cues import (  # noqa: E402
    POOLS,
    VARIANTS,
    VARIANTS_BY_NAME,
    Variant,
    draw_class_params,
    mask_box,
    region_kind,
    render_cue,
)
from siftlens.image_source import find_split_dir, image_folder, list_tar_image_folder  # noqa: E402

# image size per model setting (8 x 8 tokens but scratch_p16: 6 x 6 tokens of 16 px, train.py)
SETTINGS = {"scratch": 64, "bundled": 128, "scratch_p16": 96, "scratch_d12": 64}
TEST_SLOT_PERMUTATION_SEED = 20261201  # fixed: the val split's cut into per-seed slots never changes
P_ALIGNED = 0.95


def test_slot(seed: int) -> int:
    """Which disjoint slot of the val split a seed's test set takes (dev seeds 0-2, held-out 100-102)."""
    for slot_base, pool in ((0, POOLS["dev"]), (len(POOLS["dev"].model_seeds), POOLS["heldout"])):
        if seed in pool.model_seeds:
            return slot_base + pool.model_seeds.index(seed)
    raise ValueError(f"seed {seed} is neither a dev seed {POOLS['dev'].model_seeds} nor a held-out seed "
                     f"{POOLS['heldout'].model_seeds}: test images could overlap another seed's")


def check_seed(variant: Variant, seed: int) -> None:
    if seed not in POOLS[variant.split].model_seeds:
        raise ValueError(f"seed {seed} does not belong to the {variant.split} half (its seeds: "
                         f"{POOLS[variant.split].model_seeds})")


def _member_names(data: Path, split: str, classes: list[str]) -> dict[str, list[str]]:
    """Per class, the sorted image names of a split, in load_source_images' order (for the metadata)."""
    if data.is_dir():
        files = image_folder(find_split_dir(data, split))
        return {c: [str(f) for f in files[c]] for c in classes}
    with tarfile.open(data, "r:*") as tar:
        files = list_tar_image_folder(tar, data, split)
    return {c: [m.name for m in files[c]] for c in classes}


def load_split_sources(data: Path, num_classes: int, size: int, seed: int, n_train: int, n_disc: int,
                       n_test: int) -> tuple[SourceImages, SourceImages, SourceImages, dict]:
    """(train, discovery, test) source images and the archive names they came from.

    Train and discovery: a seeded draw of n_train + n_disc training-split images per class, split in two.
    Test: slot ``test_slot(seed)`` of a fixed permutation of each class's val images."""
    both = load_source_images(data, "train", num_classes, n_train + n_disc, size, seed)
    classes = both.class_names
    names = _member_names(data, "train", classes)
    rng = np.random.default_rng([seed, 3])
    tr_rows, disc_rows, tr_names, disc_names = [], [], [], []
    picked_rng_names = {}
    for ci, c in enumerate(classes):  # the names load_source_images drew (same rule as image_source.select_per_class)
        idx = np.sort(np.random.default_rng([seed, ci]).choice(len(names[c]), n_train + n_disc, replace=False))
        picked_rng_names[c] = [names[c][i] for i in idx]
        rows = np.flatnonzero(both.labels.numpy() == ci)
        perm = rng.permutation(len(rows))
        tr_rows += list(rows[perm[:n_train]])
        disc_rows += list(rows[perm[n_train:]])
        tr_names += [picked_rng_names[c][j] for j in perm[:n_train]]
        disc_names += [picked_rng_names[c][j] for j in perm[n_train:]]
    val = load_source_images(data, "val", classes, None, size, 0)
    val_names = _member_names(data, "val", classes)
    slot = test_slot(seed)
    n_slots = len(POOLS["dev"].model_seeds) + len(POOLS["heldout"].model_seeds)
    te_rows, te_names = [], []
    for ci, c in enumerate(classes):
        rows = np.flatnonzero(val.labels.numpy() == ci)
        if len(rows) < n_slots * n_test:
            raise ValueError(f"class {c!r} has {len(rows)} val images: too few for {n_slots} disjoint test slots "
                             f"of {n_test}; lower --test-per-class")
        perm = np.random.default_rng([TEST_SLOT_PERMUTATION_SEED, ci]).permutation(len(rows))
        take = perm[slot * n_test:(slot + 1) * n_test]
        te_rows += list(rows[take])
        te_names += [val_names[c][j] for j in take]

    def sub(src: SourceImages, rows: list[int]) -> SourceImages:
        r = np.asarray(rows)
        return SourceImages(src.images[r], src.labels[r], classes)

    return (sub(both, tr_rows), sub(both, disc_rows), sub(val, te_rows),
            {"train": tr_names, "discovery": disc_names, "test": te_names})


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _row(rel: str, label: int, classes: list[str], group: str, cue_class: int, mask: np.ndarray | None,
         family: str, params: list[dict], source: str, twin: str = "") -> dict:
    box = mask_box(mask) if mask is not None else (-1.0, -1.0, -1.0, -1.0)
    region = region_kind(family) if cue_class >= 0 else ""
    width = params[cue_class]["width"] / 8 if region == "frame" else -1.0
    return {"path": rel, "label": label, "class_name": classes[label], "group": group, "cue_class": cue_class,
            "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3], "region": region,
            "frame_width": width, "twin_path": twin, "source": source}


def write_split(out: Path, name: str, src: SourceImages, groups: np.ndarray, cue_classes: np.ndarray,
                variant: Variant, params: list[dict], rng: np.random.Generator, sources: list[str],
                with_twins: bool = False) -> pd.DataFrame:
    classes = src.class_names
    rows = []
    for i in range(len(src.labels)):
        y = int(src.labels[i])
        img = src.images[i].permute(1, 2, 0).numpy()
        k = int(cue_classes[i])
        rel = f"{name}/{classes[y]}/{i:05d}.png"
        mask = None
        if k >= 0:
            img_cue, mask = render_cue(img, variant.family, params[k], rng)
        else:
            img_cue = img
        _save_png(img_cue, out / rel)
        twin = ""
        if with_twins and k >= 0:
            twin = f"twins/{classes[y]}/{i:05d}.png"
            _save_png(img, out / twin)
        rows.append(_row(rel, y, classes, str(groups[i]), k, mask, variant.family, params, sources[i], twin))
    df = pd.DataFrame(rows)
    df.to_csv(out / f"{name}.csv", index=False)
    return df


def generate_one(variant: Variant, setting: str, seed: int, data: Path, out_root: Path, num_classes: int = 5,
                 n_train: int = 200, n_disc: int = 40, n_test: int = 57,
                 sources: tuple[SourceImages, SourceImages, SourceImages, dict] | None = None) -> Path:
    """Write one (variant, setting, seed) folder (see the module docstring); returns it. ``sources``
    (train, discovery, test, names) replaces reading ``data`` (the test feeds synthetic images)."""
    check_seed(variant, seed)
    final = out_root / variant.name / setting / f"s{seed}"
    if (final / "variant.json").exists():
        return final
    size = SETTINGS[setting]
    train, disc, test, names = sources or load_split_sources(data, num_classes, size, seed, n_train, n_disc, n_test)
    classes = train.class_names
    k = len(classes)
    params = draw_class_params(variant, k)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng([variant.gen_seed, seed, 5])

    # train and discovery: exactly round(0.95 n_k) images of class k carry cue k, the rest no cue
    def training_cues(src: SourceImages) -> tuple[np.ndarray, np.ndarray]:
        y = src.labels.numpy()
        cue = np.full(len(y), -1)
        for c in range(k):
            rows = np.flatnonzero(y == c)
            cue[rng.permutation(rows)[:int(round(P_ALIGNED * len(rows)))]] = c
        return np.where(cue >= 0, "aligned", "none"), cue

    g, cue = training_cues(train)
    write_split(tmp, "train", train, g, cue, variant, params, rng, names["train"])
    g, cue = training_cues(disc)
    write_split(tmp, "discovery", disc, g, cue, variant, params, rng, names["discovery"])
    # test: per class a third of each group; conflict = the cue of another class, uniform
    yt = test.labels.numpy()
    groups = np.empty(len(yt), dtype="<U8")
    for c in range(k):
        rows = rng.permutation(np.flatnonzero(yt == c))
        for j, grp in enumerate(np.array_split(rows, 3)):
            groups[grp] = ("aligned", "conflict", "none")[j]
    other = (yt + rng.integers(1, k, size=len(yt))) % k
    cue_t = np.where(groups == "aligned", yt, np.where(groups == "conflict", other, -1))
    write_split(tmp, "test", test, groups, cue_t, variant, params, rng, names["test"], with_twins=True)
    meta = {"variant": variant.__dict__, "setting": setting, "image_size": size, "seed": seed,
            "test_slot": test_slot(seed), "class_names": classes, "display_names": [display_name(c) for c in classes],
            "class_params": params, "p_aligned": P_ALIGNED, "n_train_per_class": n_train,
            "n_discovery_per_class": n_disc, "n_test_per_class": n_test, "data": str(data)}
    (tmp / "variant.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Imagenette ImageFolder: a folder or the .tar")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("dev", "heldout"), default="dev")
    p.add_argument("--variants", nargs="*", help="variant names (default: every variant of --split)")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=["scratch"])
    p.add_argument("--seeds", nargs="+", type=int, help="default: the half's model seeds")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--discovery-per-class", type=int, default=40)
    p.add_argument("--test-per-class", type=int, default=57)
    p.add_argument("--frozen-commit", help="required for --split heldout: the commit the method was frozen at")
    a = p.parse_args(argv)
    data = Path(a.data)
    if not data.exists():
        print(f"skipped: image source {data} not found")
        return
    if a.split == "heldout" and not a.frozen_commit:
        raise SystemExit("--split heldout: refused without --frozen-commit HASH (generate the held-out half only "
                         "after the method is frozen; see benchmarks/RESULTS.md)")
    names = a.variants or [v.name for v in VARIANTS if v.split == a.split]
    variants = []
    for n in names:
        if n not in VARIANTS_BY_NAME:
            raise SystemExit(f"--variants: unknown variant {n!r}; known: {sorted(VARIANTS_BY_NAME)}")
        v = VARIANTS_BY_NAME[n]
        if v.split != a.split:
            raise SystemExit(f"--variants {n}: belongs to the {v.split} half, not --split {a.split}")
        variants.append(v)
    seeds = a.seeds or list(POOLS[a.split].model_seeds)
    for setting in a.settings:
        for seed in seeds:
            cache = None
            for v in variants:
                t0 = time.time()
                if cache is None:  # decode the source images once per (setting, seed)
                    cache = load_split_sources(data, a.classes, SETTINGS[setting], seed, a.train_per_class,
                                               a.discovery_per_class, a.test_per_class)
                out = generate_one(v, setting, seed, data, Path(a.out), a.classes, a.train_per_class,
                                   a.discovery_per_class, a.test_per_class, sources=cache)
                if a.frozen_commit:
                    meta = json.loads((out / "variant.json").read_text())
                    meta["frozen_commit"] = a.frozen_commit
                    (out / "variant.json").write_text(json.dumps(meta, indent=1))
                print(f"{out}  ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
