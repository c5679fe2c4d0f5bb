"""Calibration of the report's conclusions (issue 12): false-positive rates under null settings, and power.

    python benchmarks/bench_calibration.py                 # full run (~35 min on 2 heavily shared cores)
    python benchmarks/bench_calibration.py --quick         # toy sizes, a smoke run (~40 s CPU)
    python benchmarks/bench_calibration.py --settings a    # only the synthetic part

For every conclusion the report draws (per stat, S_cls and S_pp):
  per_map        one-sided per-map p < 0.05 (image x head), the rate over all maps
  bh_share       mean share of image x head maps with BH q < 0.05 within a layer (the report's "share
                 significant"); also bh_any: P(a layer's BH rejects anything), which BH controls at 0.05
                 under the complete null
  follows        the verdict "attention follows SIFT" (verdict.layer_verdicts: effect over the null beats
                 the twin's + MIN_EFFECT, Holm over layers): rate per layer and the family-wise rate
                 "the verdict names any layer" per replicate dataset
  specific       the verdict "SIFT-specific" (follows, beats every baseline, partial rank correlation
                 beyond the twin's); partial: the partial-correlation test alone (Holm over layers)
  follows_bare   diagnostics: the same one-sided test with min_effect = 0 (is the test itself calibrated,
  follows_notwin or is the margin doing the work?) and without a twin (what `--twin none` concludes)
for each null (swap, shift, permute) in three null settings:
  (a) synthetic: independent smooth, centre-biased SIFT-like maps and attention; power on planted effects
  (b) random-init timm ViT-Ti/16 and ViT-S/16 through `siftlens.analyze` on Imagenette val images
  (c) the bundled trained model on Imagenette val images, each image's attention paired with another
      image's maps (seeded derangements); beside it the real pairing ("the real finding").

Rates with one event per replicate dataset get a Clopper-Pearson 95% CI; rates pooled over many
dependent events of one dataset (per-map p, pooled layers, BH share) get a cluster bootstrap CI over
replicate datasets. Goal (issue 12): every FPR <= 0.06 with CI upper bound <= 0.08.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from siftlens.analyze import analyze, hash_seed, rows_from_layers
from siftlens.dataset_stats import significant_fraction
from siftlens.semantic_maps import center_prior, concentration, concentration_groups, sparsity_matched
from siftlens.stats import Workspace, layer_statistics, null_indices, patch_distances, prepare_maps, swapped_maps
from siftlens.verdict import MIN_EFFECT, effect_over_null, holm, layer_verdicts, p_diff_above, p_mean_above

ALPHA = 0.05
GOAL_RATE, GOAL_UPPER = 0.06, 0.08
NULL_MODES = ("swap", "shift", "permute")
STATS = ("s_cls", "s_pp")
MAP_NAMES = ("sift", "random_kp", "edges", "edges_sparse", "orb", "center", "uniform")
GROUPS = 4
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenette2-160.tar"


# ----------------------------------------------------------------------------------------------------
# conclusions of one replicate dataset, and rates over replicates
# ----------------------------------------------------------------------------------------------------

def per_image_frame(layer_out: list[dict], image_ids: np.ndarray, map_names=MAP_NAMES) -> pd.DataFrame:
    """The per-image table exactly as analyze writes it (analyze.rows_from_layers)."""
    return rows_from_layers(layer_out, image_ids, tuple(map_names), GROUPS).to_pandas()


def conclusions(per_image: pd.DataFrame, twin: pd.DataFrame | None, map_names, stat: str,
                maps_only: bool = False) -> dict:
    """Everything the report concludes for ``stat`` in one dataset, as per-layer arrays (``maps_only``: only
    the per-map p-values and the BH share)."""
    p = per_image[f"{stat}_p"].to_numpy(np.float64)
    layers = np.sort(per_image["layer"].unique())
    lay = per_image["layer"].to_numpy()
    sig = [(p[lay == v] < ALPHA).sum() for v in layers]
    valid = [np.isfinite(p[lay == v]).sum() for v in layers]
    if maps_only:
        share = significant_fraction(per_image, f"{stat}_p", ALPHA)["fraction"].reindex(layers).to_numpy()
        return {"per_map_sig": np.array(sig, dtype=np.int64), "per_map_n": np.array(valid, dtype=np.int64),
                "bh_share": share, "bh_any": share > 0}
    rep = layer_verdicts(per_image, stat, list(map_names), twin)
    # the diagnostics use verdict.py's own tests on its own effect table, without layer_verdicts' bootstrap CIs
    # (3x cheaper); tests/test_calibration_bench.py checks they equal layer_verdicts(min_effect=0 / twin=None)
    eff = effect_over_null(per_image, stat).reindex(columns=layers)
    teff = effect_over_null(twin, stat).reindex(columns=layers) if twin is not None else None
    bare_p = [p_diff_above(eff[v].to_numpy(), teff[v].to_numpy(), 0.0) if teff is not None
              else p_mean_above(eff[v].to_numpy(), 0.0) for v in layers]
    notwin_p = [p_mean_above(eff[v].to_numpy(), MIN_EFFECT) for v in layers]
    share = significant_fraction(per_image, f"{stat}_p", ALPHA)["fraction"].reindex(layers).to_numpy()
    out = {
        "per_map_sig": np.array(sig, dtype=np.int64), "per_map_n": np.array(valid, dtype=np.int64),
        "bh_share": share, "bh_any": share > 0,
        "follows": rep["follows"].to_numpy(bool), "specific": rep["specific"].to_numpy(bool),
        "follows_bare": holm(np.array(bare_p)) < ALPHA, "follows_notwin": holm(np.array(notwin_p)) < ALPHA,
        "effect": rep["effect"].to_numpy(), "twin_effect": rep["twin_effect"].to_numpy(),
    }
    if "p_partial" in rep:
        out["partial"] = (rep["p_partial"] < ALPHA).to_numpy(bool)
        out["partial_value"] = rep["partial"].to_numpy()
        out["twin_partial_value"] = (rep["twin_partial"].to_numpy() if "twin_partial" in rep
                                     else np.full(len(rep), np.nan))
    return out


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    ci = sps.binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def cluster_bootstrap(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of sum(num)/sum(den), resampling replicate datasets (the independent units)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    R = len(num)
    if R < 2:
        return float("nan"), float("nan")
    counts = np.random.default_rng(seed).multinomial(R, np.full(R, 1 / R), size=n_boot).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (counts @ num) / (counts @ den)
    lo, hi = np.nanquantile(boots, [0.025, 0.975])
    return float(lo), float(hi)


def judge(rate: float, hi: float) -> str:
    if not np.isfinite(rate):
        return "n/a"
    if rate > GOAL_RATE:
        return "MISSED"
    return "met" if hi <= GOAL_UPPER else "rate ok, CI too wide"


def summarize(reps: list[dict], **labels) -> list[dict]:
    """Rates with 95% CIs of every conclusion over replicate datasets (one dict per conclusion)."""
    rows = []
    R = len(reps)

    def add(conclusion: str, rate: float, lo: float, hi: float, n: int, ci: str, extra: dict | None = None):
        rows.append({**labels, "conclusion": conclusion, "rate": float(rate), "lo": lo, "hi": hi, "n": int(n),
                     "ci": ci, "goal": judge(rate, hi), **(extra or {})})

    sig = np.array([r["per_map_sig"].sum() for r in reps])
    nn = np.array([r["per_map_n"].sum() for r in reps])
    add("per_map p<0.05", sig.sum() / max(nn.sum(), 1), *cluster_bootstrap(sig, nn), nn.sum(), "cluster bootstrap")
    share = np.array([r["bh_share"].mean() for r in reps])
    add("BH share (mean)", share.mean(), *cluster_bootstrap(share, np.ones(R)), R * len(reps[0]["bh_share"]),
        "cluster bootstrap")
    for key, name in (("bh_any", "BH rejects any (per layer)"), ("follows", "follows (per layer)"),
                      ("specific", "specific (per layer)"), ("partial", "partial corr. (per layer)"),
                      ("follows_bare", "follows, min_effect=0 (per layer)"),
                      ("follows_notwin", "follows, no twin (per layer)")):
        if key not in reps[0]:
            continue
        m = np.stack([r[key] for r in reps]).astype(float)  # [R, L]
        per_layer = m.mean(0)
        worst = int(np.argmax(per_layer))
        k_worst = int(m[:, worst].sum())
        wl, wh = clopper_pearson(k_worst, R)
        add(name, m.mean(), *cluster_bootstrap(m.sum(1), np.full(R, m.shape[1])), m.size, "cluster bootstrap",
            {"per_layer": per_layer.round(4).tolist(), "worst_layer": worst,
             "worst_layer_rate": float(per_layer[worst]), "worst_layer_ci": [wl, wh]})
        anyl = m.any(1)
        add(name.replace("(per layer)", "names any layer"), anyl.mean(), *clopper_pearson(int(anyl.sum()), R), R,
            "Clopper-Pearson")
    return rows


# ----------------------------------------------------------------------------------------------------
# (a) synthetic: independent smooth SIFT-like maps and attention
# ----------------------------------------------------------------------------------------------------

@dataclass
class SynthConfig:
    grid: tuple[int, int] = (14, 14)
    n_images: int = 48
    heads: int = 3
    layers: int = 4
    n_perm: int = 200  # K of shift / permute (analyze's default); swap gets every other image (K = n_images - 1)
    field_sigma: float = 2.0  # patches: spatial correlation length of the attention logits
    eps: float = 1e-3  # planted effect: logits += beta * log(c_own + eps)


def _blobs(centres: np.ndarray, widths: np.ndarray, amps: np.ndarray, pts: np.ndarray) -> np.ndarray:
    d2 = ((pts[:, None, :] - centres[None]) ** 2).sum(-1)  # [n, k]
    return (amps[None] * np.exp(-d2 / (2 * widths[None] ** 2))).sum(-1)


def synthetic_maps(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """C [N, M, n] (map order MAP_NAMES) and SIFT groups [N, n]: SIFT-like sparse maps (a few centre-biased
    Gaussian blobs, patches below 10% of the peak set to 0) and baselines built around them: edges
    correlated with the SIFT map, sparsity-matched edges, random keypoints, ORB near SIFT, centre prior."""
    h, w = cfg.grid
    n = h * w
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], -1)
    smooth = np.exp(-((pts[:, None] - pts[None]) ** 2).sum(-1) / (2 * 1.5**2))
    centre = concentration(center_prior(cfg.grid))
    C = np.zeros((cfg.n_images, len(MAP_NAMES), n))
    groups = np.zeros((cfg.n_images, n), dtype=np.int64)
    for i in range(cfg.n_images):
        k = 1 + rng.poisson(3)
        ctr = np.clip(0.5 + 0.2 * rng.standard_normal((k, 2)), 0.05, 0.95) * np.array([h, w])
        wid = rng.uniform(0.6, 1.8, k)
        amp = rng.exponential(1.0, k) + 0.2
        mass = _blobs(ctr, wid, amp, pts)
        mass[mass < 0.1 * mass.max()] = 0.0
        texture = np.exp(0.8 * (smooth @ rng.standard_normal(n)) / np.sqrt(smooth.sum(1)))
        edges = 0.6 * (smooth @ mass) / (smooth @ mass).sum() + 0.4 * texture / texture.sum()
        rk = _blobs(rng.uniform(0, 1, (k, 2)) * np.array([h, w]), wid, amp, pts)
        orb_ctr = np.concatenate([ctr + 1.5 * rng.standard_normal(ctr.shape), rng.uniform(0, 1, (2, 2)) * [h, w]])
        orb = _blobs(orb_ctr, rng.uniform(0.6, 1.8, len(orb_ctr)), rng.exponential(1.0, len(orb_ctr)) + 0.2, pts)
        maps = {"sift": concentration(mass), "random_kp": concentration(rk), "edges": concentration(edges),
                "edges_sparse": concentration(sparsity_matched(edges, int((mass > 0).sum()))),
                "orb": concentration(orb), "center": centre, "uniform": np.full(n, 1.0 / n)}
        C[i] = np.stack([maps[m] for m in MAP_NAMES])
        groups[i] = concentration_groups(mass, GROUPS)
    return C, groups


def synthetic_attention(gen: torch.Generator, cfg: SynthConfig, layer: int, planted_c: torch.Tensor | None = None,
                        beta: float = 0.0) -> torch.Tensor:
    """[N, H, 1 + n, 1 + n] attention (CLS at 0): softmax of a smooth random field over keys + a centre bias +
    per-head locality, independent of the maps unless ``beta`` plants logits += beta * log(c_own + eps)."""
    h, w = cfg.grid
    n, N, H = h * w, cfg.n_images, cfg.heads
    dist = patch_distances(cfg.grid, 1)
    smooth = torch.exp(-dist**2 / (2 * cfg.field_sigma**2))
    smooth = smooth / smooth.sum(1, keepdim=True).sqrt()

    def field(*shape):
        f = torch.randn(*shape, n, generator=gen) @ smooth.T
        return (f - f.mean(-1, keepdim=True)) / f.std(-1, keepdim=True)

    amp = (0.75, 1.5, 2.25, 3.0)[layer % 4]
    centre = torch.from_numpy(np.log(center_prior(cfg.grid, 0.3))).float()  # log Gaussian: a centre bias
    keys = amp * field(N, H) + 0.7 * centre  # [N, H, n]
    cls = keys + amp * 0.5 * field(N, H)
    local = torch.rand(H, generator=gen) * 1.5  # per-head locality strength
    logits = keys[:, :, None, :] - local[None, :, None, None] * dist[None, None] ** 2 / (2 * 3.0**2)  # [N, H, n, n]
    if planted_c is not None and beta:
        bias = beta * torch.log(planted_c + cfg.eps)[:, None, :]  # [N, 1, n]
        logits = logits + bias[:, :, None, :]
        cls = cls + bias
    T = n + 1
    full = torch.empty(N, H, T, T)
    full[:, :, 1:, 1:] = logits
    full[:, :, 0, 1:] = cls
    full[:, :, :, 0] = 1.0  # prefix key: a little mass goes to CLS
    return full.softmax(-1)


_NULL_INDEX_CACHE: dict = {}


def rearranged_nulls(c: torch.Tensor, grid: tuple[int, int], n_perm: int, mode: str, seed: int) -> torch.Tensor:
    """[B, n] -> [B, K, n]: stats.permuted_maps with analyze's per-image null seeds (hash_seed(seed + 1, i)),
    the index sets cached: drawing them (a Python loop per image) costs more than the statistics, and with
    a fixed seed analyze draws the same ones for image i in every run."""
    key = (len(c), tuple(grid), n_perm, mode, seed)
    if key not in _NULL_INDEX_CACHE:
        _NULL_INDEX_CACHE[key] = torch.stack([null_indices(n_perm, grid, hash_seed(seed + 1, i), mode)
                                              for i in range(len(c))])
    perms = _NULL_INDEX_CACHE[key]
    return torch.gather(c[:, None].expand(-1, n_perm, -1), 2, perms)


def synthetic_nulls(C: torch.Tensor, groups: torch.Tensor, cfg: SynthConfig, mode: str):
    """BatchMaps for one null mode. swap: each image against every other image's SIFT map (what analyze's
    bank gives with K >= N - 1); shift / permute: K rearrangements of the own map, seeded per image."""
    N = len(C)
    ids = np.arange(N)
    if mode == "swap":
        C_null = swapped_maps(C[:, 0], torch.arange(N), torch.arange(N))
    else:
        C_null = rearranged_nulls(C[:, 0], cfg.grid, cfg.n_perm, mode, 0)
    return prepare_maps(C, groups, MAP_NAMES, GROUPS, cfg.grid, 16, C_null=C_null), ids


_WS = Workspace()  # large temporaries reused across calls (a fresh CPU tensor is page-faulted in on first touch)


def synthetic_replicate(seed: int, cfg: SynthConfig, modes=NULL_MODES, beta: float = 0.0,
                        planted_layers: tuple[int, ...] = ()) -> dict:
    """One replicate dataset: {mode: {stat: conclusions}} (model attention vs an independent twin)."""
    rng = np.random.default_rng(seed)
    C_np, groups_np = synthetic_maps(rng, cfg)
    C, groups = torch.from_numpy(C_np).float(), torch.from_numpy(groups_np)
    gen = torch.Generator().manual_seed(seed)
    model = [synthetic_attention(gen, cfg, lay, C[:, 0], beta if lay in planted_layers else 0.0)
             for lay in range(cfg.layers)]
    twin = [synthetic_attention(gen, cfg, lay) for lay in range(cfg.layers)]
    out = {}
    for mode in modes:
        maps, ids = synthetic_nulls(C, groups, cfg, mode)
        frames = []
        for attn in (model, twin):
            lo = [layer_statistics(a, 1, 0, maps, _WS) for a in attn]
            frames.append(per_image_frame(lo, ids))
        out[mode] = {s: conclusions(frames[0], frames[1], MAP_NAMES, s) for s in STATS}
    return out


def run_synthetic(reps: int, cfg: SynthConfig, betas: tuple[float, ...], power_reps: int,
                  power_modes: tuple[str, ...], log) -> dict:
    t0 = time.time()
    null_reps = []
    for r in range(reps):
        null_reps.append(synthetic_replicate(10_000 + r, cfg))
        if (r + 1) % 20 == 0:
            log(f"  (a) null replicate {r + 1}/{reps}  {time.time() - t0:.0f}s")
    rows = []
    for mode in NULL_MODES:
        for stat in STATS:
            rows += summarize([x[mode][stat] for x in null_reps], setting="a", model="synthetic", null=mode, stat=stat)
    planted = (1, 2)  # layers 0 and 3 stay null: the verdict must not name them
    power = []
    for beta in betas:
        preps = [synthetic_replicate(20_000 + r, cfg, power_modes, beta, planted) for r in range(power_reps)]
        for mode in power_modes:
            for stat in STATS:
                res = [x[mode][stat] for x in preps]
                m = np.stack([x["follows"] for x in res]).astype(float)
                sig = np.stack([x["per_map_sig"] for x in res]).astype(float)
                nn = np.stack([x["per_map_n"] for x in res]).astype(float)
                share = np.stack([x["bh_share"] for x in res])
                eff = np.stack([x["effect"] for x in res])
                k_pl = int(m[:, list(planted)].sum())
                n_pl = m[:, list(planted)].size
                k_null = int(m[:, [0, 3]].any(1).sum())
                power.append({
                    "beta": beta, "null": mode, "stat": stat, "reps": power_reps,
                    "effect_planted_layers": float(eff[:, list(planted)].mean()),
                    "per_map_power": float(sig[:, list(planted)].sum() / nn[:, list(planted)].sum()),
                    "per_map_power_ci": cluster_bootstrap(sig[:, list(planted)].sum(1), nn[:, list(planted)].sum(1)),
                    "bh_share_planted": float(share[:, list(planted)].mean()),
                    "follows_power": k_pl / n_pl, "follows_power_ci": cluster_bootstrap(
                        m[:, list(planted)].sum(1), np.full(power_reps, len(planted))),
                    "follows_bare_power": float(np.stack([x["follows_bare"] for x in res])[:, list(planted)].mean()),
                    "follows_unplanted_any": k_null / power_reps,
                    "follows_unplanted_any_ci": clopper_pearson(k_null, power_reps),
                    "per_map_unplanted": float(sig[:, [0, 3]].sum() / nn[:, [0, 3]].sum()),
                })
        log(f"  (a) power beta={beta} done  {time.time() - t0:.0f}s")
    return {"config": {**cfg.__dict__, "reps": reps, "power_reps": power_reps, "planted_layers": list(planted)},
            "rows": rows, "power": power, "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------------
# real images
# ----------------------------------------------------------------------------------------------------

def extract_val_subset(tar_path: Path, n: int, seed: int, dst: Path) -> list[str]:
    """A fixed, seeded subset of n Imagenette val images, extracted flat into dst; returns their names."""
    with tarfile.open(tar_path) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and "/val/" in m.name
                          and m.name.lower().endswith((".jpeg", ".jpg"))), key=lambda m: m.name)
        chosen = random.Random(seed).sample(members, n)
        dst.mkdir(parents=True, exist_ok=True)
        for k, m in enumerate(chosen):
            data = tf.extractfile(m).read()
            (dst / f"{k:04d}_{Path(m.name).name}").write_bytes(data)
    return [m.name for m in chosen]


def run_random_init(images: Path, work: Path, models: dict[str, int], modes, other_null_seeds: int, log) -> dict:
    """(b) random-init ViTs through analyze (twin on), several init seeds per model as replicates; the
    non-default nulls (shift, permute) on the first ``other_null_seeds`` seeds only (compute)."""
    t0 = time.time()
    rows, effects = [], []
    cache = work / "kpcache"
    for model, n_seeds in models.items():
        per_mode: dict[str, list] = {m: [] for m in modes}
        for seed in range(n_seeds):
            for mode in modes:
                if mode != "swap" and seed >= other_null_seeds:
                    continue
                out = work / f"b_{model}_{seed}_{mode}"
                res = analyze(f"timm:{model}", images=images, out=out, random_init=True, seed=seed, null_mode=mode,
                              twin="random-init", twin_images=10_000, batch_size=16, workers=1, report=False,
                              progress=False, keypoint_cache=str(cache), examples=0)
                twin = pd.read_parquet(out / "twin" / "per_image.parquet")
                names = res.manifest["options"]["map_names"]
                per_mode[mode].append({s: conclusions(res.per_image, twin, names, s) for s in STATS})
                for s in STATS:
                    c = per_mode[mode][-1][s]
                    effects.append({"model": model, "seed": seed, "null": mode, "stat": s,
                                    "effect": c["effect"].round(5).tolist(),
                                    "twin_effect": c["twin_effect"].round(5).tolist(),
                                    "follows_bare": c["follows_bare"].tolist(),
                                    "partial": c.get("partial_value", np.array([])).round(5).tolist(),
                                    "twin_partial": c.get("twin_partial_value", np.array([])).round(5).tolist(),
                                    "partial_test": c["partial"].tolist() if "partial" in c else [],
                                    "K": res.manifest["null"]["K"]})
                shutil.rmtree(out, ignore_errors=True)
            log(f"  (b) {model} seed {seed} done  {time.time() - t0:.0f}s")
        for mode in modes:
            for s in STATS:
                if per_mode[mode]:
                    rows += summarize([x[s] for x in per_mode[mode]], setting="b", model=model, null=mode, stat=s)
    return {"models": models, "rows": rows, "effects": effects, "seconds": round(time.time() - t0, 1)}


def _load_run(out: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Attention [N, L, H, T, T] (float32, rows renormalised after float16 storage), maps, groups, manifest."""
    with np.load(out / "attention_maps.npz") as z:
        attn, idx = z["attention"].astype(np.float32), z["index"]
    with np.load(out / "examples.npz") as z:
        C, groups, ex_idx = z["C"], z["groups"], z["index"]
    if not (np.array_equal(idx, np.arange(len(idx))) and np.array_equal(ex_idx, idx)):
        raise RuntimeError(f"{out}: kept attention and maps are not the first images in order")
    attn = torch.from_numpy(attn)
    attn = attn / attn.sum(-1, keepdim=True)
    man = json.loads((out / "manifest.json").read_text())
    return attn, torch.from_numpy(C).float(), torch.from_numpy(groups), man


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def paired_maps(C, groups, sigma: np.ndarray, mode: str, layout: dict, map_names, n_perm: int, seed: int):
    """BatchMaps with image i's maps replaced by image sigma[i]'s. swap null: the SIFT maps of every image
    except sigma[i] and i (image i's own map is related to its attention, so it is no null map), K = N - 2."""
    N = len(sigma)
    Cp, gp = C[sigma], groups[sigma]
    grid, patch = tuple(layout["grid"]), layout["patch_size"]
    if mode == "swap":
        keep = np.array([[j for j in range(N) if j != i and j != sigma[i]] for i in range(N)])
        C_null = C[:, 0][torch.from_numpy(keep)]
    else:
        C_null = rearranged_nulls(Cp[:, 0], grid, n_perm, mode, seed)
    return prepare_maps(Cp, gp, tuple(map_names), GROUPS, grid, patch, C_null=C_null)


