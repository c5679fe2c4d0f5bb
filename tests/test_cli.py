"""cli.py: every default stated once (the parsers read the configs and entry points), ranges checked in the
configs for library callers too, and only user errors become one-line messages."""

from __future__ import annotations

import argparse

import pytest

from siftlens import cli
from siftlens.analyze import AnalyzeConfig
from siftlens.cli import build_parser
from siftlens.prompting import METHODS
from siftlens.spurious.causal import CausalConfig
from siftlens.spurious.discover import DiscoveryConfig
from siftlens.spurious.flag import run_flag
from siftlens.spurious.prompt_cli import run_prompt
from siftlens.validation import UserValueError


def _parsed(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


def test_parser_defaults_are_the_configs_defaults():
    a, d = _parsed("analyze"), AnalyzeConfig()
    for name in ("batch_size", "workers", "device", "map_mode", "weight", "groups", "null_permutations",
                 "null_mode", "twin", "twin_images", "limit", "seed", "examples", "keep_full_maps",
                 "keypoint_detector", "keypoint_cache"):
        assert a[name] == getattr(d, name), name
    assert (a["sift_nfeatures"], a["sift_sigma"], a["sift_contrast_threshold"]) == \
        (d.sift.nfeatures, d.sift.sigma, d.sift.contrast_threshold)
    s, d, c = _parsed("spurious", "--images", "x"), DiscoveryConfig(), CausalConfig()
    assert (s["layers"], s["decisive"], s["words"], s["colour_weight"], s["orientation_weight"], s["batch_size"],
            s["seed"]) == (d.layers, d.decisive, d.n_words, d.colour_weight, d.orientation_weight, d.batch_size,
                           d.seed)
    assert (s["causal_images"], s["control_budget"]) == (c.causal_images, c.control_budget)
    p = _parsed("prompt", "--images", "x")
    for name in ("method", "layers", "beta", "motifs", "labels", "batch_size", "seed"):
        assert p[name] == cli._defaults(run_prompt)[name], name
    f = _parsed("flag", "--images", "x", "--motifs", "m")
    for name in ("batch_size", "device", "top", "token_units"):
        assert f[name] == cli._defaults(run_flag)[name], name


def test_prompt_methods_come_from_the_registry():
    assert _parsed("prompt", "--images", "x", "--method", METHODS[-1])["method"] == METHODS[-1]
    with pytest.raises(SystemExit):
        _parsed("prompt", "--images", "x", "--method", "no_such_method")


def test_discovery_config_checks_the_cli_ranges_for_library_callers():
    with pytest.raises(UserValueError, match="n-words"):
        DiscoveryConfig(n_words=1)
    with pytest.raises(UserValueError, match="colour-weight"):
        DiscoveryConfig(colour_weight=-0.5)
    with pytest.raises(UserValueError, match="--decisive 'max'"):
        DiscoveryConfig(decisive="max")
    assert DiscoveryConfig(n_words=2, colour_weight=0.0).n_words == 2
    with pytest.raises(SystemExit):  # the parser applies the same range
        _parsed("spurious", "--images", "x", "--words", "1")


def _command_raising(exc: BaseException):
    def run(args: argparse.Namespace) -> int:
        raise exc
    return run


@pytest.mark.parametrize("exc", [ValueError("internal"), KeyError("k"), TypeError("t"), IndexError("i"),
                                 RuntimeError("shape mismatch in an internal matmul")])
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "_run_compare", _command_raising(exc))
    with pytest.raises(type(exc)):
        cli.main(["compare", "a", "b"])


def test_user_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run_compare", _command_raising(UserValueError("--images x: no readable image\n(2)")))
    assert cli.main(["compare", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert err == "siftlens compare: error: --images x: no readable image (2)\n"


def test_help_has_no_stale_text(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "grows" not in out and "analyze" in out and "pretrain" in out
