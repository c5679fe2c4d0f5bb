"""Evaluate the shortcut method on one generated (variant, setting, seed) run, and tabulate many runs.

    python benchmarks/shortcut_suite/evaluate.py run --run runs/suite/dev_fixed_patch_0/scratch/s0
    python benchmarks/shortcut_suite/evaluate.py table --evals runs/suite/*/*/s*/eval/eval.json --out table.md

``run`` drives the method through its CLI, as a user would (contract: docs of issue 11's method branch):

1. ``siftlens spurious --model M --images RUN/discovery --out E/spurious --seed S``
2. ``siftlens flag --model M --motifs E/spurious --images RUN/test --out E/flag``
3. ``siftlens prompt --model M --images RUN/test --method {mask_tokens,random_mask,edge_mask}
   --motifs E/spurious --layers all --out E/prompt_METHOD``

A command the installed siftlens does not have (``flag`` before the method branch lands) is recorded as
"not available" and the rest goes on. With the model loaded directly it computes the references:

* the **oracle**: the TRUE cue's tokens (patches holding a pixel where the image and its cue-removed twin
  differ) masked as keys in every block (``SteeredViT`` ``mask_tokens``, layers all); its KL
  ``KL(p || p_oracle)`` is the oracle flag. For a global cue (tint: every token) token masking is
  meaningless and the oracle is n/a; the **cue-removed** reference (predict on the twin) is given for
  every family;
* a **benchmark occlusion reference** (SIFT-free, FINDINGS.md): per class, each patch token masked as a
  key in every block on up to 20 aligned discovery images; the token with the largest mean drop of the
  class probability is the class's cue guess;
* 1 - max softmax and predictive entropy (flag baselines).

Scores:
* cue located, per class: the centre of the top unit's box (``motifs.csv``: ``causal_rank`` 1 and
  ``box_*`` per the contract; with an older siftlens the attention-ranked rank-1 motif's
  ``mean_x, mean_y``, marked ``legacy``) lies within one patch of the class's true cue region (the union
  of the cue boxes of its aligned discovery images; for a frame, the border band). n/a for a global cue.
* flag AUROC, two targets: conflicting vs rest (all test images); right for the wrong reason (aligned,
  correctly classified, twin misclassified) vs the other correctly classified aligned images.
* accuracy per group (aligned / conflict / none), worst group, average at the balanced test mix
  (1/3 each) and at the training mix (95 / 2.5 / 2.5 aligned / conflict / none), for no steering,
  gated ``mask_tokens``, ``random_mask``, ``edge_mask``, the oracle and the cue-removed reference.
* 95% CIs: bootstrap over test images (resampled within each group, 2000 draws, seeded), also for the
  paired differences between methods. ``table`` adds mean ± sd (ddof=1) and a t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the planted benchmark

from planted.evaluate import auroc  # noqa: E402

from siftlens.io import atomic_write_json, atomic_write_text  # noqa: E402
from siftlens.models import load_model  # noqa: E402
from siftlens.prompting import SteeredViT  # noqa: E402
from siftlens.spurious.causal import entropy, kl_divergence  # noqa: E402
from siftlens.train import normalize  # noqa: E402

GROUPS = ("aligned", "conflict", "none")
TRAIN_MIX = {"aligned": 0.95, "conflict": 0.025, "none": 0.025}
STEERING = ("mask_tokens", "random_mask", "edge_mask")
N_BOOT = 2000
RELIANT_DROP = 0.05  # "the model relies on the class's cue": masking its true tokens drops p_class by >= this


# --------------------------------------------------------------------------------------------------
# the CLI, as a user runs it


def siftlens_exe() -> list[str]:
    exe = Path(sys.executable).with_name("siftlens")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "siftlens.cli"]


def has_command(name: str) -> bool:
    r = subprocess.run(siftlens_exe() + [name, "--help"], capture_output=True, text=True)
    return r.returncode == 0


def run_cli(args: list[str], done: Path, log: list[dict]) -> str:
    """Run ``siftlens ARGS`` unless ``done`` exists; 'ok', 'not available: ...' or 'failed: ...'."""
    cmd = siftlens_exe() + args
    entry = {"command": "siftlens " + " ".join(args)}
    log.append(entry)
    if done.exists():
        entry["status"] = "ok (existing output)"
        return "ok"
    if not has_command(args[0]):
        entry["status"] = f"not available: this siftlens has no `{args[0]}` command"
        return entry["status"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    entry["seconds"] = round(time.time() - t0, 1)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        entry["status"] = f"failed (exit {r.returncode}): {last[0]}"
        return entry["status"]
    entry["status"] = "ok"
    return "ok"


# --------------------------------------------------------------------------------------------------
# model-side references


def load_images(run: Path, rel: pd.Series) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(Image.open(run / p).convert("RGB")) for p in rel])
                            ).permute(0, 3, 1, 2).contiguous()


def cue_tokens(images: torch.Tensor, twins: torch.Tensor, has_twin: np.ndarray, patch: int) -> torch.Tensor:
    """bool [N, n]: patches holding a pixel where the image differs from its cue-removed twin."""
    diff = (images != twins).any(1) & torch.from_numpy(has_twin)[:, None, None]
    n, s, _ = diff.shape
    g = s // patch
    return diff.reshape(n, g, patch, g, patch).any(4).any(2).reshape(n, g * g)


class _BatchMask:
    """token_mask_fn for SteeredViT: returns the precomputed mask of the current batch."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.current is not None and len(self.current) == len(x)
        return self.current


@torch.no_grad()
def probs(lm, x: torch.Tensor, masks: torch.Tensor | None = None, bs: int = 128) -> np.ndarray:
    """Softmax of the model, or with ``masks`` [N, n] masked as keys in every block."""
    if masks is None:
        return torch.cat([lm.forward(x[s:s + bs]).float().softmax(-1) for s in range(0, len(x), bs)]).numpy()
    holder = _BatchMask()
    steered = SteeredViT(lm, "mask_tokens", layers="all", beta=1.0, token_mask_fn=holder)
    out = []
    try:
        for s in range(0, len(x), bs):
            holder.current = masks[s:s + bs]
            out.append(steered(x[s:s + bs]).float().softmax(-1))
    finally:
        steered.remove()
    return torch.cat(out).numpy()


