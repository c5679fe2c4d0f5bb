"""Per-stage profile of `siftlens analyze` (issue 14): CPU seconds per image of each stage, and where the
main process waits, with the forward pass measured with the same loader in the same run.

    python benchmarks/profile_analyze.py --model vit_tiny_imagenette --n 96
    python benchmarks/profile_analyze.py --model timm:vit_small_patch16_224 --random-init --n 64
    python benchmarks/profile_analyze.py --model timm:vit_base_patch16_224 --random-init --n 64 --batch-size 16

Two parts, both in this one process:
  stages   each stage run alone in the main process, on one batch or on all n images: decode + preprocess,
           SIFT, the other maps, forward fused (SDPA) and eager with the capture (a no-op hook), the per-layer
           reducers without and with the swap null (K = min(999, n - 1)), rollout, prepare_maps, rows +
           part writing. CPU seconds per image (process_time: all threads of this process) and wall.
  analyze  full analyze runs (report on, the defaults otherwise: swap null K = 999 capped at n - 1, twin on
           min(n, 100) images), with the library's own stage functions wrapped to time them: the swap-null
           bank pass, the main loop's wait for the DataLoader, BatchRunner.run (forward + reducers + rows),
           part writing, the twin, the merge, the report. The same with --twin none. Interleaved with
           forward-only passes with the same DataLoader (decode in workers), so the ratios come from one run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_analyze import forward_only, replicate_images  # noqa: E402

from siftlens.analyze import AnalyzeConfig, BatchRunner, ImageMapsDataset, collate, default_images  # noqa: E402
from siftlens.capture import AttentionCapture  # noqa: E402
from siftlens.image_source import find_images  # noqa: E402
from siftlens.models import load_model  # noqa: E402
from siftlens.preprocess import load_rgb  # noqa: E402
from siftlens.semantic_maps import detect_sift, keypoint_free_maps, keypoint_maps  # noqa: E402
from siftlens.stats import RolloutState, layer_statistics, prepare_maps, swap_columns  # noqa: E402

analyze_mod = importlib.import_module("siftlens.analyze")


class Clock:
    """Accumulated wall and process CPU seconds per stage name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a stage's GPU work counts in its wall time
            self.wall[name] += time.perf_counter() - w
            self.cpu[name] += time.process_time() - c


def _field(batch, key: str):
    """A collated batch's field (a dict before the issue-14 refactor, a Batch after: this script profiles both)."""
    return batch[key] if isinstance(batch, dict) else getattr(batch, key)