def frame_from_attention(attn: torch.Tensor, maps, layout: dict, map_names) -> pd.DataFrame:
    P = len(layout["prefix_tokens"])
    cls = layout["prefix_tokens"].index("cls") if "cls" in layout["prefix_tokens"] else None
    lo = [layer_statistics(attn[:, lay], P, cls, maps, _WS) for lay in range(attn.shape[1])]
    return per_image_frame(lo, np.arange(attn.shape[0]), map_names)


def run_deranged(images: Path, work: Path, n_images: int, reps: int, modes, n_perm: int, log) -> dict:
    """(c) the bundled model's real attention paired with other images' maps (derangements), vs its twin."""
    from siftlens.models import load_model, random_init_twin

    t0 = time.time()
    common = dict(images=images, batch_size=32, workers=1, progress=False, report=False, examples=n_images,
                  keep_full_maps=n_images, keypoint_cache=str(work / "kpcache"))
    # the real finding exactly as the product computes it (swap null, twin in the same run) ...
    real = analyze("vit_tiny_imagenette", out=work / "c_model", twin="random-init", twin_images=n_images, **common)
    twin_seed = real.manifest["twin"]["seed"]
    # ... and the twin's attention kept too (the same twin: random_init_twin with analyze's twin seed)
    tlm = random_init_twin(load_model("vit_tiny_imagenette"), seed=twin_seed)
    analyze(tlm, out=work / "c_twin", twin="none", random_init=True, **common)
    twin_rows = pd.read_parquet(work / "c_model" / "twin" / "per_image.parquet")
    names = real.manifest["options"]["map_names"]
    real_verdicts = {}
    for s in STATS:
        v = layer_verdicts(real.per_image, s, names, twin_rows)
        keep = [c for c in ("layer", "S", "S_lo", "S_hi", "effect", "effect_lo", "effect_hi", "twin_effect",
                            "twin_effect_lo", "twin_effect_hi", "p_follows", "follows", "partial", "partial_lo",
                            "partial_hi", "twin_partial", "p_partial", "specific", "bh_share", "twin_bh_share")
                if c in v]
        real_verdicts[s] = json.loads(v[keep].to_json(orient="records"))

    A, C, groups, man = _load_run(work / "c_model")
    At, Ct, _, _ = _load_run(work / "c_twin")
    layout = man["layout"]
    if not torch.equal(C, Ct):
        raise RuntimeError("model and twin runs built different maps")
    # check: statistics recomputed from the kept attention reproduce analyze's own (real pairing)
    ident = np.arange(len(C))
    bank_K = man["null"]["K"]
    maps = prepare_maps(C, groups, tuple(names), GROUPS, tuple(layout["grid"]), layout["patch_size"],
                        C_null=swapped_maps(C[:bank_K + 1, 0], torch.arange(bank_K + 1), torch.from_numpy(ident)))
    mine = frame_from_attention(A, maps, layout, names)
    theirs = real.per_image.sort_values(["image_id", "layer", "head"]).reset_index(drop=True)
    recompute = {c: float(np.nanmax(np.abs(mine[c].to_numpy() - theirs[c].to_numpy())))
                 for c in ("s_cls__sift", "s_pp__sift", "s_cls_null", "partial_spearman_sift")}
    recompute["s_cls_p_agree"] = float(np.mean(np.isclose(mine["s_cls_p"], theirs["s_cls_p"])))
    log(f"  (c) runs done, recomputation max |diff| {recompute}  {time.time() - t0:.0f}s")

    per_mode: dict[str, list] = {m: [] for m in modes}
    twin_maps: dict[str, list] = {m: [] for m in modes}
    rng = np.random.default_rng(12)
    for r in range(reps):
        sigma = derangement(len(C), rng)
        for mode in modes:
            maps = paired_maps(C, groups, sigma, mode, layout, names, n_perm, seed=0)
            fm = frame_from_attention(A, maps, layout, names)
            ft = frame_from_attention(At, maps, layout, names)
            per_mode[mode].append({s: conclusions(fm, ft, names, s) for s in STATS})
            twin_maps[mode].append({s: conclusions(ft, None, names, s, maps_only=True) for s in STATS})
        if (r + 1) % 25 == 0:
            log(f"  (c) derangement {r + 1}/{reps}  {time.time() - t0:.0f}s")
    rows = []
    for mode in modes:
        for s in STATS:
            rows += summarize([x[s] for x in per_mode[mode]], setting="c", model="vit_tiny_imagenette",
                              null=mode, stat=s)
            rows += [row for row in summarize([x[s] for x in twin_maps[mode]], setting="c", model="twin (random init)",
                                              null=mode, stat=s)
                     if row["conclusion"] in ("per_map p<0.05", "BH share (mean)", "BH rejects any (per layer)")]
    return {"n_images": len(C), "reps": reps, "null_K_real": bank_K, "layout": layout, "rows": rows,
            "real_finding": real_verdicts, "recompute_check": recompute, "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict], keep=("per_map p<0.05", "BH share (mean)", "BH rejects any (per layer)",
                                           "follows (per layer)", "follows names any layer", "specific names any layer",
                                           "partial corr. names any layer", "follows, min_effect=0 names any layer",
                                           "follows, no twin names any layer")) -> str:
    lines = ["| setting | model | null | stat | conclusion | FPR | 95% CI | n | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["conclusion"] not in keep:
            continue
        extra = f" (worst layer {r['worst_layer']}: {r['worst_layer_rate']:.3f})" if "worst_layer" in r else ""
        lines.append(f"| {r['setting']} | {r['model']} | {r['null']} | {r['stat']} | {r['conclusion']}{extra} | "
                     f"{r['rate']:.4f} | [{r['lo']:.4f}, {r['hi']:.4f}] | {r['n']} | {r['goal']} |")
    return "\n".join(lines)


def _cell(r: dict | None, digits: int = 3) -> str:
    if r is None:
        return "–"
    flag = " **✗**" if r["goal"] == "MISSED" else ""
    return f"{r['rate']:.{digits}f} [{r['lo']:.{digits}f}, {r['hi']:.{digits}f}]{flag}"


def compact_table(rows: list[dict]) -> str:
    """One line per setting x model x null x stat: the report's conclusions' FPRs (95% CI); ✗ = rate > 0.06."""
    cols = [("per_map p<0.05", "per-map p<0.05"), ("BH share (mean)", "BH share"),
            ("BH rejects any (per layer)", "BH rejects any / layer"),
            ("follows (per layer)", "follows / layer"), ("follows names any layer", "follows: any layer"),
            ("specific names any layer", "specific: any layer"),
            ("partial corr. names any layer", "partial: any layer"),
            ("follows, min_effect=0 names any layer", "diag. min_effect=0: any layer"),
            ("follows, no twin names any layer", "diag. no twin: any layer")]
    head = "| setting | model | null | stat | replicates | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    keys = []
    for r in rows:
        k = (r["setting"], r["model"], r["null"], r["stat"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        mine = {r["conclusion"]: r for r in rows if (r["setting"], r["model"], r["null"], r["stat"]) == k}
        reps = mine.get("follows names any layer", mine.get("BH share (mean)"))["n"]
        if "follows names any layer" not in mine:
            reps = "–"
        lines.append(f"| {' | '.join(k)} | {reps} | " + " | ".join(_cell(mine.get(c[0])) for c in cols) + " |")
    return "\n".join(lines)


def power_table(power: list[dict]) -> str:
    lines = ["| β | null | stat | effect (planted layers) | per-map p<0.05 (planted) | BH share (planted) | "
             "follows / planted layer | follows, min_effect=0 | follows names an unplanted layer | "
             "per-map p<0.05 (unplanted) |", "|" + "---|" * 10]
    for p in power:
        lines.append(f"| {p['beta']} | {p['null']} | {p['stat']} | {p['effect_planted_layers']:.3f} | "
                     f"{p['per_map_power']:.3f} [{p['per_map_power_ci'][0]:.3f}, {p['per_map_power_ci'][1]:.3f}] | "
                     f"{p['bh_share_planted']:.3f} | {p['follows_power']:.2f} [{p['follows_power_ci'][0]:.2f}, "
                     f"{p['follows_power_ci'][1]:.2f}] | {p['follows_bare_power']:.2f} | "
                     f"{p['follows_unplanted_any']:.2f} [{p['follows_unplanted_any_ci'][0]:.2f}, "
                     f"{p['follows_unplanted_any_ci'][1]:.2f}] | {p['per_map_unplanted']:.3f} |")
    return "\n".join(lines)


def real_table(real: dict) -> str:
    lines = ["| stat | layer | S | effect over swap null [95% CI] | twin effect | p (Holm) | follows | "
             "partial (twin) | specific | BH share (twin) |", "|" + "---|" * 10]
    for stat, rows in real.items():
        for r in rows:
            part = f"{r['partial']:+.3f} ({r['twin_partial']:+.3f})" if "partial" in r else "–"
            lines.append(f"| {stat} | {r['layer']} | {r['S']:.3f} | {r['effect']:+.3f} [{r['effect_lo']:+.3f}, "
                         f"{r['effect_hi']:+.3f}] | {r['twin_effect']:+.3f} | {r['p_follows']:.3g} | "
                         f"{'yes' if r['follows'] else 'no'} | {part} | {'yes' if r['specific'] else 'no'} | "
                         f"{r['bh_share']:.3f} ({r['twin_bh_share']:.3f}) |")
    return "\n".join(lines)


def print_tables(paths: list[Path]) -> None:
    """Markdown tables of finished runs (for RESULTS.md)."""
    for path in paths:
        res = json.loads(Path(path).read_text())
        print(f"\n### {path} ({res['command']}, {res['seconds']:.0f} s)\n")
        for st in res["settings"].values():
            if not isinstance(st, dict):
                continue
            print(compact_table(st["rows"]) + "\n")
            if "power" in st:
                print(power_table(st["power"]) + "\n")
            if "real_finding" in st:
                print(real_table(st["real_finding"]) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes: a smoke run of all three settings")
    ap.add_argument("--settings", default="abc", help="which null settings to run: any of a, b, c")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="imagenette2-160.tar (b and c skip without it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration")
    ap.add_argument("--reps-a", type=int, default=100)
    ap.add_argument("--images-a", type=int, default=40)
    ap.add_argument("--power-reps", type=int, default=20)
    ap.add_argument("--betas", default="0.1,0.25,0.5,1")
    ap.add_argument("--images-b", type=int, default=32)
    ap.add_argument("--seeds-ti", type=int, default=10)
    ap.add_argument("--seeds-s", type=int, default=4)
    ap.add_argument("--other-null-seeds", type=int, default=1, help="(b): init seeds run with shift and permute")
    ap.add_argument("--images-c", type=int, default=64)
    ap.add_argument("--reps-c", type=int, default=60)
    ap.add_argument("--tables", nargs="+", type=Path, help="only print markdown tables of finished result files")
    args = ap.parse_args(argv)
    if args.tables:
        print_tables(args.tables)
        return {}
    if args.quick:
        args.reps_a, args.images_a, args.power_reps, args.betas = 8, 24, 4, "0.5,1"
        args.images_b, args.seeds_ti, args.seeds_s = 8, 1, 0
        args.images_c, args.reps_c = 24, 8
    # one thread: on 2 shared cores every parallel op waits for a descheduled thread (measured 2-4x slower)
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "alpha": ALPHA, "min_effect": MIN_EFFECT, "goal": {"rate": GOAL_RATE, "ci_upper": GOAL_UPPER},
              "quick": args.quick, "settings": {}}
    t0 = time.time()
    if "a" in args.settings:
        cfg = SynthConfig(n_images=args.images_a)
        result["settings"]["a"] = run_synthetic(args.reps_a, cfg, tuple(float(b) for b in args.betas.split(",")),
                                                args.power_reps, ("swap",), log)
    if ("b" in args.settings or "c" in args.settings) and not args.data.is_file():
        log(f"{args.data} not found: settings b and c skipped")
        result["settings"]["skipped"] = f"{args.data} not found"
    elif "b" in args.settings or "c" in args.settings:
        with tempfile.TemporaryDirectory(prefix="siftlens_calib_") as tmp:
            work = Path(tmp)
            if "c" in args.settings:
                imgs = work / "images_c"
                names = extract_val_subset(args.data, args.images_c, 1, imgs)
                result["settings"]["c"] = {**run_deranged(imgs, work, args.images_c, args.reps_c, NULL_MODES, 200, log),
                                           "images": names}
            if "b" in args.settings:
                imgs = work / "images_b"
                names = extract_val_subset(args.data, args.images_b, 0, imgs)
                models = {"vit_tiny_patch16_224": args.seeds_ti}
                if args.seeds_s:
                    models["vit_small_patch16_224"] = args.seeds_s
                b = run_random_init(imgs, work, models, NULL_MODES, args.other_null_seeds, log)
                result["settings"]["b"] = {**b, "images": names}
    result["seconds"] = round(time.time() - t0, 1)
    rows = [r for s in ("a", "b", "c") if s in result["settings"] for r in result["settings"][s]["rows"]]
    missed = [r for r in rows if r["goal"] == "MISSED"]
    result["summary"] = {"conclusions": len(rows), "missed": len(missed),
                         "missed_list": [f"{r['setting']}/{r['model']}/{r['null']}/{r['stat']}: {r['conclusion']} "
                                         f"{r['rate']:.3f}" for r in missed]}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "calibration_quick.json" if args.quick else f"calibration_{args.settings}.json"
    tmp_path = args.out / f".{name}.tmp"
    tmp_path.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp_path, args.out / name)
    print(markdown_table(rows))
    log(f"wrote {args.out / name} in {result['seconds']:.0f}s; {len(missed)} of {len(rows)} rates miss the goal")
    return result


if __name__ == "__main__":
    main()
