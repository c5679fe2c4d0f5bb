"""The shortcut suite's calibration tools: the clean-image sampler and the claimable-effect table."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from shortcut_suite import calibration_images  # noqa: E402
from shortcut_suite.claim_floor import claimable  # noqa: E402

from siftlens.spurious.causal import CausalConfig  # noqa: E402


@pytest.fixture()
def tar_source(tmp_path) -> Path:
    """A tar with train/ and val/ class folders (val: 10 images per class)."""
    root = tmp_path / "data"
    for split, n in (("train", 2), ("val", 10)):
        for c in ("cA", "cB", "cC"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / c / f"{c}_{i}.png")
    path = tmp_path / "data.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(root, arcname="data")
    return path


def _names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_calibration_images_are_a_seeded_val_sample(tar_source, tmp_path):
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        calibration_images.main(["--data", str(tar_source), "--per-class", "4", "--seed", str(seed), "--out",
                                 str(tmp_path / out)])
    a = _names(tmp_path / "a")
    assert len(a) == 12 and {n.split("/")[0] for n in a} == {"cA", "cB", "cC"}
    assert a == _names(tmp_path / "b")  # same arguments, same images
    assert a != _names(tmp_path / "c")  # another seed, another sample
    # bytes copied as they are in the archive (no re-encoding)
    src = tarfile.open(tar_source).extractfile(f"data/val/{a[0]}").read()
    assert (tmp_path / "a" / a[0]).read_bytes() == src
    calibration_images.main(["--data", str(tar_source), "--per-class", "4", "--classes", "cB", "--out",
                             str(tmp_path / "d")])
    assert {n.split("/")[0] for n in _names(tmp_path / "d")} == {"cB"}
    with pytest.raises(SystemExit, match="cZ"):
        calibration_images.main(["--data", str(tar_source), "--classes", "cZ", "--out", str(tmp_path / "e")])


def test_claimable_takes_the_causal_top_of_the_specific_significant_units():
    units = pd.DataFrame([
        # class 0: rank 1 generic, rank 2 specific + significant (claimable), rank 3 specific, larger p
        dict(cls=0, **{"class": "a"}, unit="word:1", causal_rank=1, causal_effect=0.3, causal_p=0.005, f_in=0.9,
             f_out=0.8),
        dict(cls=0, **{"class": "a"}, unit="word:2", causal_rank=2, causal_effect=0.004, causal_p=0.01, f_in=0.6,
             f_out=0.1),
        dict(cls=0, **{"class": "a"}, unit="word:3", causal_rank=3, causal_effect=0.002, causal_p=0.2, f_in=0.6,
             f_out=0.1),
        # class 1: specific but not significant -> nothing claimable
        dict(cls=1, **{"class": "b"}, unit="word:4", causal_rank=1, causal_effect=0.5, causal_p=0.3, f_in=0.7,
             f_out=0.0),
        # class 2: a negative effect is never claimable, even specific and significant
        dict(cls=2, **{"class": "c"}, unit="word:5", causal_rank=1, causal_effect=-0.01, causal_p=0.01, f_in=0.7,
             f_out=0.0),
    ])
    c = claimable(units, CausalConfig(shortcut_min_effect=-np.inf))
    assert list(c["unit"]) == ["word:2"] and c["causal_effect"].iloc[0] == 0.004
    # the floor is applied by the caller: with the default one the same unit is not a claim
    assert claimable(units, CausalConfig()).empty


def test_random_models_keep_the_shape_and_take_the_first_label_names(tmp_path):
    """random_models.py: a model file like a given one, with C outputs (the first C label names) and, on request,
    another patch / depth / width / heads and input size, that `siftlens` loads and --random-init redraws."""
    import json

    from shortcut_suite.random_models import write_model

    from siftlens.models import load_model

    like = {"timm_arch": "vit_tiny_patch16_224", "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": None, "interpolation": "bicubic", "label_names": ["a", "b", "c", "d"],
            "timm_kwargs": {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2,
                            "num_classes": 4}, "history": [{"epoch": 1}]}
    write_model(like, 2, tmp_path / "c2")
    write_model(like, 3, tmp_path / "c3", shape=(8, 1, 16, 1), size=16)
    m2 = json.loads((tmp_path / "c2" / "model.json").read_text())
    assert m2["label_names"] == ["a", "b"] and m2["timm_kwargs"]["num_classes"] == 2 and "history" not in m2
    lm = load_model(str(tmp_path / "c3" / "model.safetensors"), random_init=True, seed=5)
    assert lm.label_names == ["a", "b", "c"] and lm.preprocess.input_size == (16, 16)
    assert lm.module.num_classes == 3 and len(lm.module.blocks) == 1 and lm.module.patch_embed.patch_size == (8, 8)


def test_rank_orders_reads_the_top_unit_of_each_order():
    """rank_orders.py judges a motifs.csv's causal_rank 1 against its largest effect: the two differ where the
    rank is not the effect order (a small unit ranked first), and rows without a causal rank are left out."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "shortcut_suite"))
    from rank_orders import top_units

    motifs = pd.DataFrame({"cls": [0, 0, 0, 1, 1], "unit": ["words:1+2", "token:3", "word:7", "word:4", "word:5"],
                           "causal_rank": [2, 1, np.nan, 2, 1], "causal_effect": [0.6, 0.3, 0.9, 0.1, 0.2]})
    assert list(top_units(motifs, "causal_rank")["unit"]) == ["token:3", "word:5"]
    assert list(top_units(motifs, "largest_effect")["unit"]) == ["words:1+2", "word:5"]


