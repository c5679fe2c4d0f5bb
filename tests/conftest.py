"""Benchmark code (benchmarks/planted, benchmarks/shortcut_suite) is not part of the library; the tests that
check it import it from the benchmarks folder."""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny models: more threads only add synchronisation on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