@torch.no_grad()
def occlusion_reference(lm, x: torch.Tensor, labels: np.ndarray, per_class: int = 20) -> dict[int, int]:
    """Per class: the patch token whose masking (as a key, every block) drops the class probability most,
    averaged over up to ``per_class`` of the class's images (the SIFT-free control of FINDINGS.md)."""
    layout = lm.layout(tuple(x.shape[-2:]))
    n = layout.num_patches
    classes = [c for c in np.unique(labels) if c >= 0]  # -1: rows left out (e.g. images without the cue)
    rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    xs, ys = x[rows], labels[rows]
    base = probs(lm, xs)[np.arange(len(ys)), ys]
    drop = np.zeros((n, len(ys)))
    for t in range(n):
        m = torch.zeros(len(ys), n, dtype=torch.bool)
        m[:, t] = True
        drop[t] = base - probs(lm, xs, m)[np.arange(len(ys)), ys]
    return {int(c): int(drop[:, ys == c].mean(1).argmax()) for c in classes}


# --------------------------------------------------------------------------------------------------
# cue located


def true_region(disc: pd.DataFrame, cls: int, size: int, patch: int) -> np.ndarray | None:
    """bool [S, S]: the class's cue region (union over its aligned discovery images) grown by one patch;
    None for a global cue."""
    rows = disc[(disc.cue_class == cls) & (disc.group == "aligned")]
    if rows.empty or (rows.region == "global").all():
        return None
    m = np.zeros((size, size), bool)
    for _, r in rows.iterrows():
        if r.region == "frame":
            w = int(round(r.frame_width * size))
            m[:w], m[-w:], m[:, :w], m[:, -w:] = True, True, True, True
        else:
            x0, y0, x1, y1 = (int(round(r[f"box_{k}"] * size)) for k in ("x0", "y0", "x1", "y1"))
            m[y0:y1, x0:x1] = True
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(m)[None, None].float(), 2 * patch + 1, 1, patch)
    return grown[0, 0].numpy() > 0