def test_steering_lines_counts_the_judged_lines_of_an_eval():
    """steering_lines.py reads evaluate.py's steering lines from an eval.json: a line judged 'n/a' (headroom under
    0.15 for the +15 line) is not counted; the share is the worst-group gain over the oracle's headroom."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "shortcut_suite"))
    from steering_lines import steering_lines

    def acc(worst, balanced, train, none):
        return {"worst_group": worst, "average_balanced": balanced, "average_train_mix": train, "none": none}

    result = {"cue_located": {"method": {"rate": 1.0}},
              "flags": {"conflict_vs_rest": {}, "right_for_wrong_reason": {}},
              "accuracy": {"none": acc(0.1, 0.5, 0.9, 0.4), "oracle_tokens": acc(0.3, 0.45, 0.5, 0.4),
                           "mask_tokens": acc(0.26, 0.44, 0.47, 0.38)},
              "differences": {"mask_tokens - random_mask": {"worst_group": [0.12, 0.05, 0.2]},
                              "mask_tokens - edge_mask": {"worst_group": [0.03, -0.01, 0.08]}},
              "mask_tokens_steered_share": {"aligned": 0.5, "conflict": 0.6, "none": 0.02}}
    r = steering_lines(result)
    # 80% of headroom, +0.16, balanced -0.01, training mix -0.03 (not met), beats random, not edge
    assert (r["met"], r["judged"]) == (4, 6) and np.isclose(r["share"], 0.8)
    assert r["none_acc"] == 0.38 and r["touched_none"] == 0.02
    result["accuracy"]["oracle_tokens"]["worst_group"] = 0.2  # headroom 0.1: the +15 line is not judged
    r = steering_lines(result)
    assert (r["met"], r["judged"]) == (3, 5) and np.isclose(r["share"], 1.6)


def test_model_patch_is_read_from_the_weights_not_the_recorded_architecture(tmp_path):
    """A fine-tuned suite run's model.json records the scratch architecture (patch 8) while its weights are the
    bundled ViT/16's: the files-only judges take the patch from the patch embedding's kernel."""
    import json

    import torch
    from safetensors.torch import save_file
    from shortcut_suite.evaluate import model_patch

    for kernel in (8, 16):
        d = tmp_path / f"p{kernel}"
        d.mkdir()
        save_file({"patch_embed.proj.weight": torch.zeros(4, 3, kernel, kernel)}, str(d / "model.safetensors"))
        (d / "model.json").write_text(json.dumps({"architecture": {"patch_size": 8}}))
        assert model_patch(d) == kernel
