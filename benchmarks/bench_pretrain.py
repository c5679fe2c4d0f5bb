"""Time-to-target benchmark for SIFT-guided MAE pre-training (issue 6, METHOD.md §5).

Runs `siftlens pretrain` for every strategy x seed (same model, data, schedule; only the masking
differs), then prints, per strategy: final kNN / linear-probe accuracy (mean ± std over seeds, the
paired difference to random masking with a 95% t-interval), the epoch and the training wall time
at which it first reaches random masking's final kNN accuracy (mean over seeds), their ratios to
random's, and the guidance overhead. Writes summary.json, summary.md, curves.png, report.html.

    python benchmarks/bench_pretrain.py --data ../shared/data/imagenette2-160.tar \\
        --out benchmarks/results/pretrain/cpu64 --seeds 0 1 2 --parallel 2 -- --epochs 20

Issue 15's verdict (``protocol_table``): with ``--eval-every 1`` every run logs each validation image's probe
outcome every epoch; epochs to 95% of random's final accuracy and the curve area are compared to random with
bootstrap CIs over paired seeds and images, Bonferroni-corrected over the table (protocol_curves.png).

Runs already finished are reused, unfinished ones resume: run the same command again after a
crash. Wall times are training time only (evaluation excluded) and are comparable only between
runs on the same machine under the same load (``--parallel`` runs share the CPU).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

STRATEGIES = {
    "random": ["--masking", "random"],
    "sift(a=+1)": ["--masking", "sift", "--alpha", "1"],
    "sift(a=-1)": ["--masking", "sift", "--alpha", "-1"],
    "sift-curriculum(-1->+1)": ["--masking", "sift-curriculum", "--alpha-start", "-1", "--alpha", "1"],
    "edge(a=+1)": ["--masking", "edge", "--alpha", "1"],
    "edge(a=-1)": ["--masking", "edge", "--alpha", "-1"],
    "edge-matched(a=+1)": ["--masking", "edge-matched", "--alpha", "1"],
    "edge-matched(a=-1)": ["--masking", "edge-matched", "--alpha", "-1"],
    "sift(a=+1)+kamim(g=1)": ["--masking", "sift", "--alpha", "1", "--loss-gamma", "1"],
    "random+kamim(g=1)": ["--masking", "random", "--loss-gamma", "1"],
    "random(2x)": ["--masking", "random"],  # the reference for "how much is half": twice the epochs
    "attmask-high": ["--masking", "attmask-high"],  # the published anchor: mask what the encoder's CLS attends
}
EPOCH_SCALE = {"random(2x)": 2}  # strategies trained for a multiple of the benchmark's --epochs
DEFAULT = ["random", "sift(a=+1)", "sift(a=-1)", "sift-curriculum(-1->+1)", "edge(a=+1)"]


def slug(name: str) -> str:
    name = name.replace("+", "p").replace("->", "to").replace("-", "m")  # keep a=+1 and a=-1 apart
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def out_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return Path(args.out) / "runs" / f"{slug(name)}-seed{seed}"


def run_one(name: str, seed: int, args: argparse.Namespace, threads: int) -> Path:
    out = out_dir(args, name, seed)
    if (out / "encoder.json").exists():
        return out
    cmd = [sys.executable, "-m", "siftlens", "pretrain", "--data", args.data, "--out", str(out),
           "--seed", str(seed), "--threads", str(threads), "--quiet", *STRATEGIES[name], *args.pretrain_args]
    if name in EPOCH_SCALE:  # the last --epochs wins
        cmd += ["--epochs", str(EPOCH_SCALE[name] * _epochs(args.pretrain_args))]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(out / "stdout.log", "a") as log:
        t0 = time.time()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"{name} seed {seed}: rc {rc} in {time.time() - t0:.0f} s -> {out}", flush=True)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {rc}); see {out}/stdout.log")
    return out


def _epochs(pretrain_args: list[str]) -> int:
    """The --epochs among the arguments passed to every run (siftlens pretrain's default if absent)."""
    if "--epochs" in pretrain_args:
        return int(pretrain_args[len(pretrain_args) - 1 - pretrain_args[::-1].index("--epochs") + 1])
    from siftlens.pretrain.loop import PretrainConfig
    return PretrainConfig.epochs


def full_eval(run: Path, data_cache: dict, cache_dir: str | None) -> dict:
    """kNN / linear probe of the final encoder on the *whole* held-out split with the whole labelled
    training set as memory bank (the in-training probes use subsets, ±1 point of noise)."""
    out = run / "final_eval.json"
    if out.exists():
        return json.loads(out.read_text())
    import torch

    from siftlens.models import load_model
    from siftlens.pretrain.data import load_pretrain_data
    from siftlens.pretrain.evaluate import extract_features, knn_accuracy, linear_probe_accuracy

    meta = json.loads((run / "encoder.json").read_text())
    cfg = meta["pretrain"]
    key = (cfg["data"], cfg["stored_size"], cfg["seed"])
    if key not in data_cache:
        data_cache[key] = load_pretrain_data(cfg["data"], cfg["stored_size"], cache_dir, seed=cfg["seed"])
    d = data_cache[key]
    size, off = cfg["model"]["img_size"], (cfg["stored_size"] - cfg["model"]["img_size"]) // 2
    crop = lambda x: x[..., off:off + size, off:off + size]
    enc = load_model(str(run / "encoder.safetensors")).module
    with torch.no_grad():
        ftr = extract_features(enc, crop(d.train), meta["mean"], meta["std"])
        fva = extract_features(enc, crop(d.val), meta["mean"], meta["std"])
    res = {"knn_acc_full": knn_accuracy(ftr, d.train_labels, fva, d.val_labels, k=cfg["knn_k"]),
           "linear_acc_full": linear_probe_accuracy(ftr, d.train_labels, fva, d.val_labels),
           "n_bank": len(ftr), "n_val": len(fva)}
    out.write_text(json.dumps(res))
    return res


def measure_step_seconds(names: list[str], args: argparse.Namespace, rounds: int = 8) -> dict[str, float]:
    """Seconds per training step of each strategy, measured in this one process with the strategies
    interleaved round by round (so machine load hits all alike). Median over rounds."""
    import torch

    from siftlens.cli import build_parser, pretrain_config_from_args
    from siftlens.pretrain.loop import Pretrainer

    times: dict[str, list[float]] = {n: [] for n in names}
    trainers, data = {}, None
    for name in names:
        a = build_parser().parse_args(["pretrain", "--data", args.data, "--out", str(Path(args.out) / "step_time"),
                                       *STRATEGIES[name], *args.pretrain_args])
        cfg = pretrain_config_from_args(a)
        cfg.progress = False
        trainers[name] = p = Pretrainer(cfg, data)
        data = p.data
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    for r in range(rounds + 1):  # round 0 warms up
        for name, p in trainers.items():
            idx = order[(r * p.cfg.batch_size) % (len(order) - p.cfg.batch_size):][:p.cfg.batch_size]
            t0 = time.perf_counter()
            x, noise, weights, _, _ = p.batch_inputs(r, idx)
            dev = p.device
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.cfg.amp):
                loss, _, _ = p.model(x.to(dev), noise.to(dev), p.cfg.mask_ratio,
                                     None if weights is None else weights.to(dev))
            p.opt.zero_grad(set_to_none=True)
            loss.backward()
            p.opt.step()
            if dev.type == "cuda":  # the step is asynchronous on a GPU: wait for it before reading the clock
                torch.cuda.synchronize(dev)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}