def located(centres: dict[int, tuple[float, float] | None], disc: pd.DataFrame, k: int, size: int,
            patch: int, tokens: dict[int, list[int]] | None = None) -> dict:
    """Per class: is the unit's centre (x, y in [0, 1]) inside the class's true cue region grown by a patch.
    A frame is a ring: a unit that is the whole ring has its box centre in the middle of the image, on no cue
    pixel, so for a frame a unit also counts as located when most of its ``tokens`` (token centres) lie in
    the grown band (session 9; a unit of one border token is judged as before)."""
    per_class = []
    g = size // patch
    for c in range(k):
        region = true_region(disc, c, size, patch)
        if region is None:
            per_class.append(None)
            continue
        xy = centres.get(c)
        if xy is None:
            per_class.append(False)
            continue
        xi, yi = min(int(xy[0] * size), size - 1), min(int(xy[1] * size), size - 1)
        inside = bool(region[yi, xi])
        toks = (tokens or {}).get(c)
        frame = (disc[(disc.cue_class == c) & (disc.group == "aligned")].region == "frame").any()
        if not inside and frame and toks:
            centre_px = [((t // g) * patch + patch // 2, (t % g) * patch + patch // 2) for t in toks]
            inside = float(np.mean([region[y, x] for y, x in centre_px])) >= 0.5
        per_class.append(inside)
    judged = [v for v in per_class if v is not None]
    return {"per_class": per_class, "rate": float(np.mean(judged)) if judged else None,
            "n_judged": len(judged), "chance": located_chance(disc, k, size, patch)}


def located_chance(disc: pd.DataFrame, k: int, size: int, patch: int) -> float | None:
    """The rate a uniformly random unit centre would reach: the mean share of the image inside the
    classes' grown cue regions (the null beside "cue located"; large for bands and frames)."""
    shares = [r.mean() for r in (true_region(disc, c, size, patch) for c in range(k)) if r is not None]
    return float(np.mean(shares)) if shares else None


def method_tokens(spurious_dir: Path, class_names: list[str]) -> dict[int, list[int]]:
    """The tokens of each class's top causal unit (motifs.csv ``tokens``), for the frame rule of ``located``."""
    df = pd.read_csv(spurious_dir / "motifs.csv", keep_default_na=False)
    out = {}
    if {"causal_rank", "tokens", "class"} <= set(df.columns):
        for c, name in enumerate(class_names):
            # numeric: a motifs.csv whose rows without a causal rank are empty has the ranks as floats ("1.0")
            top = df[(df["class"].astype(str) == name) & (pd.to_numeric(df.causal_rank, errors="coerce") == 1)]
            if len(top) and str(top.tokens.iloc[0]).strip():
                out[c] = [int(t) for t in str(top.tokens.iloc[0]).split()]
    return out


def claimed_classes(spurious_dir: Path) -> int | None:
    """How many classes a `spurious` run claimed a shortcut for (shortcuts.json units; what flag and prompt apply)."""
    f = spurious_dir / "shortcuts.json"
    return len({u["cls"] for u in json.loads(f.read_text())["units"]}) if f.exists() else None


def method_centres(spurious_dir: Path, class_names: list[str]) -> tuple[str, dict[int, tuple[float, float] | None]]:
    """Top unit per class from motifs.csv: contract columns if present, else the legacy attention rank."""
    df = pd.read_csv(spurious_dir / "motifs.csv")
    out: dict[int, tuple[float, float] | None] = {}
    if {"causal_rank", "box_x0", "class"} <= set(df.columns):
        for c, name in enumerate(class_names):
            top = df[(df["class"].astype(str) == name) & (df.causal_rank == 1)]
            out[c] = None if top.empty else (float(top.box_x0.iloc[0] + top.box_x1.iloc[0]) / 2,
                                             float(top.box_y0.iloc[0] + top.box_y1.iloc[0]) / 2)
        return "causal_rank 1, box centre (contract)", out
    for c in range(len(class_names)):
        top = df[(df.cls == c) & (df["rank"] == 1)] if "cls" in df else df.iloc[:0]
        out[c] = None if top.empty else (float(top.mean_x.iloc[0]), float(top.mean_y.iloc[0]))
    return "legacy: attention rank 1, mean keypoint position (no causal ranking in this siftlens)", out


def occlusion_csv_centres(spurious_dir: Path, class_names: list[str]) -> dict[int, tuple[float, float] | None]:
    df = pd.read_csv(spurious_dir / "occlusion_control.csv")
    out = {}
    for c, name in enumerate(class_names):
        top = df[(df["class"].astype(str) == name) & (df["rank"] == 1)]
        out[c] = None if top.empty else (float(top.box_x0.iloc[0] + top.box_x1.iloc[0]) / 2,
                                         float(top.box_y0.iloc[0] + top.box_y1.iloc[0]) / 2)
    return out


def spurious_located(sp: Path, class_names: list[str], disc: pd.DataFrame, size: int, patch: int) -> dict:
    """"Cue located" of the top unit of one `siftlens spurious` output folder ``sp``, read from its files."""
    basis, centres = method_centres(sp, class_names)
    return located(centres, disc, len(class_names), size, patch, method_tokens(sp, class_names)) | {
        "basis": basis, "classes_with_claimed_shortcut": claimed_classes(sp)}


def run_geometry(run: Path) -> tuple[list[str], pd.DataFrame, int, int]:
    """What judging a finished run from its files needs: class names, discovery.csv (the true cues), image size,
    patch size."""
    meta = json.loads((run / "variant.json").read_text())
    disc = pd.read_csv(run / "discovery.csv", keep_default_na=False)
    return list(meta["class_names"]), disc, int(meta["image_size"]), model_patch(run / "model")


def model_patch(model_dir: Path) -> int:
    """The patch size of a suite run's saved model, from its patch embedding's kernel. Not model.json's
    ``architecture``: for the fine-tuned (``bundled``) setting that records the scratch defaults (patch 8) while the
    model is the bundled ViT/16 (files-only judges read bundled runs with patch 8 until session 37)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return int(f.get_slice("patch_embed.proj.weight").get_shape()[-1])


def claims_located(run: Path, eval_dir: str) -> list[dict]:
    """Each shortcut claim of RUN/EVAL_DIR/spurious (shortcuts.json: what flag and prompt apply) with its effect
    and whether it sits at its class's cue (``located`` on the claim's box centre and tokens), from files alone."""
    class_names, disc, size, patch = run_geometry(run)
    k = len(class_names)
    out = []
    for u in json.loads((run / eval_dir / "spurious" / "shortcuts.json").read_text())["units"]:
        x0, y0, x1, y1 = u["box"]
        at = located({u["cls"]: ((x0 + x1) / 2, (y0 + y1) / 2)}, disc, k, size, patch, {u["cls"]: u["tokens"]})
        out.append({"cls": u["cls"], "class_name": u["class_name"], "unit": u["unit"],
                    "effect": float(u["causal_effect"]), "located": at["per_class"][u["cls"]]})
    return out


def method_located(run: Path, eval_dir: str) -> dict:
    """"Cue located" of the method's `spurious` run in RUN/EVAL_DIR/spurious, from its files alone (no forwards):
    to re-judge a finished evaluation after a change to the judge."""
    class_names, disc, size, patch = run_geometry(run)
    return spurious_located(run / eval_dir / "spurious", class_names, disc, size, patch)


def cue_reliance(p0: np.ndarray, p_oracle: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> dict:
    """Per class: the mean drop of p_class when the true cue tokens are masked, on the class's aligned test
    images, and whether it reaches ``RELIANT_DROP``. A class whose prediction does not rest on its cue leaves
    nothing to locate; the secondary "located" rate counts only the others."""
    drop = []
    for c in range(k):
        m = (groups == "aligned") & (labels == c)
        drop.append(float(np.mean(p0[m, c] - p_oracle[m, c])) if m.any() else float("nan"))
    return {"oracle_drop": drop, "reliant": [bool(d >= RELIANT_DROP) for d in drop], "threshold": RELIANT_DROP}


def rate_among_reliant(per_class: list, reliant: list[bool]) -> dict:
    """"Cue located" among the reliant classes (None where none is judged)."""
    judged = [v for v, r in zip(per_class, reliant) if r and v is not None]
    return {"rate_reliant": float(np.mean(judged)) if judged else None, "n_reliant": len(judged)}


# --------------------------------------------------------------------------------------------------
# statistics


def group_boot_indices(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, N] resampled row indices, resampling within each group (the group sizes stay fixed)."""
    rng = np.random.default_rng([seed, 99])
    parts = []
    for g in GROUPS:
        rows = np.flatnonzero(groups == g)
        if len(rows):
            parts.append(rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))])
    return np.concatenate(parts, 1)