def stage_profile(lm, paths, batch_size: int, stats_threads: int, device: str = "cpu", kornia: bool = False,
                  null_k: int | None = None) -> dict:
    """Each stage alone in this process; seconds per image."""
    clock = Clock()
    layout, cfg = lm.layout(), AnalyzeConfig()
    map_cfg = cfg.map_config()
    n = len(paths)
    with torch_threads(1):  # the workers' work: one torch thread each, as DataLoader workers run
        with clock("decode_preprocess"):
            xs = [lm.preprocess(load_rgb(p)) for p in paths]
        grays = [lm.preprocess.to_uint8_gray(x) for x in xs]
        with clock("sift"):
            kps = [detect_sift(g, map_cfg.sift) for g in grays]
        with clock("maps_without_sift"):
            for i, (g, kp) in enumerate(zip(grays, kps)):
                other, edges = keypoint_free_maps(g, layout.grid, layout.patch_size, map_cfg)
                keypoint_maps(kp, layout.grid, layout.patch_size, map_cfg, i, edges)
    if kornia:  # SIFT on the batch on `device` (what --keypoint-detector kornia runs in the main process)
        from siftlens.keypoints_kornia import detect_sift_kornia

        g_all = torch.from_numpy(np.stack(grays)).to(device).float().div_(255.0).unsqueeze(1)
        detect_sift_kornia(g_all[:batch_size], map_cfg.sift)  # warm-up
        with clock("sift_kornia"):
            for s in range(0, n, batch_size):
                detect_sift_kornia(g_all[s:s + batch_size], map_cfg.sift)
    ds = ImageMapsDataset(paths, lm.preprocess, layout, map_cfg, 0)
    collated = collate([ds[i] for i in range(min(batch_size, n))])
    batch = {k: _field(collated, k) for k in ("n", "C", "groups", "index", "x")}
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    B = batch["n"]
    # the swap null's bank: K + 1 = n maps as analyze's bank for n <= 1000, or --null-k + 1 (999 + 1 at scale)
    n_bank = n if null_k is None else null_k + 1
    bank_ids = torch.arange(n_bank, device=device)
    bank = torch.cat([batch["C"][:, 0]] * (-(-n_bank // B)))[:n_bank]
    x_all = torch.stack(xs).to(device)
    with torch.inference_mode():
        lm.forward(x_all[:B])  # warm-up
        with clock("forward_fused"):
            for s in range(0, n, B):
                lm.forward(x_all[s:s + B])
        attn: list[torch.Tensor] = []
        with AttentionCapture(lm.module, lm.backend, lambda i, a: None):
            with clock("forward_eager_capture"):
                for s in range(0, n, B):
                    lm.forward(x_all[s:s + B])
        with AttentionCapture(lm.module, lm.backend, lambda i, a: attn.append(a.clone())):
            lm.forward(batch["x"])
        reps = -(-n // B)  # every stage below on one batch, repeated as often as n images need
        with torch_threads(stats_threads):
            with clock("prepare_maps"):
                for _ in range(reps):
                    maps = prepare_maps(batch["C"], batch["groups"], map_cfg.map_names, cfg.groups, layout.grid,
                                        layout.patch_size)
            maps_null = prepare_maps(batch["C"], batch["groups"], map_cfg.map_names, cfg.groups, layout.grid,
                                     layout.patch_size, null_bank=bank,
                                     null_keep=swap_columns(bank_ids, batch["index"]))  # as analyze does
            with clock("reducers_no_null"):
                for _ in range(reps):
                    for a in attn:
                        layer_statistics(a, layout.num_prefix, layout.cls_index, maps, ws)
            with clock("reducers_swap_null"):
                for _ in range(reps):
                    outs = [layer_statistics(a, layout.num_prefix, layout.cls_index, maps_null, ws) for a in attn]
            with clock("rollout"):
                for _ in range(reps):
                    r = RolloutState()
                    for a in attn:
                        r.update(a)
            tmp = Path(tempfile.mkdtemp(prefix="siftlens-prof-"))
            ids = batch["index"].cpu().numpy()
            with clock("rows_and_part_write"):
                for k in range(reps):
                    per_layer = [{key: v.cpu() for key, v in o.items() if key != "cls_attn"} for o in outs]
                    table = analyze_mod.rows_from_layers(per_layer, ids, map_cfg.map_names, cfg.groups)
                    part = {"skipped": [], "images": [], "table": table,
                            "lift_obs": torch.stack([o["lift_obs"].sum(0) for o in outs]).double().cpu().numpy(),
                            "lift_exp": torch.stack([o["lift_exp"].sum(0) for o in outs]).double().cpu().numpy()}
                    analyze_mod._write_part(tmp, k, part)
            shutil.rmtree(tmp, ignore_errors=True)
        # the main loop's step as analyze runs it (BatchRunner.run: forward with capture, reducers, rollout, rows)
        runner = BatchRunner(lm, layout, map_cfg.map_names, replace(cfg, device=device),
                             bank=(bank.cpu(), bank_ids.cpu()))
        runner.run(collated, paths, keep=False)  # warm-up
        with clock("batch_runner"):
            for _ in range(reps):
                runner.run(collated, paths, keep=False)
    clock.cpu["nulls"] = clock.cpu["reducers_swap_null"] - clock.cpu["reducers_no_null"]
    clock.wall["nulls"] = clock.wall["reducers_swap_null"] - clock.wall["reducers_no_null"]
    per_img = B * reps
    scale = {k: (n if k in ("decode_preprocess", "sift", "sift_kornia", "maps_without_sift", "forward_fused",
                            "forward_eager_capture") else per_img) for k in clock.cpu}
    return {k: {"cpu_ms_per_img": round(1000 * clock.cpu[k] / scale[k], 2),
                "wall_ms_per_img": round(1000 * clock.wall[k] / scale[k], 2)} for k in clock.cpu}


ws = analyze_mod.Workspace()
torch_threads = analyze_mod.torch_threads


@contextmanager
def instrumented(clock: Clock):
    """Wrap analyze's stage functions with timers (the twin's own stages count under twin only)."""
    saved = {}
    state = {"twin": False}

    def wrap(owner, name: str, label: str):
        fn = getattr(owner, name)
        saved[(owner, name)] = fn

        def timed(*a, **kw):
            if state["twin"] and label != "twin":
                return fn(*a, **kw)
            with clock(label):
                if label == "twin":
                    state["twin"] = True
                try:
                    return fn(*a, **kw)
                finally:
                    if label == "twin":
                        state["twin"] = False
        setattr(owner, name, timed)

    wrap(analyze_mod, "swap_null_bank", "null_bank_pass")
    wrap(analyze_mod, "_write_part", "part_write")
    wrap(analyze_mod, "_run_twin", "twin")
    for name in ("_plan_twin", "_start_twin_pass"):  # this branch: the twin's model and parts, before the loop
        if hasattr(analyze_mod, name):
            wrap(analyze_mod, name, "twin_setup")
    wrap(analyze_mod, "_merge_parts", "merge")
    wrap(BatchRunner, "run", "forward_reduce_rows")
    report_mod = importlib.import_module("siftlens.report")
    wrap(report_mod, "write_report", "report")

    real_loader = analyze_mod.DataLoader

    class TimedLoader(real_loader):  # the main process waiting for the next batch from the workers
        def __iter__(self):
            it = super().__iter__()
            while True:
                if state["twin"]:
                    try:
                        yield next(it)
                    except StopIteration:
                        return
                    continue
                with clock("wait_for_loader"):
                    try:
                        b = next(it)
                    except StopIteration:
                        return
                yield b

    analyze_mod.DataLoader = TimedLoader
    try:
        yield
    finally:
        analyze_mod.DataLoader = real_loader
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_imagenette")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--images", default=None, help="source images (default: bundled), cycled to --n")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keypoint-detector", default="opencv")
    ap.add_argument("--repeats", type=int, default=1, help="forward / analyze pairs, interleaved")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--null-k", type=int, default=None,
                    help="swap-null maps in the stage profile (default n - 1, as analyze; 999: at >= 1000 images)")
    ap.add_argument("--skip-runs", action="store_true", help="the stage profile only")
    args = ap.parse_args()

    load_start = os.getloadavg()
    src = find_images(args.images or default_images())
    tmp = Path(tempfile.mkdtemp(prefix="siftlens-prof-"))
    try:
        img_dir = replicate_images(src, args.n, tmp / "img")
        paths = find_images(img_dir)
        lm = load_model(args.model, random_init=args.random_init, device=args.device)
        stats_threads = max(1, torch.get_num_threads() - args.workers) if args.device == "cpu" \
            else torch.get_num_threads()
        res: dict = {"model": lm.name, "input": list(lm.preprocess.input_size), "n_images": args.n,
                     "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                     "keypoint_detector": args.keypoint_detector,
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "load_avg_at_start": [round(v, 2) for v in load_start]}
        if not args.skip_stages:
            res["stages_alone"] = stage_profile(lm, paths, args.batch_size, stats_threads, args.device,
                                                kornia=args.keypoint_detector == "kornia", null_k=args.null_k)
        runs = []
        for r in range(0 if args.skip_runs else args.repeats):
            row: dict = {}
            _, row["forward_loader_img_s"] = forward_only(lm, paths, args.batch_size, args.workers, args.device)
            for twin in ("random-init", "none"):
                clock = Clock()
                cfg = AnalyzeConfig(batch_size=args.batch_size, workers=args.workers, device=args.device,
                                    twin=twin, progress=False, keypoint_detector=args.keypoint_detector)
                out = tmp / f"out-{r}-{twin}"
                w, c = time.perf_counter(), time.process_time()
                with instrumented(clock):
                    analyze_mod.analyze(lm, img_dir, out, cfg)
                wall, cpu = time.perf_counter() - w, time.process_time() - c
                key = "twin_on" if twin != "none" else "twin_off"
                row[f"analyze_{key}_img_s"] = round(args.n / wall, 2)
                row[f"ratio_{key}_vs_forward_loader"] = round(args.n / wall / row["forward_loader_img_s"], 3)
                row[f"{key}_main_process_cpu_s"] = round(cpu, 2)
                row[f"{key}_wall_s"] = round(wall, 2)
                row[f"{key}_stages_wall_s"] = {k: round(v, 2) for k, v in clock.wall.items()}
                row[f"{key}_stages_main_cpu_s"] = {k: round(v, 2) for k, v in clock.cpu.items()}
                shutil.rmtree(out, ignore_errors=True)
            _, f2 = forward_only(lm, paths, args.batch_size, args.workers, args.device)
            row["forward_loader_img_s"] = round((row["forward_loader_img_s"] + f2) / 2, 2)  # before and after
            for key in ("twin_on", "twin_off"):
                rate = row[f"analyze_{key}_img_s"]
                row[f"ratio_{key}_vs_forward_loader"] = round(rate / row["forward_loader_img_s"], 3)
            runs.append(row)
        res["runs"] = runs
        res["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
