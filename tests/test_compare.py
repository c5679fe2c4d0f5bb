"""`siftlens compare` on two tiny runs, and the difference test on synthetic tables."""

import numpy as np
import pandas as pd
import pytest

from siftlens.cli import main
from siftlens.compare import difference_by_layer

ARGS = ["--random-init", "--input-size", "64", "64", "--batch-size", "4", "--workers", "0", "--quiet",
        "--null-permutations", "20", "--no-report", "--twin", "none"]


def synthetic(shift=0.0, n=60, seed=0, paths=None):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for layer in range(3):
            for head in range(2):
                rows.append({"image_id": i, "path": paths[i] if paths else f"img{i}.jpg", "layer": layer,
                             "head": head, "s_cls__sift": 1 + 0.1 * layer + shift * (layer == 2) + rng.normal(0, .2)})
    return pd.DataFrame(rows)


def test_difference_detects_a_shift_in_one_layer():
    a, b = synthetic(0.0, seed=0), synthetic(0.5, seed=1)
    diff, paired = difference_by_layer(a, b, "s_cls__sift")
    assert paired
    assert diff.loc[2, "lo"] > 0.3 and diff.loc[2, "p"] < 0.01
    assert abs(diff.loc[0, "diff"]) < 0.1 and diff.loc[0, "hi"] - diff.loc[0, "lo"] < 0.2


def test_difference_unpaired_when_images_differ():
    a = synthetic(0.0, seed=0)
    b = synthetic(0.5, seed=1, paths=[f"other{i}.jpg" for i in range(60)])
    diff, paired = difference_by_layer(a, b, "s_cls__sift")
    assert not paired and diff.loc[2, "lo"] > 0.2


@pytest.mark.parametrize("model_b", ["timm:vit_tiny_patch16_224", "timm:vit_small_patch16_224"])
def test_compare_cli(tmp_path, capsys, model_b):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--out", str(a), "--limit", "4", *ARGS]) == 0
    assert main(["analyze", "--model", model_b, "--seed", "1", "--out", str(b), "--limit", "4", *ARGS]) == 0
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 0
    html = (tmp_path / "c" / "compare.html").read_text()
    assert "data:image/png;base64," in html and "Paired by image" in html
    table = pd.read_csv(tmp_path / "c" / "compare.csv")
    assert len(table) == 12 and {"diff", "lo", "hi", "p", "A", "B"} <= set(table.columns)


def test_compare_matches_an_independent_computation_and_rejects_a_bad_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--out", str(a), "--limit", "3", *ARGS]) == 0
    assert main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--seed", "7", "--out", str(b), "--limit", "3",
                 *ARGS]) == 0
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 0
    table = pd.read_csv(tmp_path / "c" / "compare.csv")
    # reference: per image and layer, mean over heads; B − A per image (same images), then mean over images
    ra, rb = (pd.read_parquet(r / "per_image.parquet").groupby(["path", "layer"])["s_cls__sift"].mean()
              if "path" in pd.read_parquet(r / "per_image.parquet").columns else
              pd.read_parquet(r / "per_image.parquet").groupby(["image_id", "layer"])["s_cls__sift"].mean()
              for r in (a, b))
    ref = (rb - ra).groupby(level="layer").mean()
    np.testing.assert_allclose(table["diff"].to_numpy(), ref.to_numpy(), rtol=1e-5)
    assert (table["diff"].abs() > 1e-4).any()  # two different random models: not a self-comparison
    assert main(["compare", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "not a finished" in capsys.readouterr().err
