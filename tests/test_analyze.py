"""analyze(): its contract with library callers (the numbers are checked in test_analyze_reference.py)."""

import dataclasses

import pytest

import siftlens
from siftlens.analyze import AnalyzeConfig
from tests.analyze_reference import BUNDLED, tiny_model


def test_analyze_leaves_the_callers_config_unchanged(tmp_path):
    cfg = AnalyzeConfig(batch_size=2, null_permutations=5, twin="none", workers=0, report=False, progress=False)
    before = dataclasses.asdict(cfg)
    res = siftlens.analyze(tiny_model(), images=BUNDLED, out=tmp_path / "out", config=cfg, limit=3, seed=1)
    assert dataclasses.asdict(cfg) == before  # the override (limit, seed) went to a copy
    assert res.manifest["counts"]["analysed"] == 3


def test_analyze_rejects_an_unknown_option(tmp_path):
    with pytest.raises(TypeError, match="unknown option 'batchsize'"):
        siftlens.analyze(tiny_model(), images=BUNDLED, out=tmp_path / "out", batchsize=2)
