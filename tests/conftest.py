"""Benchmark code (benchmarks/planted, benchmarks/shortcut_suite) is not part of the library; the tests that
check it import it from the benchmarks folder."""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
