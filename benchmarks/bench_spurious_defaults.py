"""Wall time of `siftlens spurious` with today's defaults against the defaults before held-out round 51.

    python benchmarks/bench_spurious_defaults.py --images CLASS_FOLDER [--model M] [--repeats 1]

Runs the CLI twice per repeat on the same images (the bundled model unless --model), alternating which settings go
first, one thread each, and prints each wall time and the ratio new / old measured in this run (machines here are
noisy: read the ratio, not the seconds). "old" = --words 64 --dense-words 0 --dense-set-presence any (the earlier
defaults); "new" = no options (--words 256, 64 colour-only dense words, set presence by tokens).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"old": ["--words", "64", "--dense-words", "0", "--dense-set-presence", "any"], "new": []}


def wall_seconds(images: str, model: list[str], options: list[str], out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "siftlens.cli", "spurious", *model, "--images", images, "--out", str(out),
                    "--quiet", *options], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="a class-folder image tree")
    ap.add_argument("--model", default=None, help="as `siftlens spurious --model` (default: the bundled model)")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    model = ["--model", a.model] if a.model else []
    times: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                s = wall_seconds(a.images, model, SETTINGS[name], Path(tmp) / f"{name}{r}")
                times[name].append(s)
                print(f"repeat {r} {name}: {s:.1f} s", flush=True)
    old, new = sum(times["old"]), sum(times["new"])
    print(f"new / old wall time: {new / old:.2f}x  (old {old:.1f} s, new {new:.1f} s over {a.repeats} repeat(s))")


if __name__ == "__main__":
    main()
