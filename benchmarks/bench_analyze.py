"""Throughput and memory of `siftlens analyze`, as ratios measured in one run.

    python benchmarks/bench_analyze.py --model vit_tiny_imagenette --images DIR --n 256 --workers 2
    python benchmarks/bench_analyze.py --model timm:vit_base_patch16_224 --random-init --n 64
    python benchmarks/bench_analyze.py --memory-only 32,320   # peak RSS only, whole runs at 32 and 320 images
    python benchmarks/bench_analyze.py --model timm:vit_small_patch16_224 --random-init --marginal 128,512

Prints, for the same model, images and batch size:
  forward_only_tensors  images/s of model(x) on preloaded tensors (fused attention; the hard limit)
  forward_only_loader   images/s of decode + preprocess in DataLoader workers + model(x)
  analyze               images/s of the full analyze (SIFT + baselines in workers, capture, statistics,
                        Parquet writing; report off)
  ratios                analyze / forward_only_* (goal >= 0.9 with workers >= 2)
  sift_per_core         images/s of SIFT + all baseline maps on one core, at the model's input size
  peak RSS              of the main process for n and 10*n images (goal: flat), in subprocesses

--marginal N1,N2 measures the cost of one more image at dataset scale instead: forward with the loader and
analyze (defaults: twin on min(n, 100) images, swap null; report off) at N1 and at N2 images, each in one run,
interleaved; the marginal rate is (N2 - N1) / (t(N2) - t(N1)). What a run pays once (worker start-up, the swap
null's bank pass, the twin's 100 images, the merge) cancels out; it is printed as fixed_s = t(N1) - N1 / rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from siftlens.analyze import AnalyzeConfig, analyze, default_images
from siftlens.image_source import find_images
from siftlens.models import load_model
from siftlens.preprocess import load_rgb
from siftlens.semantic_maps import MapConfig, compute_maps


def replicate_images(src: list[Path], n: int, dst: Path) -> Path:
    """n image files in dst: the first len(src) as symlinks, every further one a copy of src[i % len(src)] with a
    centre block recoloured. Why not plain repeats: analyze caches keypoints by image content (the swap null's
    bank pass hands its keypoints to the main pass), so a repeated file would get its SIFT for free and the
    benchmark would time less work than a run on n distinct images does."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = src[i % len(src)]
        if i < len(src):
            (dst / f"{i:06d}{f.suffix}").symlink_to(f.resolve())
            continue
        img = np.array(Image.open(f).convert("RGB"))
        h, w = img.shape[:2]
        img[h // 2 - 4: h // 2 + 4, w // 2 - 4: w // 2 + 4] = (37 * (i // len(src))) % 256  # another content hash
        Image.fromarray(img).save(dst / f"{i:06d}.png")
    return dst


class _Loaded(torch.utils.data.Dataset):
    def __init__(self, paths, pre):
        self.paths, self.pre = paths, pre

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.pre(load_rgb(self.paths[i]))


def forward_only(lm, paths, batch_size, workers, device) -> tuple[float, float]:
    x_all = torch.stack([lm.preprocess(load_rgb(p)) for p in paths[: max(batch_size, 64)]])
    with torch.inference_mode():
        lm.forward(x_all[:batch_size].to(device))  # warm-up
        t0, done = time.perf_counter(), 0
        while done < len(paths):
            xb = x_all[: min(batch_size, len(paths) - done)].to(device)
            lm.forward(xb)
            done += len(xb)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        tensors = len(paths) / (time.perf_counter() - t0)
        loader = DataLoader(_Loaded(paths, lm.preprocess), batch_size=batch_size, num_workers=workers,
                            prefetch_factor=4 if workers else None)
        t0 = time.perf_counter()
        for xb in loader:
            lm.forward(xb.to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        with_loader = len(paths) / (time.perf_counter() - t0)
    return tensors, with_loader


def sift_per_core(lm, paths, n=64) -> float:
    layout = lm.layout()
    grays = [lm.preprocess.to_uint8_gray(lm.preprocess(load_rgb(p))) for p in paths[:n]]
    cfg = MapConfig()
    t0 = time.perf_counter()
    for i, g in enumerate(grays):
        compute_maps(g, layout.grid, layout.patch_size, cfg, seed=i)
    return len(grays) / (time.perf_counter() - t0)


def peak_rss_run(args, n: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a fresh process analysing n images."""
    code = (
        "import resource, sys, json; from siftlens.analyze import analyze;"
        f"analyze({args.model!r}, {str(tmp / f'img{n}')!r}, {str(tmp / f'out{n}')!r}, random_init={args.random_init},"
        f" batch_size={args.batch_size}, workers={args.workers}, report=False, progress=False, examples=0);"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_only(args, sizes: list[int]) -> None:
    """Peak RSS (MiB) of fresh processes analysing each number of images (defaults otherwise, report off)."""
    src = find_images(args.images or default_images())
    tmp = Path(tempfile.mkdtemp(prefix="siftlens-bench-"))
    try:
        res = {"model": args.model, "random_init": args.random_init, "load_avg_1m_at_start": os.getloadavg()[0]}
        for n in sizes:
            replicate_images(src, n, tmp / f"img{n}")
            res[f"peak_rss_mib_{n}"] = round(peak_rss_run(args, n, tmp), 1)
        res[f"ratio_{sizes[-1]}_over_{sizes[0]}"] = round(res[f"peak_rss_mib_{sizes[-1]}"]
                                                          / res[f"peak_rss_mib_{sizes[0]}"], 3)
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def timed_analyze(lm, img_dir: Path, out: Path, cfg: AnalyzeConfig) -> float:
    t0 = time.perf_counter()
    analyze(lm, img_dir, out, cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def marginal(args, sizes: list[int]) -> None:
    """Marginal images/s of forward-with-loader and of analyze between two image counts (see the docstring)."""
    n1, n2 = sizes
    load_at_start = os.getloadavg()
    src = find_images(args.images or default_images())
    tmp = Path(tempfile.mkdtemp(prefix="siftlens-bench-"))
    try:
        lm = load_model(args.model, random_init=args.random_init, device=args.device)
        cfg = AnalyzeConfig(batch_size=args.batch_size, workers=args.workers, device=args.device,
                            report=False, progress=False, examples=0)
        fwd_s, ana_s = {}, {}
        # first-time costs (imports in the first workers, allocator growth) are paid here, outside the timing
        warm = replicate_images(src, min(n1, 2 * args.batch_size), tmp / "warm")
        timed_analyze(lm, warm, tmp / "out-warm", cfg)
        for n in (n1, n2):
            img_dir = replicate_images(src, n, tmp / f"img{n}")
            paths = find_images(img_dir)
            # the forward's best of two (the cheaper side gets the benefit of the doubt: the ratio is not flattered)
            fwd_s[n] = min(n / forward_only(lm, paths, args.batch_size, args.workers, args.device)[1]
                           for _ in range(2))
            ana_s[n] = timed_analyze(lm, img_dir, tmp / f"out{n}", cfg)
        fwd_rate = (n2 - n1) / (fwd_s[n2] - fwd_s[n1])
        ana_rate = (n2 - n1) / (ana_s[n2] - ana_s[n1])
        res = {
            "load_avg_at_start": [round(v, 2) for v in load_at_start],
            "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
            "model": lm.name, "input": list(lm.preprocess.input_size), "n_images": [n1, n2],
            "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "forward_loader_s": {n: round(v, 2) for n, v in fwd_s.items()},
            "analyze_s": {n: round(v, 2) for n, v in ana_s.items()},
            "marginal_forward_loader_img_s": round(fwd_rate, 2), "marginal_analyze_img_s": round(ana_rate, 2),
            "marginal_ratio": round(ana_rate / fwd_rate, 3),
            "whole_run_ratio": {n: round(fwd_s[n] / ana_s[n], 3) for n in (n1, n2)},
            "analyze_fixed_s": round(ana_s[n1] - n1 / ana_rate, 2),
        }
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_imagenette")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--images", default=None, help="source images (default: bundled), cycled to --n")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS at n and 10*n images")
    ap.add_argument("--memory-only", default=None, metavar="N1,N2,...",
                    help="only the peak RSS of whole analyze runs (merge included) at these image counts")
    ap.add_argument("--marginal", default=None, metavar="N1,N2",
                    help="marginal images/s between N1 and N2 images (fixed costs cancel), forward and analyze")
    args = ap.parse_args()
    if args.marginal:
        sizes = [int(v) for v in args.marginal.split(",")]
        if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
            ap.error("--marginal takes two image counts N1 < N2, e.g. 128,512")
        marginal(args, sizes)
        return
    if args.memory_only:
        memory_only(args, [int(v) for v in args.memory_only.split(",")])
        return

    load_at_start = os.getloadavg()[0]
    src = find_images(args.images or default_images())
    tmp = Path(tempfile.mkdtemp(prefix="siftlens-bench-"))
    try:
        img_dir = replicate_images(src, args.n, tmp / f"img{args.n}")
        paths = find_images(img_dir)
        lm = load_model(args.model, random_init=args.random_init, device=args.device)
        fwd_t, fwd_l = forward_only(lm, paths, args.batch_size, args.workers, args.device)
        cfg = AnalyzeConfig(batch_size=args.batch_size, workers=args.workers, device=args.device,
                            report=False, progress=False, examples=0)
        t0 = time.perf_counter()
        analyze(lm, img_dir, tmp / "out", cfg)
        ana = args.n / (time.perf_counter() - t0)
        res = {
            "load_avg_1m_at_start": round(load_at_start, 2),  # other processes on the machine change every number
            "model": lm.name, "input": list(lm.preprocess.input_size), "n_images": args.n,
            "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "forward_only_tensors_img_s": round(fwd_t, 1), "forward_only_loader_img_s": round(fwd_l, 1),
            "analyze_img_s": round(ana, 1),
            "ratio_vs_tensors": round(ana / fwd_t, 3), "ratio_vs_loader": round(ana / fwd_l, 3),
            "sift_and_baselines_img_s_per_core": round(sift_per_core(lm, paths), 1),
        }
        if args.memory:
            replicate_images(src, 10 * args.n, tmp / f"img{10 * args.n}")
            r1, r10 = peak_rss_run(args, args.n, tmp), peak_rss_run(args, 10 * args.n, tmp)
            res.update({"peak_rss_mib_1x": round(r1, 1), "peak_rss_mib_10x": round(r10, 1),
                        "rss_ratio_10x_over_1x": round(r10 / r1, 3)})
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