def ci95(values: np.ndarray) -> tuple[float, float, float]:
    """mean and 95% t-interval half-width over seeds."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), math.nan, math.nan
    from scipy.stats import t as student_t

    # the t quantile for any number of seeds (a table up to 5 seeds fell back to 1.96 beyond: too narrow)
    half = float(student_t.ppf(0.975, len(v) - 1)) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def first_reaching(log: pd.DataFrame, target: float) -> tuple[float, float]:
    """(epoch, train seconds) of the first evaluation (after epoch 0) with kNN >= target, or NaN."""
    hit = log[(log["epoch"] > 0) & (log["knn_acc"] >= target - 1e-12)]
    if hit.empty:
        return math.nan, math.nan
    return float(hit["epoch"].iloc[0]), float(hit["train_seconds"].iloc[0])


def summarize(runs: dict[tuple[str, int], Path], names: list[str], seeds_of: dict[str, list[int]], out: Path,
              cache_dir: str | None = None, step_seconds: dict[str, float] | None = None,
              final_full_eval: bool = True, family_scope: str = "table") -> dict:
    """Tables (final accuracies, first probe reaching random's final kNN, the low-noise verdict), figures and
    report.html; ``seeds_of`` gives each strategy's seeds (differences to random use the seeds both have)."""
    logs = {k: pd.read_parquet(p / "log.parquet") for k, p in runs.items()}
    data_cache: dict = {}
    skipped = {"knn_acc_full": math.nan, "linear_acc_full": math.nan}
    full = {k: full_eval(p, data_cache, cache_dir) if final_full_eval else skipped for k, p in runs.items()}
    metas = {k: json.loads((p / "encoder.json").read_text()) for k, p in runs.items()}
    final = lambda k, col: float(logs[k].dropna(subset=[col])[col].iloc[-1])
    target = float(np.mean([final(("random", s), "knn_acc") for s in seeds_of["random"]]))
    rand_ttt = np.array([first_reaching(logs[("random", s)], target) for s in seeds_of["random"]])
    rows = []
    for name in names:
        seeds = seeds_of[name]
        common = [s for s in seeds if s in seeds_of["random"]]
        knn = np.array([final((name, s), "knn_acc") for s in seeds])
        lin = np.array([final((name, s), "linear_acc") for s in seeds])
        knn0 = np.array([float(logs[(name, s)]["knn_acc"].iloc[0]) for s in seeds])
        d_knn = np.array([final((name, s), "knn_acc") - final(("random", s), "knn_acc") for s in common])
        d_lin = np.array([final((name, s), "linear_acc") - final(("random", s), "linear_acc") for s in common])
        ttt = np.array([first_reaching(logs[(name, s)], target) for s in seeds])
        knn_full = np.array([full[(name, s)]["knn_acc_full"] for s in seeds])
        lin_full = np.array([full[(name, s)]["linear_acc_full"] for s in seeds])
        d_knn_full = np.array([full[(name, s)]["knn_acc_full"] - full[("random", s)]["knn_acc_full"] for s in common])
        d_lin_full = np.array([full[(name, s)]["linear_acc_full"] - full[("random", s)]["linear_acc_full"]
                               for s in common])
        reached = int(np.isfinite(ttt[:, 0]).sum())
        all_reached = reached == len(seeds) and np.isfinite(rand_ttt).all()
        guidance = np.array([metas[(name, s)]["guidance_seconds"] / metas[(name, s)]["train_seconds"] for s in seeds])
        kp_share = np.array([metas[(name, s)]["keypoint_seconds"] / metas[(name, s)]["train_seconds"] for s in seeds])
        rows.append({
            "strategy": name, "seeds": seeds,
            "knn_final_mean": knn.mean(), "knn_final_std": knn.std(ddof=1) if len(seeds) > 1 else math.nan,
            "linear_final_mean": lin.mean(), "linear_final_std": lin.std(ddof=1) if len(seeds) > 1 else math.nan,
            "knn_epoch0_mean": knn0.mean(),
            "knn_full_mean": knn_full.mean(), "knn_full_std": knn_full.std(ddof=1) if len(seeds) > 1 else math.nan,
            "linear_full_mean": lin_full.mean(),
            "linear_full_std": lin_full.std(ddof=1) if len(seeds) > 1 else math.nan,
            "d_knn_full_vs_random": ci95(d_knn_full), "d_linear_full_vs_random": ci95(d_lin_full),
            "d_knn_vs_random": ci95(d_knn), "d_linear_vs_random": ci95(d_lin),
            "seeds_reaching_target": f"{reached}/{len(seeds)}",
            "epochs_to_target_mean": float(np.nanmean(ttt[:, 0])) if reached else math.nan,
            "seconds_to_target_mean": float(np.nanmean(ttt[:, 1])) if reached else math.nan,
            "epoch_ratio_vs_random": float(ttt[:, 0].mean() / rand_ttt[:, 0].mean()) if all_reached else math.nan,
            "wall_ratio_vs_random": float(ttt[:, 1].mean() / rand_ttt[:, 1].mean()) if all_reached else math.nan,
            "total_train_seconds_mean": float(np.mean([metas[(name, s)]["train_seconds"] for s in seeds])),
            "step_seconds_one_process": step_seconds[name] if step_seconds else math.nan,
            "step_time_ratio_vs_random": step_seconds[name] / step_seconds["random"] if step_seconds else math.nan,
            # wall time to target on an unloaded machine: epochs to target x time per epoch (one-process ratio)
            "wall_ratio_normalised": (float(ttt[:, 0].mean() / rand_ttt[:, 0].mean())
                                      * step_seconds[name] / step_seconds["random"])
            if (step_seconds and all_reached) else math.nan,
            "guidance_share_of_step": float(guidance.mean()),
            "keypoint_precompute_share": float(kp_share.mean()),
        })
    table = pd.DataFrame(rows)
    summary = {"target_knn": target, "seeds": seeds_of, "table": rows,
               "config": metas[("random", seeds_of["random"][0])]["pretrain"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    verdict = protocol_table(runs, names, seeds_of, step_seconds, family_scope=family_scope)
    md = markdown_table(table, target) + verdict
    (out / "summary.md").write_text(md)
    plot_curves(logs, names, seeds_of, target, out / "curves.png")
    figures = ["curves.png"]
    if verdict:
        plot_protocol_curves(runs, names, seeds_of, out / "protocol_curves.png")
        figures.insert(0, "protocol_curves.png")
    imgs = "".join(f"<img src='data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}' "
                   "width='100%'>" for f in figures)
    (out / "report.html").write_text(
        f"<html><body><h1>SIFT-guided MAE: time to random masking's final kNN ({target:.4f})</h1>"
        f"<pre>{html.escape(md)}</pre>{imgs}</body></html>")
    return summary


SIFT_STRATEGIES = ("sift", "sift-curriculum")  # the claim under test; everything else is a control or anchor


def _is_sift(name: str) -> bool:
    return name.split("(")[0].split("+")[0] in SIFT_STRATEGIES


def load_outcomes(runs: dict[tuple[str, int], Path], name: str, seeds: list[int], probe: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probe epochs [E], per-image outcomes [S, E, N]) of one strategy's runs, from probe_outcomes.npz."""
    zs = [np.load(Path(runs[(name, s)]) / "probe_outcomes.npz") for s in seeds]
    return zs[0]["epochs"].astype(float), np.stack([z[probe] for z in zs])


FAMILIES = ("table", "verdict")


def family_members(names: list[str], scope: str = "table") -> set[tuple[str, str, str]]:
    """The (strategy, probe, metric) comparisons that share one Bonferroni correction. ``table``: every
    compared strategy x {knn, linear} x {ratio, area}. ``verdict``: only what the verdict reads, the SIFT
    strategies' kNN epochs ratio and curve area (a confirmatory run declares this family before it runs; every
    other row is then secondary, with its 95% CI only)."""
    compared = [n for n in names if n != "random" and n not in EPOCH_SCALE]
    if scope == "verdict":
        return {(n, "knn", m) for n in compared if _is_sift(n) for m in ("ratio", "area")}
    if scope != "table":
        raise ValueError(f"family scope {scope!r}: expected one of {FAMILIES}")
    return {(n, p, m) for n in compared for p in ("knn", "linear") for m in ("ratio", "area")}


def protocol_table(runs: dict[tuple[str, int], Path], names: list[str], seeds: list[int] | dict[str, list[int]],
                   step_seconds: dict[str, float] | None = None, n_boot: int = 2000,
                   family_scope: str = "table") -> str:
    """Issue 15's low-noise verdict from each run's probe_outcomes.npz (siftlens.pretrain.protocol).

    Per strategy and probe: epochs to reach 95% of random masking's final accuracy as a ratio to random's, and
    the curve-area difference (mean accuracy over the run), each with a 95% bootstrap CI over seeds (paired with
    random's same seeds: same initialisation, data order, crops) and validation images, and a family-wise CI
    (Bonferroni over every comparison in the table). Reference rows (a longer schedule) are outside the family.
    Empty when a run has no per-image outcomes (older runs)."""
    from siftlens.pretrain.protocol import area_gain_of_speedup, speedup

    seeds_of = seeds if isinstance(seeds, dict) else {n: list(seeds) for n in names}
    if not all((Path(runs[(n, s)]) / "probe_outcomes.npz").is_file() for n in names for s in seeds_of[n]):
        return ""
    compared = [n for n in names if n != "random" and n not in EPOCH_SCALE]
    members = family_members(names, family_scope)
    m = max(1, len(members))
    family = 1 - 0.05 / m
    which = ("of this table" if family_scope == "table" else
             "the verdict reads (the SIFT strategies' kNN epochs ratio and curve area; every other row is "
             "secondary: its 95% CI only)")
    lines = ["", f"Low-noise verdict (per-image probe outcomes, every epoch, whole validation split; 95% CI and "
             f"family-wise CI = Bonferroni over the {m} comparisons {which}, i.e. each at "
             f"{family:.4f}; bootstrap over seeds, paired with random's same seeds, and validation images, "
             f"{n_boot} resamples):", "",
             "| strategy | seeds | probe | final acc | epochs to 95% of random's final: ratio to random "
             "[95% CI] {family-wise CI} | wall-time ratio (× step time) | curve area − random's [95% CI] "
             "{family-wise CI} |", "|---|---|---|---|---|---|---|"]
    results = {}
    gain_25 = {}  # per probe: what a 25% speed-up (0.75x the epochs) would add to random's curve area
    for probe in ("knn", "linear"):
        ep_r, out_r = load_outcomes(runs, "random", seeds_of["random"], probe)
        gain_25[probe] = area_gain_of_speedup(ep_r, out_r.mean(axis=(0, 2)), 0.75)
    for name in names:
        if name == "random":
            continue
        ref = name in EPOCH_SCALE
        common = [s for s in seeds_of[name] if s in seeds_of["random"]]
        for probe in ("knn", "linear"):
            ep_r, out_r = load_outcomes(runs, "random", common, probe)
            ep_a, out_a = load_outcomes(runs, name, common, probe)
            r = speedup(ep_a, out_a, out_r, n_boot=n_boot, paired=True, levels=(0.95, family), epochs_random=ep_r)
            results[(name, probe)] = r
            (lo, hi), (flo, fhi) = r["epochs_ratio_cis"][0.95], r["epochs_ratio_cis"][family]
            (alo, ahi), (aflo, afhi) = r["area_difference_cis"][0.95], r["area_difference_cis"][family]
            step = (step_seconds or {}).get(name, math.nan) / (step_seconds or {}).get("random", math.nan)
            wall = f"{r['epochs_ratio'] * step:.2f} [{lo * step:.2f}, {hi * step:.2f}]" if step_seconds else "n/a"
            fam = ("(reference, not in the family)" if ref else f"{{{flo:.2f}, {fhi:.2f}}}"
                   if (name, probe, "ratio") in members else "(secondary)")
            afam = ("(common span)" if ref else f"{{{aflo:+.4f}, {afhi:+.4f}}}"
                    if (name, probe, "area") in members else "(secondary)")
            lines.append(f"| {name} | {len(common)} | {probe} | {out_a[:, -1].mean():.4f} | "
                         f"{r['epochs_ratio']:.2f} [{lo:.2f}, {hi:.2f}] {fam} | {wall} | "
                         f"{r['area_difference']:+.4f} [{alo:+.4f}, {ahi:+.4f}] {afam} |")
    lines += ["", "A strategy exactly 0.75× random's epochs to every accuracy (a 25% speed-up) would show a curve-area "
              f"difference of {gain_25['knn']:+.4f} (kNN) / {gain_25['linear']:+.4f} (linear) on random's mean curve.",
              "", verdict_text(results, compared, family, step_seconds, gain_25["knn"])]
    lines += matched_control_lines(runs, names, seeds_of, n_boot)
    return "\n".join(lines) + "\n"


def matched_controls(names: list[str]) -> list[tuple[str, str]]:
    """(SIFT strategy, its entropy-matched edge control) pairs among ``names``: sift(a=X) with edge-matched(a=X)."""
    return [(n, "edge-matched" + n[len("sift"):]) for n in names
            if n.startswith("sift(") and "edge-matched" + n[len("sift"):] in names]


def matched_control_lines(runs: dict[tuple[str, int], Path], names: list[str], seeds_of: dict[str, list[int]],
                          n_boot: int = 2000) -> list[str]:
    """Secondary comparison (session 7's plan): each SIFT strategy's curve area minus its matched edge
    control's, on the seeds both have, paired by seed (same initialisation, data order and crops), bootstrap over
    seeds and validation images, Bonferroni over the pairs x {kNN, linear}. Does SIFT add anything over a
    SIFT-free sampler that departs from uniform masking as much?"""
    from siftlens.pretrain.protocol import speedup

    pairs = matched_controls(names)
    if not pairs:
        return []
    m = 2 * len(pairs)
    family = 1 - 0.05 / m
    lines = ["", f"SIFT vs its entropy-matched edge control, paired by seed (curve area of the SIFT strategy minus "
             f"the control's; 95% CI and family-wise CI = Bonferroni over these {m} comparisons):", "",
             "| SIFT strategy | matched control | common seeds | probe | area difference [95% CI] {family-wise CI} |",
             "|---|---|---|---|---|"]
    for sift, edge in pairs:
        common = [s for s in seeds_of[sift] if s in seeds_of[edge]]
        for probe in ("knn", "linear"):
            ep_s, out_s = load_outcomes(runs, sift, common, probe)
            ep_e, out_e = load_outcomes(runs, edge, common, probe)
            r = speedup(ep_s, out_s, out_e, n_boot=n_boot, paired=True, levels=(0.95, family), epochs_random=ep_e)
            (lo, hi), (flo, fhi) = r["area_difference_cis"][0.95], r["area_difference_cis"][family]
            lines.append(f"| {sift} | {edge} | {len(common)} | {probe} | {r['area_difference']:+.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}] {{{flo:+.4f}, {fhi:+.4f}}} |")
    return lines


def verdict_text(results: dict, compared: list[str], family: float, step_seconds: dict[str, float] | None,
                 gain_25: float) -> str:
    """The issue's two-sided verdict on the kNN probe, read off the family-wise CIs: shown (a SIFT strategy
    reaches the target in <= 0.5x random's epochs with the CI's upper end below 0.5, <= 0.6x the wall time, and
    a higher curve area than every matched edge / attention control), or a 25% speed-up excluded for every SIFT
    strategy — by the epochs ratio (lower end above 0.75) or by the curve area (upper end below the area a
    0.75x-epochs copy of random's curve would add) —, or neither (undecided at this scale)."""
    sift = [n for n in compared if _is_sift(n)]
    controls = [n for n in compared if not _is_sift(n) and "kamim" not in n and n != "random"]
    out = []
    for n in sift:
        r = results[(n, "knn")]
        lo, hi = r["epochs_ratio_cis"][family]
        area_hi = r["area_difference_cis"][family][1]
        step = (step_seconds[n] / step_seconds["random"]) if step_seconds else math.nan
        beats = [c for c in controls if results[(n, "knn")]["area_difference"] > results[(c, "knn")]["area_difference"]]
        out.append(f"- {n}: kNN epochs ratio {r['epochs_ratio']:.2f}, family-wise CI [{lo:.2f}, {hi:.2f}]; "
                   f"curve area {r['area_difference']:+.4f}, family-wise upper end {area_hi:+.4f} vs "
                   f"{gain_25:+.4f} for a 25% speed-up; "
                   f"wall ratio ≈ {r['epochs_ratio'] * step:.2f}; curve area above {len(beats)}/{len(controls)} "
                   f"controls ({', '.join(controls) or 'none run'}) — "
                   + ("SHOWN: ≤ 0.5× with the CI below 0.5" if hi < 0.5 and r["epochs_ratio"] * step <= 0.6
                      and controls and len(beats) == len(controls)
                      else "≤ 0.5× with the CI below 0.5, but no control was run: not shown" if hi < 0.5
                      and not controls
                      else "a 25% speed-up is EXCLUDED (epochs-ratio CI above 0.75)" if lo > 0.75
                      else "a 25% speed-up is EXCLUDED (curve-area CI below its gain)" if area_hi < gain_25
                      else "neither shown nor excluded"))
    shown = any("SHOWN" in line for line in out)
    excluded = bool(sift) and all("EXCLUDED" in line for line in out)
    head = ("**Verdict: SIFT guidance speeds pre-training at this scale.**" if shown else
            "**Verdict: no SIFT strategy speeds pre-training by 25% or more at this scale (family-wise CIs).**"
            if excluded else "**Verdict: undecided — the CIs neither show a 2× speed-up nor exclude a 25% one.**")
    return "\n".join([head, *out])


def plot_protocol_curves(runs: dict[tuple[str, int], Path], names: list[str], seeds_of: dict[str, list[int]],
                         path: Path) -> None:
    """Probe accuracy vs epoch per strategy (kNN, linear): mean over seeds with a 95% bootstrap band over
    seeds and validation images; the longer-schedule reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from siftlens.pretrain.protocol import accuracy_band

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, probe in zip(axes, ("knn", "linear")):
        for name in names:
            epochs, outcomes = load_outcomes(runs, name, seeds_of[name], probe)
            mean, lo, hi = accuracy_band(outcomes, n_boot=200)
            line, = ax.plot(epochs, mean, marker="o", ms=2.5, ls="--" if name in EPOCH_SCALE else "-",
                            label=f"{name} ({len(seeds_of[name])} seeds)")
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.18)
        _, ref = load_outcomes(runs, "random", seeds_of["random"], probe)
        ax.axhline(0.95 * ref[:, -1].mean(), color="k", lw=1, ls=":", label="95% of random's final")
        ax.set_title(f"{'kNN (k=20)' if probe == 'knn' else 'linear probe'} accuracy, whole validation split "
                     "— band: 95% bootstrap CI")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(t: pd.DataFrame, target: float) -> str:
    fmt_ci = lambda c: f"{c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}]"
    lines = [f"target = random masking's final kNN accuracy, mean over seeds: {target:.4f}", "",
             "| strategy | kNN final | linear final | ΔkNN vs random (95% CI) | Δlinear vs random (95% CI) "
             "| reached | epochs to target | ratio | train s to target | ratio | guidance / step time "
             "| SIFT once / train time | kNN at init |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(
            f"| {r.strategy} | {r.knn_final_mean:.4f} ± {r.knn_final_std:.4f} | "
            f"{r.linear_final_mean:.4f} ± {r.linear_final_std:.4f} | {fmt_ci(r.d_knn_vs_random)} | "
            f"{fmt_ci(r.d_linear_vs_random)} | {r.seeds_reaching_target} | {r.epochs_to_target_mean:.1f} | "
            f"{r.epoch_ratio_vs_random:.2f} | {r.seconds_to_target_mean:.0f} | {r.wall_ratio_vs_random:.2f} | "
            f"{r.guidance_share_of_step:.2%} | {r.keypoint_precompute_share:.2%} | {r.knn_epoch0_mean:.4f} |")
    lines += ["", "Time per step, measured in one process with the strategies interleaved (the runs above share "
              "a noisy machine, so their wall times carry its load); wall ratio (normalised) = epoch ratio × "
              "step-time ratio:", "", "| strategy | s / step | step-time ratio | wall ratio (normalised) |",
              "|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(f"| {r.strategy} | {r.step_seconds_one_process:.3f} | {r.step_time_ratio_vs_random:.3f} | "
                     f"{r.wall_ratio_normalised:.2f} |")
    if t["knn_full_mean"].isna().all():  # --no-full-eval
        return "\n".join(lines) + "\n"
    lines += ["", "Final encoders on the whole held-out split (memory bank / probe training set: all labelled "
              "training images):", "",
              "| strategy | kNN (full) | linear (full) | ΔkNN vs random (95% CI) | Δlinear vs random (95% CI) |",
              "|---|---|---|---|---|"]
    for r in t.itertuples():
        lines.append(f"| {r.strategy} | {r.knn_full_mean:.4f} ± {r.knn_full_std:.4f} | "
                     f"{r.linear_full_mean:.4f} ± {r.linear_full_std:.4f} | {fmt_ci(r.d_knn_full_vs_random)} | "
                     f"{fmt_ci(r.d_linear_full_vs_random)} |")
    return "\n".join(lines) + "\n"


def plot_curves(logs: dict, names: list[str], seeds_of: dict[str, list[int]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for name in names:
        ev = [logs[(name, s)].dropna(subset=["knn_acc"]) for s in seeds_of[name]]
        epochs = ev[0]["epoch"].to_numpy()
        for ax, col, x in ((axes[0], "knn_acc", "epoch"), (axes[1], "knn_acc", "train_seconds"),
                           (axes[2], "linear_acc", "epoch")):
            ys = np.stack([e[col].to_numpy() for e in ev])
            xs = epochs if x == "epoch" else np.mean([e["train_seconds"].to_numpy() for e in ev], axis=0)
            line, = ax.plot(xs, ys.mean(0), marker="o", ms=3, label=name)
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    for ax, title, xl in ((axes[0], "kNN accuracy (k=20, cosine)", "epoch"),
                          (axes[1], "kNN accuracy", "training wall time (s)"),
                          (axes[2], "linear-probe accuracy", "epoch")):
        ax.set_title(title + " — mean over seeds, band = min..max")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.axhline(target, color="k", ls="--", lw=1, label="target: random's final kNN")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="benchmarks/results/pretrain/run")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT, choices=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--more-seeds", nargs="*", type=int, default=[],
                    help="further seeds for the strategies in --more-seeds-for only (e.g. random and the best two)")
    ap.add_argument("--more-seeds-for", nargs="*", default=["random"], choices=list(STRATEGIES))
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (each gets cores/parallel threads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores/parallel)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="run nothing: summarise the finished runs among those asked for, and list the missing ones")
    ap.add_argument("--no-full-eval", action="store_true",
                    help="skip the final encoders' probe with the whole training set as memory bank (the per-epoch "
                         "probes already use the whole validation split when --probe-val-limit is unset)")
    ap.add_argument("--step-time-rounds", type=int, default=8,
                    help="rounds of the interleaved one-process step-time measurement (0: skip)")
    ap.add_argument("--family", choices=FAMILIES, default="table",
                    help="Bonferroni family of the verdict table: every comparison in it (table), or only the SIFT "
                         "strategies' kNN epochs ratio and curve area that the verdict reads (verdict; declare it "
                         "before the runs)")
    ap.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                    help="after '--': passed to every `siftlens pretrain` (model size, epochs, ...)")
    args = ap.parse_args()
    if args.pretrain_args[:1] == ["--"]:
        args.pretrain_args = args.pretrain_args[1:]
    if "random" not in args.strategies:
        args.strategies = ["random", *args.strategies]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join([sys.executable, *sys.argv]) + "\n")
    jobs = [(n, s) for s in args.seeds for n in args.strategies]  # seed-major: early results are comparable
    jobs += [(n, s) for s in args.more_seeds for n in args.strategies if n in args.more_seeds_for]
    if args.summarize_only:
        finished = lambda j: (out_dir(args, *j) / "encoder.json").is_file()  # noqa: E731
        missing = [j for j in jobs if not finished(j)]
        if missing:
            print("not run (left out of the summary): " + ", ".join(f"{n} seed {s}" for n, s in missing))
        jobs = [j for j in jobs if finished(j)]
    seeds_of = {n: [s for m, s in jobs if m == n] for n in args.strategies}
    args.strategies = [n for n in args.strategies if seeds_of[n]]  # --summarize-only: a strategy not run yet
    with ThreadPoolExecutor(args.parallel) as pool:
        paths = dict(zip(jobs, pool.map(lambda j: run_one(j[0], j[1], args, threads), jobs)))
    cache_dir = None
    if "--cache-dir" in args.pretrain_args:
        cache_dir = args.pretrain_args[args.pretrain_args.index("--cache-dir") + 1]
    step_file = out / "step_seconds.json"
    if args.step_time_rounds and not step_file.exists():
        timed = [n for n in args.strategies if n not in EPOCH_SCALE]  # a longer schedule has random's step time
        step = measure_step_seconds(timed, args, args.step_time_rounds)
        step.update({n: step["random"] for n in args.strategies if n in EPOCH_SCALE})
        step_file.write_text(json.dumps(step, indent=1))
    step_seconds = json.loads(step_file.read_text()) if step_file.exists() else None
    summary = summarize(paths, args.strategies, seeds_of, out, cache_dir, step_seconds,
                        final_full_eval=not args.no_full_eval, family_scope=args.family)
    print((out / "summary.md").read_text())
    print(f"-> {out}/report.html, summary.json, curves.png (config: {json.dumps(summary['config'])})")


if __name__ == "__main__":
    main()
