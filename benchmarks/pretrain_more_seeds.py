"""Issue 15 extension: more paired seeds for random masking and the two SIFT strategies, same command as the
protocol's runs (bench_pretrain.run_one), seed-major, with a stopping time fixed before the first run.

    python benchmarks/pretrain_more_seeds.py --out benchmarks/results/pretrain/issue15 --seeds 5-14 \
        --stop-at 2026-12-01T19:45 --parallel 2

A job that has not started by --stop-at is not started; the verdict then uses the complete seeds only
(bench_pretrain --summarize-only leaves out a strategy's missing runs and says so). Finished runs are skipped,
so the command can be re-run after a kill.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_pretrain import run_one  # noqa: E402

STRATEGIES = ["random", "sift(a=-1)", "sift(a=+1)"]  # random and the protocol's best two (the default)
PRETRAIN_ARGS = ("--epochs 12 --img-size 64 --stored-size 72 --patch-size 8 --embed-dim 96 --depth 3 --heads 3 "
                 "--decoder-dim 64 --decoder-depth 1 --decoder-heads 2 --eval-every 1 --probe-train-limit 3000").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenette2-160.tar")
    ap.add_argument("--out", default="benchmarks/results/pretrain/issue15")
    ap.add_argument("--seeds", default="5-14", help="first-last, inclusive")
    ap.add_argument("--stop-at", required=True, help="UTC time after which no new run starts (ISO format)")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, help="run for every seed, in this order")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "siftlens"))
    ap.add_argument("--train-limit", type=int, default=None,
                    help="pre-train on a seeded subset of this many training images (siftlens pretrain --limit)")
    args = ap.parse_args()
    first, last = (int(s) for s in args.seeds.split("-"))
    stop = dt.datetime.fromisoformat(args.stop_at).replace(tzinfo=dt.timezone.utc)
    limit = ["--limit", str(args.train_limit)] if args.train_limit else []
    ns = argparse.Namespace(out=args.out, data=args.data,
                            pretrain_args=[*PRETRAIN_ARGS, *limit, "--cache-dir", args.cache_dir])
    jobs = [(name, seed) for seed in range(first, last + 1) for name in args.strategies]

    def job(j: tuple[str, int]) -> None:
        if dt.datetime.now(dt.timezone.utc) >= stop:
            print(f"{j[0]} seed {j[1]}: not started (past --stop-at)", flush=True)
            return
        run_one(j[0], j[1], ns, threads=1)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(job, jobs))


if __name__ == "__main__":
    main()
