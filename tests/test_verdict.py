"""The report's conclusions (verdict.py) and the multiple-testing helpers behind them, on tables with a known
answer; the random-weights twin."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import false_discovery_control

from siftlens.dataset_stats import benjamini_hochberg, bh_detectable_share, significant_fraction
from siftlens.verdict import MIN_EFFECT, holm, layer_verdicts, p_diff_above, p_mean_above, verdict_sentences

MAPS = ["sift", "random_kp", "edges", "edges_sparse", "orb", "center", "uniform"]


def test_bh_equals_scipy_and_ignores_nan():
    p = np.random.default_rng(0).uniform(size=200) ** 3
    p[[3, 50]] = np.nan
    q = benjamini_hochberg(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], false_discovery_control(p[ok], method="bh"), rtol=1e-12)
    assert np.isnan(q[[3, 50]]).all()


def test_significant_fraction_is_bh_within_each_layer():
    rng = np.random.default_rng(1)
    # layer 0: many small p; layer 1: uniform p. Pooled BH would let layer 0's small p help layer 1.
    p0 = rng.uniform(0, 0.002, 100)
    p1 = np.concatenate([rng.uniform(0.0005, 0.004, 10), rng.uniform(size=90)])
    df = pd.DataFrame({"layer": np.repeat([0, 1], 100), "p": np.concatenate([p0, p1])})
    got = significant_fraction(df, "p")
    assert got.loc[0, "fraction"] == pytest.approx((false_discovery_control(p0) < 0.05).mean())
    assert got.loc[1, "fraction"] == pytest.approx((false_discovery_control(p1) < 0.05).mean())
    pooled = false_discovery_control(np.concatenate([p0, p1]))[100:]
    assert (pooled < 0.05).mean() != got.loc[1, "fraction"]  # the family matters in this case
    assert got["tests"].tolist() == [100, 100]


def test_bh_resolution_floor():
    assert bh_detectable_share(200) == pytest.approx(1 / (0.05 * 201))
    assert bh_detectable_share(0) == 1.0


def test_holm_reference_values():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02])


def test_one_sided_tests_have_the_right_direction():
    x = np.random.default_rng(2).normal(1.0, 0.1, 30)
    assert p_mean_above(x, 0.5) < 1e-6 and p_mean_above(x, 1.5) > 0.99
    assert p_diff_above(x, x - 0.5, 0.0) < 1e-6 and p_diff_above(x, x + 0.5, 0.0) > 0.99
    assert p_diff_above(x, x - 0.5, 1.0) > 0.99  # the difference (0.5) is below the minimal effect asked


def _table(effects, twin=False, n=40, heads=2, seed=0, edges_above=(), partial=0.2):
    """A per_image table with known effects per layer: S_sift − S_null = effects[layer] (+ noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for layer, e in enumerate(effects):
            for h in range(heads):
                null = 1.0 + rng.normal(0, 0.01)
                s = null + e + rng.normal(0, 0.05)
                r = {"image_id": i, "layer": layer, "head": h, "s_cls__sift": s, "s_cls_null": null,
                     "partial_spearman_sift": (0.0 if twin else partial) + rng.normal(0, 0.05),
                     "s_cls_p": rng.uniform() ** (1 + 20 * e)}
                for m in MAPS[1:-1]:
                    r[f"s_cls__{m}"] = s + (0.3 if (m == "edges" and layer in edges_above) else -0.2) \
                        + rng.normal(0, 0.05)
                r["s_cls__uniform"] = 1.0
                rows.append(r)
    return pd.DataFrame(rows)


def test_verdict_on_a_table_with_a_known_answer():
    # layer 0: real effect; 1: the twin has it too; 2: consistent but below the minimal effect;
    # 3: real effect but edges explain it better; 4: nothing
    model = _table([0.5, 0.5, 0.6 * MIN_EFFECT, 0.5, 0.0], edges_above=(3,))
    twin = _table([0.0, 0.5, 0.0, 0.0, 0.0], twin=True, n=20, seed=1)
    rows = layer_verdicts(model, "s_cls", MAPS, twin)
    assert rows["follows"].tolist() == [True, False, False, True, False]
    assert rows["specific"].tolist() == [True, False, False, False, False]
    assert rows["effect"].iloc[0] == pytest.approx(0.5, abs=0.03) and rows["effect_lo"].iloc[0] > 0.4
    assert rows["twin_effect"].iloc[1] == pytest.approx(0.5, abs=0.03)
    words = " ".join(verdict_sentences(rows, "s_cls", "swap", True))
    assert "layers 0, 3" in words and "SIFT-specific" in words and "layers 0." in words
    # without a twin, layer 1's effect is no longer explained away, and the report says the check is missing
    alone = layer_verdicts(model, "s_cls", MAPS, None)
    assert alone["follows"].tolist() == [True, True, False, True, False]
    assert "NO random-weights twin" in " ".join(verdict_sentences(alone, "s_cls", "swap", False))


def test_verdict_names_no_layer_when_model_equals_twin():
    model = _table([0.02, 0.01, 0.0, 0.03], seed=3)
    twin = _table([0.02, 0.01, 0.0, 0.03], twin=True, seed=4)
    rows = layer_verdicts(model, "s_cls", MAPS, twin)
    assert not rows["follows"].any() and not rows["specific"].any()
    assert "no layer" in verdict_sentences(rows, "s_cls", "swap", True)[0]


def test_random_init_twin_changes_every_weight_and_keeps_the_layout():
    from siftlens.models import load_model, random_init_twin

    lm = load_model()  # the bundled trained model
    a, b = random_init_twin(lm, seed=0), random_init_twin(lm, seed=0)
    c = random_init_twin(lm, seed=1)
    trained = lm.module.state_dict()
    for k, v in a.module.state_dict().items():
        torch.testing.assert_close(v, b.module.state_dict()[k])  # seeded
        if v.is_floating_point() and v.dim() >= 2:
            assert not torch.equal(v, trained[k]), k
            assert not torch.equal(v, c.module.state_dict()[k]), k
    assert a.layout() == lm.layout() and a.preprocess == lm.preprocess
    x = torch.randn(2, 3, *lm.preprocess.input_size)
    assert a.forward(x).shape == lm.forward(x).shape
    assert any(not torch.equal(p, q) for p, q in zip(lm.module.parameters(), a.module.parameters()))


def test_analyze_writes_the_twin_and_the_report_uses_it(tmp_path):
    from siftlens.analyze import analyze

    res = analyze(out=tmp_path / "run", workers=0, progress=False, null_permutations=50, twin_images=4)
    man = res.manifest
    assert man["twin"]["mode"] == "random-init" and man["twin"]["images"] == 4
    assert man["null"]["mode"] == "swap" and man["null"]["K"] == 7  # 8 bundled images: 7 others each
    twin = pd.read_parquet(tmp_path / "run" / "twin" / "per_image.parquet")
    assert twin["image_id"].nunique() == 4
    assert res.per_image["s_cls_p"].min() >= 1 / 8 - 1e-6  # resolution 1/(K+1)
    # the twin's attention barely prefers its own image's keypoints over other images'
    eff = (twin["s_cls__sift"] - twin["s_cls_null"]).abs().mean()
    own = (res.per_image["s_cls__sift"] - res.per_image["s_cls_null"]).abs().mean()
    assert eff < 0.05 < own
    html = (tmp_path / "run" / "report.html").read_text()
    assert "random-weights twin" in html and "image-swap null" in html


def test_report_verdict_table_shows_the_tests_conclusions():
    from siftlens.report import verdict_table

    model = _table([0.5, 0.0, 0.5], edges_above=(2,))
    twin = _table([0.0, 0.0, 0.0], twin=True, n=20, seed=1)
    table, words = verdict_table(model, MAPS, "s_cls", twin, "swap")
    assert table["follows SIFT"].tolist() == ["yes", "no", "yes"]
    assert table["SIFT-specific"].tolist() == ["yes", "no", "no"]
    assert table["S − null"].iloc[0].startswith("0.5") and "twin: S − null" in table
    assert "layers 0, 2" in words[0] and "layers 0." in words[1]


def test_sentences_name_only_the_baselines_the_run_compared():
    model = _table([0.5, 0.5, 0.0], edges_above=(1,), seed=5)
    twin = _table([0.0, 0.0, 0.0], twin=True, seed=6)
    every = " ".join(verdict_sentences(layer_verdicts(model, "s_cls", MAPS, twin), "s_cls", "swap", True))
    assert "random keypoints" in every and "ORB" in every and "centre prior" in every
    two = ["sift", "edges", "center", "uniform"]
    rows = layer_verdicts(model, "s_cls", two, twin)
    assert rows["specific"].tolist() == [True, False, False]  # layer 1: edges above SIFT
    words = " ".join(verdict_sentences(rows, "s_cls", "swap", True))
    assert "also beats edges and centre prior" in words
    assert "ORB" not in words and "random keypoints" not in words and "sparsity" not in words
    # no baseline at all: specificity rests on the partial correlation only, and says so
    alone = layer_verdicts(model, "s_cls", ["sift", "uniform"], twin)
    words = " ".join(verdict_sentences(alone, "s_cls", "swap", True))
    assert "No baseline map was compared" in words and "partial rank correlation" in words
    assert "edges" not in words
    # a stat without the partial correlation and without baselines claims no specificity
    s_pp = model.rename(columns=lambda c: c.replace("s_cls", "s_pp")).drop(columns="partial_spearman_sift")
    t_pp = twin.rename(columns=lambda c: c.replace("s_cls", "s_pp")).drop(columns="partial_spearman_sift")
    words = " ".join(verdict_sentences(layer_verdicts(s_pp, "s_pp", ["sift", "uniform"], t_pp), "s_pp", "swap", True))
    assert "not claimed" in words
