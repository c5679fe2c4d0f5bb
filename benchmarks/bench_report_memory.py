"""Peak memory of the report step alone (`report.write_report`) on per_image.parquet files of N and 10 N images.

    python benchmarks/bench_report_memory.py --images 2000,20000
    python benchmarks/bench_report_memory.py --images 2000,20000 --code OLD/src   # another checkout's report

A template run comes first: `analyze` of the bundled images with timm vit_base_patch16_224, random weights, at
32 x 32 px (12 layers x 12 heads, the default maps, swap null, random-weights twin of those images). Its
per_image.parquet is then replaced by a synthetic one of N images written as analyze writes its rows
(`rows_from_stacked`, one ParquetWriter, a part per 256 images, zstd): every column name of a real run; the
columns the report reads are random (S ~ 1 + noise per image, layer and head; p-values on the run's
1 / (K + 1) grid; 2% of images without SIFT statistics), the others constant (they only cost disk). The twin
keeps its own table (it is --twin-images images whatever N is).

Each report runs in a fresh subprocess; it prints its peak RSS (VmHWM, Linux) and the peak after importing the
report module, so the difference is the report's own peak. `--keep DIR` keeps the runs (their report.html) to
compare two checkouts' reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from siftlens.analyze import (
    PER_HEAD_BY_MAP,
    PER_HEAD_SCALARS,
    AnalyzeConfig,
    analyze,
    default_images,
    rows_from_stacked,
)

CHILD = r"""
import json, sys, time
import siftlens.report as report
# the high-water RSS of this process's memory since exec (ru_maxrss would keep the parent's from before exec)
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
base = rss()
t = time.perf_counter()
report.write_report(sys.argv[1])
print(json.dumps({"peak_rss_mib": round(rss(), 1), "after_import_mib": round(base, 1),
                  "report_mib": round(rss() - base, 1), "seconds": round(time.perf_counter() - t, 1),
                  "siftlens": report.__file__}))
"""


def template_run(dst: Path) -> Path:
    cfg = AnalyzeConfig(batch_size=8, workers=0, progress=False, report=False, examples=2)
    analyze("timm:vit_base_patch16_224", default_images(), dst, cfg, random_init=True, input_size=(32, 32))
    return dst


def synthetic_per_image(path: Path, n_images: int, manifest: dict, seed: int = 0, part: int = 256) -> None:
    """n_images images' rows, written part by part as analyze's merge writes them."""
    L, H = manifest["model"]["num_layers"], manifest["model"]["num_heads"]
    maps = tuple(manifest["options"]["map_names"])
    G = int(manifest["options"]["groups"])
    K = int(manifest["null"]["K"])
    rng = torch.Generator().manual_seed(seed)
    writer = None
    for start in range(0, n_images, part):
        B = min(part, n_images - start)
        shape = (L, B, H)
        zero = torch.zeros(shape)
        stacked = {k: zero for k in PER_HEAD_SCALARS}
        stacked.update({k: torch.zeros(*shape, len(maps)) for k in PER_HEAD_BY_MAP})
        stacked["lift"] = torch.zeros(*shape, G, G)
        image = torch.randn(1, B, 1, generator=rng) * 0.2
        for key in ("s_cls", "s_pp"):
            stacked[key] = 1 + image[..., None] + 0.1 * torch.randn(*shape, len(maps), generator=rng)
        for key in ("s_cls_null", "s_pp_null"):
            stacked[key] = 1 + image + 0.05 * torch.randn(shape, generator=rng)
        for key in ("s_cls_p", "s_pp_p"):
            stacked[key] = (1 + torch.randint(0, K + 1, shape, generator=rng).float()) / (K + 1)
        stacked["partial_spearman_sift"] = 0.1 * torch.randn(shape, generator=rng)
        no_kp = torch.rand(B, generator=rng) < 0.02
        for key in ("s_cls", "s_pp"):
            stacked[key][:, no_kp, :, maps.index("sift")] = float("nan")
        for key in ("partial_spearman_sift", "s_cls_p", "s_pp_p", "s_cls_null", "s_pp_null"):
            stacked[key] = stacked[key].clone()
            stacked[key][:, no_kp] = float("nan")
        table = rows_from_stacked(stacked, np.arange(start, start + B), maps, G)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="2000,20000", help="numbers of images, comma-separated")
    ap.add_argument("--code", default=None, help="src/ of another checkout whose report to measure (PYTHONPATH)")
    ap.add_argument("--keep", default=None, help="keep the runs here (one folder per size)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_"))
    root = Path(args.keep) if args.keep else tmp
    root.mkdir(parents=True, exist_ok=True)
    try:
        tpl = template_run(tmp / "template")
        manifest = json.loads((tpl / "manifest.json").read_text())
        env = dict(os.environ, **({"PYTHONPATH": str(Path(args.code).resolve())} if args.code else {}))
        res = {"load_at_start": round(os.getloadavg()[0], 1), "code": args.code or "this checkout"}
        for n in [int(v) for v in args.images.split(",")]:
            run = root / f"n{n}"
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(tpl, run)
            synthetic_per_image(run / "per_image.parquet", n, manifest)
            m = dict(manifest, counts=dict(manifest["counts"], analysed=n, rows=n * manifest["counts"]["rows"]
                                           // manifest["counts"]["analysed"]))
            (run / "manifest.json").write_text(json.dumps(m))
            out = subprocess.run([sys.executable, "-c", CHILD, str(run)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            res[n] = json.loads(out.stdout.strip().splitlines()[-1])
            res[n]["file_mib"] = round((run / "per_image.parquet").stat().st_size / 2**20, 1)
            print(json.dumps({n: res[n]}), flush=True)
        sizes = [k for k in res if isinstance(k, int)]
        res["report_mib_ratio"] = round(res[sizes[-1]]["report_mib"] / max(res[sizes[0]]["report_mib"], 1e-9), 2)
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