def accuracy_metrics(correct: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """correct: [..., N] bool -> per-group accuracy, worst group, balanced and training-mix averages."""
    out = {g: correct[..., groups == g].mean(-1) for g in GROUPS}
    out["worst_group"] = np.minimum.reduce([out[g] for g in GROUPS])
    out["average_balanced"] = sum(out[g] for g in GROUPS) / len(GROUPS)
    out["average_train_mix"] = sum(TRAIN_MIX[g] * out[g] for g in GROUPS)
    return out


def ci(values: np.ndarray) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def auroc_with_ci(score: np.ndarray, positive: np.ndarray, boot: np.ndarray) -> dict:
    est = auroc(score, positive)
    bs = np.array([auroc(score[b], positive[b]) for b in boot[:500]])  # 500 draws: AUROC is slower
    bs = bs[np.isfinite(bs)]
    return {"auroc": est, "ci": ci(bs) if len(bs) else None, "n_pos": int(positive.sum()),
            "n_neg": int((~positive).sum())}


# --------------------------------------------------------------------------------------------------
# one run


FLAG_COLUMNS = ("flag_score", "predicted_class_drop", "unsupported_shortcut", "largest_kl", "occlusion_score",
                "occlusion_score_random", "occlusion_score_all")


def image_key(path: str | Path) -> str:
    """CLASS/FILE: matches a test image however a command wrote its path (absolute, relative to the working
    directory or to the images folder); unique within a generated test folder."""
    return "/".join(Path(path).parts[-2:])


def read_predictions(path: Path) -> pd.DataFrame:
    """prompt's predictions (contract names pred_base/pred_steered; current names pred_before/pred_after)."""
    df = pd.read_parquet(path)
    df = df.rename(columns={"pred_before": "pred_base", "pred_after": "pred_steered"})
    return df


# extra `siftlens spurious` runs judged on "cue located" only: the region units' SIFT-free twin (every window
# searched, not only those holding a keypoint) and, with --ablate-regions, the method without region units
LOCATION_RUNS = {"method_region_all_windows": ["--region-windows", "all"]}
ABLATIONS = {"method_without_regions": ["--region-images", "0"]}
# with --ablate-dense: the same method without dense words (the last --dense-words wins), i.e. what they add
DENSE_ABLATIONS = {"method_without_dense_words": ["--dense-words", "0"]}
# with --ablate-words: the same method with the default 64 visual words (the last --words wins)
WORDS_ABLATIONS = {"method_with_64_words": ["--words", "64"]}


def evaluate_run(run: Path, out: Path | None = None, seed: int | None = None, skip_cli: bool = False,
                 ablate_regions: bool = False, spurious_args: Sequence[str] = (), ablate_dense: bool = False,
                 ablate_words: bool = False, prompt_args: Sequence[str] = (), flag_args: Sequence[str] = ()) -> dict:
    """Every number of one (variant, setting, seed) folder; ``spurious_args``: extra `siftlens spurious` options
    for the method and its location runs (a method variant under test, e.g. ``--dense-words 64``); ``prompt_args``:
    extra `siftlens prompt` options for every steering run, controls included (e.g. ``--gate counterfactual``);
    ``flag_args``: extra `siftlens flag` options (e.g. ``--margin 0``)."""
    t_start = time.time()
    out = out or run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((run / "variant.json").read_text())
    seed = int(meta["seed"]) if seed is None else seed
    model = run / "model" / "model.safetensors"
    if not model.exists():
        raise FileNotFoundError(f"--run {run}: no model/model.safetensors (train it with train.py first)")
    class_names = list(meta["class_names"])
    k = len(class_names)
    test = pd.read_csv(run / "test.csv", keep_default_na=False)
    disc = pd.read_csv(run / "discovery.csv", keep_default_na=False)
    log: list[dict] = []
    status: dict[str, str] = {}

    # --- the method, through the CLI
    sp = out / "spurious"
    if not skip_cli:
        status["spurious"] = run_cli(["spurious", "--model", str(model), "--images", str(run / "discovery"),
                                      "--out", str(sp), "--seed", str(seed), *spurious_args], sp / "motifs.csv", log)
        extra = (LOCATION_RUNS | (ABLATIONS if ablate_regions else {}) | (DENSE_ABLATIONS if ablate_dense else {})
                 | (WORDS_ABLATIONS if ablate_words else {}))
        for name, args in extra.items():
            status[name] = run_cli(["spurious", "--model", str(model), "--images", str(run / "discovery"),
                                    "--out", str(out / name), "--seed", str(seed), *spurious_args, *args],
                                   out / name / "motifs.csv", log)
        status["flag"] = run_cli(["flag", "--model", str(model), "--motifs", str(sp), "--images", str(run / "test"),
                                  "--out", str(out / "flag"), *flag_args], out / "flag" / "flags.parquet", log)
        for m in STEERING:
            d = out / f"prompt_{m}"
            status[f"prompt_{m}"] = run_cli(["prompt", "--model", str(model), "--images", str(run / "test"),
                                             "--method", m, "--motifs", str(sp), "--layers", "all",
                                             "--seed", str(seed), "--out", str(d), *prompt_args],
                                            d / "predictions.parquet", log)
    t_cli = time.time() - t_start

    # --- references computed with the model directly
    torch.manual_seed(seed)
    lm = load_model(str(model))
    size = int(meta["image_size"])
    patch = lm.layout((size, size)).patch_size
    x_u8 = load_images(run, test.path)
    has_twin = (test.twin_path != "").to_numpy().copy()  # writable: torch.from_numpy warns otherwise
    twins_u8 = x_u8.clone()
    if has_twin.any():
        twins_u8[torch.from_numpy(has_twin)] = load_images(run, test.twin_path[has_twin])
    mean, std = tuple(lm.preprocess.mean), tuple(lm.preprocess.std)
    x, x_twin = normalize(x_u8, mean, std), normalize(twins_u8, mean, std)
    labels = test.label.to_numpy()
    groups = test.group.to_numpy()
    p0 = probs(lm, x)
    pred0 = p0.argmax(1)
    p_removed = probs(lm, x_twin)  # cue removed in pixels (none images: unchanged)
    tokens = cue_tokens(x_u8, twins_u8, has_twin, patch)
    global_cue = meta["variant"]["family"] == "tint"
    p_oracle = None if global_cue else probs(lm, x, tokens)

    # --- cue located
    cue_loc: dict = {}
    disc_u8 = load_images(run, disc.path)
    occ = occlusion_reference(lm, normalize(disc_u8, mean, std), np.where(disc.group == "aligned", disc.label, -1))
    g = size // patch
    occ_centres = {c: ((t % g + 0.5) / g, (t // g + 0.5) / g) for c, t in occ.items()}
    cue_loc["bench_occlusion_reference"] = located(occ_centres, disc, k, size, patch) | {
        "basis": "top token of single-token key masking (every block), 20 aligned discovery images per class"}
    if (sp / "motifs.csv").exists():
        cue_loc["method"] = spurious_located(sp, class_names, disc, size, patch)
    else:
        cue_loc["method"] = "not available"
    cue_loc["method_occlusion_control"] = (located(occlusion_csv_centres(sp, class_names), disc, k, size, patch)
                                           if (sp / "occlusion_control.csv").exists() else "not available")
    for name in (*LOCATION_RUNS, *ABLATIONS, *DENSE_ABLATIONS, *WORDS_ABLATIONS):
        if (out / name / "motifs.csv").exists():
            cue_loc[name] = spurious_located(out / name, class_names, disc, size, patch)

    # a class whose prediction does not rest on its cue leaves nothing to locate: a secondary rate counts only the
    # classes where masking the true cue tokens drops p_class by >= RELIANT_DROP on the class's aligned test images
    reliance = None
    if p_oracle is not None:
        reliance = cue_reliance(p0, p_oracle, labels, groups, k)
        for entry in cue_loc.values():
            if isinstance(entry, dict) and "per_class" in entry:
                entry |= rate_among_reliant(entry["per_class"], reliance["reliant"])

    # --- flags
    boot = group_boot_indices(groups, N_BOOT, seed)
    scores: dict[str, np.ndarray] = {
        "one_minus_max_softmax": 1 - p0.max(1),
        "entropy": entropy(p0),
        "oracle_kl_removed": kl_divergence(p0, p_removed),
    }
    if p_oracle is not None:
        scores["oracle_kl_tokens"] = kl_divergence(p0, p_oracle)
    # under --skip-cli the flags are read from an earlier run's flags.parquet where there is one
    flag_status = status.get("flag", "ok (existing output)" if (out / "flag" / "flags.parquet").exists() else "not run")
    if (out / "flag" / "flags.parquet").exists():
        fl = pd.read_parquet(out / "flag" / "flags.parquet")
        for col in FLAG_COLUMNS:  # flag_score and the per-image window occlusion with its SIFT-free controls
            if col not in fl:
                continue
            by_path = {image_key(p): s for p, s in zip(fl["path"], fl[col])}
            fs = np.array([by_path.get(image_key(p), np.nan) for p in test.path], dtype=float)
            if np.isfinite(fs).all():
                scores[col] = fs
            else:
                flag_status = f"flags.parquet lacks {int((~np.isfinite(fs)).sum())} test images"
    mt = out / "prompt_mask_tokens" / "predictions.parquet"
    if mt.exists():  # the current method's only per-image signal without `flag`: masking changes the prediction
        pr = read_predictions(mt)
        by_path = {image_key(p): r for p, r in zip(pr["path"], pr.itertuples())}
        rows = [by_path[image_key(p)] for p in test.path]
        changed = np.array([r.pred_base != r.pred_steered for r in rows], float)
        conf_drop = np.array([getattr(r, "conf_before", 0.0) - getattr(r, "conf_after", 0.0) for r in rows])
        scores["prompt_mask_changes_prediction"] = changed + 1e-3 * conf_drop  # tie-break by confidence drop
    correct0 = pred0 == labels
    correct_twin = p_removed.argmax(1) == labels
    aligned_ok = (groups == "aligned") & correct0
    rwr = aligned_ok & ~correct_twin  # right for the wrong reason
    flags: dict = {"conflict_vs_rest": {}, "right_for_wrong_reason": {}, "flag_status": flag_status,
                   "n_right_for_wrong_reason": int(rwr.sum()), "n_aligned_correct": int(aligned_ok.sum())}
    positive_c = groups == "conflict"
    for name, s in scores.items():
        flags["conflict_vs_rest"][name] = auroc_with_ci(s, positive_c, boot)
        est = auroc(s[aligned_ok], rwr[aligned_ok])
        bs = np.array([auroc(s[b[aligned_ok[b]]], rwr[b[aligned_ok[b]]]) for b in boot[:500]])
        bs = bs[np.isfinite(bs)]
        flags["right_for_wrong_reason"][name] = {"auroc": est, "ci": ci(bs) if len(bs) else None,
                                                 "n_pos": int(rwr.sum()), "n_neg": int((aligned_ok & ~rwr).sum())}
    # Can a score tell the two targets apart? Both rest on the cue; only the object (B vs an unrecognised A) differs.
    # Where no score can (AUROC ~0.5 here, the oracle's included), conflicting-vs-rest is held near the AUROC of a
    # score that ranks both targets alike above every other image: `conflict_vs_rest_if_targets_tied`.
    either = positive_c | rwr
    flags["conflict_vs_right_for_wrong_reason"] = {name: auroc(s[either], positive_c[either])
                                                   for name, s in scores.items()}
    flags["conflict_vs_rest_if_targets_tied"] = auroc(either.astype(float), positive_c)

    # --- accuracy under steering
    correct: dict[str, np.ndarray] = {"none": correct0, "cue_removed": correct_twin}
    if p_oracle is not None:
        correct["oracle_tokens"] = p_oracle.argmax(1) == labels
    steered_share: dict = {}  # per group, the share of test images gated mask_tokens touched (its gate fired)
    test_keys = [image_key(p) for p in test.path]
    for m in STEERING:
        f = out / f"prompt_{m}" / "predictions.parquet"
        if f.exists():
            pr = read_predictions(f)
            rows = pr.set_index(pd.Index([image_key(p) for p in pr["path"]])).loc[test_keys]  # in test.csv's order
            correct[m] = rows["pred_steered"].to_numpy() == labels
            if m == "mask_tokens" and "steered" in pr:
                hit = rows["steered"].to_numpy().astype(bool)
                steered_share = {g: float(hit[groups == g].mean()) for g in GROUPS if (groups == g).any()}
    fl_path = out / "flag" / "flags.parquet"
    if fl_path.exists():  # flag's prediction without the decisive window (SIFT windows; SIFT-free controls)
        fl = pd.read_parquet(fl_path)
        for col, name in (("occlusion_pred", "occlusion"), ("occlusion_pred_random", "occlusion_random"),
                          ("occlusion_pred_all", "occlusion_all")):
            if col in fl:
                by_path = dict(zip((image_key(p) for p in fl["path"]), fl[col]))
                if all(image_key(p) in by_path for p in test.path):
                    correct[name] = np.array([by_path[image_key(p)] for p in test.path]) == labels
    accuracy: dict = {}
    boot_metrics = {}
    for name, c in correct.items():
        est = accuracy_metrics(c.astype(float), groups)
        bm = accuracy_metrics(c.astype(float)[boot], groups[boot[0]])  # resampling keeps each column's group
        boot_metrics[name] = bm
        accuracy[name] = {m: float(v) for m, v in est.items()} | {"ci": {m: ci(v) for m, v in bm.items()}}
    diffs: dict = {}
    for a, b in (("mask_tokens", "none"), ("mask_tokens", "random_mask"), ("mask_tokens", "edge_mask"),
                 ("mask_tokens", "oracle_tokens"), ("oracle_tokens", "none"), ("cue_removed", "none"),
                 ("occlusion", "none"), ("occlusion", "occlusion_random"), ("occlusion", "occlusion_all"),
                 ("occlusion", "random_mask"), ("occlusion", "edge_mask"), ("occlusion", "oracle_tokens")):
        if a in correct and b in correct:
            diffs[f"{a} - {b}"] = {m: [float(accuracy[a][m] - accuracy[b][m]),
                                       *ci(boot_metrics[a][m] - boot_metrics[b][m])]
                                   for m in ("worst_group", "average_balanced", "average_train_mix", "conflict")}
    result = {
        "variant": meta["variant"]["name"], "family": meta["variant"]["family"], "split": meta["variant"]["split"],
        "setting": meta["setting"], "seed": seed, "run": str(run), "model": str(model),
        "n_test": {g: int((groups == g).sum()) for g in GROUPS}, "patch": patch, "image_size": size,
        "cli": log, "status": status, "spurious_args": list(spurious_args), "prompt_args": list(prompt_args),
        "flag_args": list(flag_args),
        "cue_located": cue_loc, "cue_reliance": reliance, "flags": flags,
        "accuracy": accuracy,
        "differences": diffs,
        "mask_tokens_steered_share": steered_share,
        "oracle": "n/a: global cue (tint), token masking would mask every token" if global_cue else
        "true cue tokens (twin differs) masked as keys in every block",
        "mean_cue_tokens": float(tokens[torch.from_numpy(has_twin)].sum(1).float().mean()) if has_twin.any() else 0.0,
        "train_mix": TRAIN_MIX, "n_boot": N_BOOT,
        "seconds": {"cli": round(t_cli, 1), "total": round(time.time() - t_start, 1)},
    }
    erm = run / "model" / "erm.json"
    if erm.exists():
        result["train"] = json.loads(erm.read_text())
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "eval.md", run_table([result]))
    return result


# --------------------------------------------------------------------------------------------------
# tables


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _ci(c) -> str:
    return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"


# the method's two per-image tools, each judged on its own: (flag score, steering)
METHOD_TOOLS = {"discovered units": ("flag_score", "mask_tokens"),
                "per-image window occlusion": ("occlusion_score", "occlusion")}


def goals(r: dict, flag: str = "flag_score", steer: str = "mask_tokens") -> dict[str, str]:
    """Issue 11's goals on one run for one (flag score, steering) pair: 'met', 'not met (...)' or 'n/a (...)'.
    The goals are judged on the held-out half; on dev runs they are a progress read-out."""
    out: dict[str, str] = {}
    m = r["cue_located"].get("method")
    out["cue located >= 90% of classes"] = (
        "n/a (method not run)" if not isinstance(m, dict) else "n/a (global cue)" if m["rate"] is None
        else ("met" if m["rate"] >= 0.9 else "not met") + f" ({m['rate']:.2f})")
    for tgt in ("conflict_vs_rest", "right_for_wrong_reason"):
        f = r["flags"][tgt].get(flag)
        if f is None:
            out[f"flag AUROC {tgt} >= 0.85, above baselines"] = f"n/a (no {flag})"
            continue
        base = max(r["flags"][tgt][b]["auroc"] for b in ("one_minus_max_softmax", "entropy"))
        ok = f["auroc"] >= 0.85 and f["ci"] is not None and f["auroc"] > base
        out[f"flag AUROC {tgt} >= 0.85, above baselines"] = ("met" if ok else "not met") + \
            f" ({f['auroc']:.3f} vs best baseline {base:.3f})"
    acc, d = r["accuracy"], r["differences"]
    if steer not in acc or "oracle_tokens" not in acc:
        out["steering"] = ("n/a (no token oracle: a global cue covers every token)" if steer in acc
                           else f"n/a (no {steer} run)")
        return out
    none, mt, orc = acc["none"], acc[steer], acc["oracle_tokens"]
    headroom = orc["worst_group"] - none["worst_group"]
    gain = mt["worst_group"] - none["worst_group"]
    share = gain / headroom if headroom > 0 else float("nan")
    out["worst-group gain >= 70% of oracle headroom"] = (
        "n/a (no headroom)" if headroom <= 0 else ("met" if share >= 0.7 else "not met") +
        f" (gain {gain:+.3f} of headroom {headroom:+.3f}: {share:.0%})")
    out["worst-group gain >= +0.15 where headroom allows"] = (
        "n/a (headroom < 0.15)" if headroom < 0.15 else ("met" if gain >= 0.15 else "not met") + f" ({gain:+.3f})")
    for mix in ("average_balanced", "average_train_mix"):
        gap = mt[mix] - orc[mix]
        out[f"{mix} >= oracle - 0.02"] = ("met" if gap >= -0.02 else "not met") + f" ({gap:+.3f})"
    for ctrl in ("random_mask", "edge_mask") + (("occlusion_random",) if steer == "occlusion" else ()):
        key = f"{steer} - {ctrl}"
        if key in d:
            lo = d[key]["worst_group"][1]
            out[f"worst group beats {ctrl} (CI excludes 0)"] = ("met" if lo > 0 else "not met") + \
                f" ({d[key]['worst_group'][0]:+.3f}, CI low {lo:+.3f})"
    return out


def run_table(results: list[dict]) -> str:
    """Markdown, one block per run: cue located, flag AUROCs, accuracies with bootstrap CIs."""
    lines = []
    for r in results:
        lines.append(f"#### {r['variant']} ({r['family']}), {r['setting']}, seed {r['seed']}\n")
        lines.append(f"test images per group: {r['n_test']}; mean true-cue tokens per cue image: "
                     f"{r['mean_cue_tokens']:.1f}; oracle: {r['oracle']}\n")
        cl = r["cue_located"]
        parts = []
        for name, v in cl.items():
            if isinstance(v, dict):
                parts.append(f"{name}: {_fmt(v['rate'])} of {v['n_judged']} classes ({v.get('basis', '')})")
            else:
                parts.append(f"{name}: {v}")
        lines.append("cue located: " + "; ".join(parts) + "\n")
        lines.append(f"flag: {r['flags']['flag_status']}; right-for-the-wrong-reason images: "
                     f"{r['flags']['n_right_for_wrong_reason']} of {r['flags']['n_aligned_correct']} correct aligned\n")
        apart = r["flags"].get("conflict_vs_right_for_wrong_reason", {})  # absent in evaluations before session 18
        lines.append("| flag score | AUROC conflicting vs rest [95% CI] | AUROC right-for-wrong-reason [95% CI] | "
                     "AUROC conflicting vs right-for-wrong-reason |")
        lines.append("|---|---|---|---|")
        for name, v in r["flags"]["conflict_vs_rest"].items():
            w = r["flags"]["right_for_wrong_reason"][name]
            lines.append(f"| {name} | {_fmt(v['auroc'])}{_ci(v['ci'])} | {_fmt(w['auroc'])}{_ci(w['ci'])} | "
                         f"{_fmt(apart.get(name))} |")
        if "conflict_vs_rest_if_targets_tied" in r["flags"]:
            lines.append(f"\nconflicting vs rest of a score that ranks both targets alike above every other image: "
                         f"{_fmt(r['flags']['conflict_vs_rest_if_targets_tied'])}")
        lines.append("")
        lines.append("| steering | aligned | conflict | none | worst group [95% CI] | avg balanced [95% CI] | "
                     "avg training mix [95% CI] |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, a in r["accuracy"].items():
            lines.append(f"| {name} | {_fmt(a['aligned'])} | {_fmt(a['conflict'])} | {_fmt(a['none'])} | "
                         f"{_fmt(a['worst_group'])}{_ci(a['ci']['worst_group'])} | "
                         f"{_fmt(a['average_balanced'])}{_ci(a['ci']['average_balanced'])} | "
                         f"{_fmt(a['average_train_mix'])}{_ci(a['ci']['average_train_mix'])} |")
        if r.get("mask_tokens_steered_share"):  # evaluations written before it was stored: absent
            lines.append("\ngated mask_tokens touched (a shortcut unit present): " + ", ".join(
                f"{g} {v:.0%}" for g, v in r["mask_tokens_steered_share"].items()) + " of the test images")
        missing = [k for k, v in r["status"].items() if v != "ok"]
        if missing:
            lines.append("\nnot available / failed: " + "; ".join(f"{k}: {r['status'][k]}" for k in missing))
        if r["differences"]:
            lines.append("\n| paired difference | worst group [95% CI] | avg balanced [95% CI] | "
                         "avg training mix [95% CI] |")
            lines.append("|---|---|---|---|")
            for name, d in r["differences"].items():
                lines.append(f"| {name} | " + " | ".join(f"{d[m][0]:+.3f} [{d[m][1]:+.3f}, {d[m][2]:+.3f}]"
                                                         for m in ("worst_group", "average_balanced",
                                                                   "average_train_mix")) + " |")
        for tool, (flag, steer) in METHOD_TOOLS.items():
            lines.append(f"\nissue 11 goals, {tool} ({flag}, {steer}; judged on the held-out half): " +
                         "; ".join(f"{k}: {v}" for k, v in goals(r, flag, steer).items()))
        lines.append("")
    return "\n".join(lines) + "\n"


def compact_tables(results: list[dict]) -> str:
    """Three tables over runs: accuracy per steering, flag AUROCs, cue located."""
    lines = ["| run | steering | aligned | conflict | none | worst group [95% CI] | avg balanced | avg training mix |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        tag = f"{r['variant']} {r['setting']} s{r['seed']}"
        for name, a in r["accuracy"].items():
            lines.append(f"| {tag} | {name} | {_fmt(a['aligned'])} | {_fmt(a['conflict'])} | {_fmt(a['none'])} | "
                         f"{_fmt(a['worst_group'])}{_ci(a['ci']['worst_group'])} | {_fmt(a['average_balanced'])} | "
                         f"{_fmt(a['average_train_mix'])} |")
    scores = sorted({s for r in results for s in r["flags"]["conflict_vs_rest"]})
    lines += ["", "| run | target | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
    for r in results:
        tag = f"{r['variant']} {r['setting']} s{r['seed']}"
        for tgt, short in (("conflict_vs_rest", "conflicting vs rest"),
                           ("right_for_wrong_reason", f"RWR ({r['flags']['n_right_for_wrong_reason']} of "
                                                      f"{r['flags']['n_aligned_correct']})")):
            cells = [(f"{_fmt(r['flags'][tgt][s]['auroc'])}{_ci(r['flags'][tgt][s]['ci'])}"
                      if s in r["flags"][tgt] else "—") for s in scores]
            lines.append(f"| {tag} | {short} | " + " | ".join(cells) + " |")
    keys = ["method", "method_occlusion_control", "bench_occlusion_reference"]
    keys += [k for k in (*LOCATION_RUNS, *ABLATIONS, *DENSE_ABLATIONS, *WORDS_ABLATIONS)
             if any(k in r["cue_located"] for r in results)]
    heads = {"method_region_all_windows": "region units over every window (SIFT-free twin)",
             "method_without_regions": "method without region units",
             "method_without_dense_words": "method without dense words",
             "method_with_64_words": "method with 64 words"}
    cols = ["run", "cue located: method (basis)", "method's occlusion control", "benchmark occlusion reference",
            *(heads[k] for k in keys[3:])]
    lines += ["", "| " + " | ".join(cols) + " |", "|---|" + "---|" * len(keys)]
    for r in results:
        tag = f"{r['variant']} {r['setting']} s{r['seed']}"
        chance = None
        if Path(r["run"], "discovery.csv").exists():  # evaluations written before 'chance' was stored
            disc = pd.read_csv(Path(r["run"], "discovery.csv"), keep_default_na=False)
            chance = located_chance(disc, int(disc.label.max()) + 1, r["image_size"], r["patch"])
        cells = []
        for key in keys:
            v = r["cue_located"].get(key, "not available")
            if isinstance(v, dict):
                judged = [x for x in v["per_class"] if x is not None]
                ch = v.get("chance", chance)
                cells.append("n/a (global cue)" if not judged else f"{sum(judged)}/{len(judged)}" +
                             (" (legacy attention rank)" if "legacy" in v.get("basis", "") else "") +
                             (f", chance {ch:.2f}" if ch is not None else ""))
            else:
                cells.append(str(v))
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_table(results: list[dict]) -> str:
    """Across seeds per (variant, setting): mean ± sd (ddof=1) and the 95% t-interval over seeds."""
    from scipy.stats import t as student_t

    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by.setdefault((r["variant"], r["setting"]), []).append(r)
    lines = ["| variant | setting | seeds | quantity | mean ± sd (ddof=1) | 95% t-interval over seeds |",
             "|---|---|---|---|---|---|"]
    for (v, s), rs in sorted(by.items()):
        qty: dict[str, list[float]] = {}
        for r in rs:
            for name, a in r["accuracy"].items():
                for m in ("worst_group", "average_balanced", "average_train_mix"):
                    qty.setdefault(f"{name} {m}", []).append(a[m])
            for tgt in ("conflict_vs_rest", "right_for_wrong_reason"):
                for name, a in r["flags"][tgt].items():
                    qty.setdefault(f"AUROC {tgt} {name}", []).append(a["auroc"])
            for name, c in r["cue_located"].items():
                if isinstance(c, dict) and c["rate"] is not None:
                    qty.setdefault(f"cue located {name}", []).append(c["rate"])
        for q, vals in qty.items():
            a = np.array(vals, float)
            n = len(a)
            if n >= 2:
                sd = a.std(ddof=1)
                half = student_t.ppf(0.975, n - 1) * sd / np.sqrt(n)
                lines.append(f"| {v} | {s} | {n} | {q} | {a.mean():.3f} ± {sd:.3f} | "
                             f"[{a.mean() - half:.3f}, {a.mean() + half:.3f}] |")
            else:
                lines.append(f"| {v} | {s} | 1 | {q} | {a.mean():.3f} (one seed: no sd) | n/a |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--run", nargs="+", required=True, help="generated (variant, setting, seed) folders with model/")
    r.add_argument("--skip-cli", action="store_true", help="only the model-side references (oracle, ERM)")
    r.add_argument("--ablate-regions", action="store_true",
                   help="also run `siftlens spurious --region-images 0` and judge where its top unit is")
    r.add_argument("--ablate-dense", action="store_true",
                   help="also run `siftlens spurious` with --dense-words 0 and judge where its top unit is")
    r.add_argument("--ablate-words", action="store_true",
                   help="also run `siftlens spurious` with --words 64 and judge where its top unit is")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--spurious-args", default="", help="extra `siftlens spurious` options, one string (a method "
                   "variant under test, e.g. '--dense-words 64'); with --eval-dir, its results stay apart")
    r.add_argument("--prompt-args", default="", help="extra `siftlens prompt` options for every steering run, "
                   "one string (e.g. '--gate counterfactual'); with --eval-dir, its results stay apart")
    r.add_argument("--flag-args", default="", help="extra `siftlens flag` options, one string (e.g. '--margin 0')")
    r.add_argument("--eval-dir", default="eval", help="folder of each run that the results go to")
    j = sub.add_parser("located", help="re-judge 'cue located' of finished runs from their files (no forwards)")
    j.add_argument("--run", nargs="+", required=True)
    j.add_argument("--eval-dir", default="eval")
    c = sub.add_parser("claims", help="each shortcut claim of finished runs, its effect and whether it sits at "
                       "the cue, from their files (no forwards)")
    c.add_argument("--run", nargs="+", required=True)
    c.add_argument("--eval-dir", nargs="+", default=["eval"])
    t = sub.add_parser("table")
    t.add_argument("--evals", nargs="+", required=True)
    t.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        torch.set_num_threads(a.threads)
        for run in a.run:
            res = evaluate_run(Path(run), Path(run) / a.eval_dir, skip_cli=a.skip_cli,
                               ablate_regions=a.ablate_regions, spurious_args=shlex.split(a.spurious_args),
                               ablate_dense=a.ablate_dense, ablate_words=a.ablate_words,
                               prompt_args=shlex.split(a.prompt_args), flag_args=shlex.split(a.flag_args))
            print(f"{run}: {res['seconds']}", flush=True)
    elif a.cmd == "located":
        for run in a.run:
            res = method_located(Path(run), a.eval_dir)
            marks = "".join("-" if v is None else "+" if v else "." for v in res["per_class"])
            print(f"{run} {a.eval_dir}: located {sum(v is True for v in res['per_class'])}/{res['n_judged']} "
                  f"[{marks}] (chance {res['chance']:.2f})")
    elif a.cmd == "claims":
        for run in a.run:
            for e in a.eval_dir:
                claims = claims_located(Path(run), e)
                words = ", ".join(f"{c['class_name']} {c['unit']} {c['effect']:.3f} "
                                  f"{'at the cue' if c['located'] else 'off the cue'}" for c in claims)
                print(f"{run} {e}: {len(claims)} claims: {words or 'none'}")
    else:
        results = [json.loads(Path(f).read_text()) for f in a.evals]
        text = ("## Summary\n\n" + compact_tables(results) +
                "\n## Per run (bootstrap 95% CIs over test images)\n\n" + run_table(results) +
                "\n## Over seeds\n\n" + seeds_table(results))
        atomic_write_text(Path(a.out), text)
        print(f"-> {a.out}")


if __name__ == "__main__":
    main()
