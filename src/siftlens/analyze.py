"""`siftlens analyze`: SIFT maps in DataLoader workers, attention reduced inside the capture hooks,
per-image rows streamed to Parquet, group matrices summed in streaming form, then the report.

Outputs in ``out``:
  per_image.parquet  one row per image x layer x head (all statistics, every map)
  images.parquet     one row per analysed image (keypoints, prediction, rollout ratios)
  lift.npz           summed observed / expected group mass per layer x head (G x G)
  examples.npz       maps and CLS attention of the first few images, for figures
  manifest.json      model, preprocessing, options, versions, counts, skipped inputs + reasons
  report.html        self-contained report
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .capture import AttentionCapture, TokenLayout
from .io import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from .models import LoadedModel, load_model
from .preprocess import BadImageError, Preprocess, find_images, load_rgb
from .semantic_maps import MapConfig, SiftParams, compute_maps
from .stats import RolloutState, layer_statistics, prepare_maps


@dataclass
class AnalyzeConfig:
    """Options of `siftlens analyze` (the CLI flags, one to one)."""

    map_mode: str = "footprint"
    weight: str = "response"
    groups: int = 4
    batch_size: int = 32
    workers: int = 2
    device: str = "cpu"
    limit: int | None = None
    seed: int = 0
    null_permutations: int = 200  # K: SIFT map shuffled over patches -> z-score, p-value per head
    examples: int = 4  # images whose CLS attention and maps are kept for figures
    keep_full_maps: int = 0  # images whose full [L, H, T, T] attention is saved (float16)
    sift: SiftParams = field(default_factory=SiftParams)
    report: bool = True
    progress: bool = True

    def map_config(self) -> MapConfig:
        return MapConfig(mode=self.map_mode, weight=self.weight, groups=self.groups, sift=self.sift)


@dataclass
class AnalysisResult:
    out: Path
    per_image: pd.DataFrame
    images: pd.DataFrame
    lift: dict[str, np.ndarray]
    manifest: dict


class ImageMapsDataset(Dataset):
    """Loads, preprocesses and builds all maps of one image; bad files come back as errors."""

    def __init__(self, paths: list[Path], preprocess: Preprocess, layout: TokenLayout,
                 map_cfg: MapConfig, seed: int) -> None:
        self.paths, self.preprocess, self.layout, self.map_cfg, self.seed = paths, preprocess, layout, map_cfg, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            img = load_rgb(path, min_side=self.layout.patch_size)
            x = self.preprocess(img)
            gray = self.preprocess.to_uint8_gray(x)
            maps = compute_maps(gray, self.layout.grid, self.layout.patch_size, self.map_cfg,
                                seed=hash_seed(self.seed, i))
        except BadImageError as e:
            return {"index": i, "error": str(e)}
        except Exception as e:  # anything else unexpected about this one file: skip, keep going
            return {"index": i, "error": f"{path}: {type(e).__name__}: {e}"}
        n = self.layout.num_patches
        C = np.stack([m if m is not None else np.full(n, np.nan) for m in maps.maps.values()])
        return {"index": i, "x": x, "C": torch.from_numpy(C).float(),
                "groups": torch.from_numpy(maps.groups), "n_keypoints": len(maps.keypoints),
                "kp_xy": maps.keypoints.xy, "kp_size": maps.keypoints.size}


def hash_seed(seed: int, index: int) -> int:
    """A per-image seed that does not depend on which worker loads the image."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def collate(items: list[dict]) -> dict:
    ok = [it for it in items if "error" not in it]
    batch = {"errors": [(it["index"], it["error"]) for it in items if "error" in it], "n": len(ok)}
    if ok:
        batch["index"] = torch.tensor([it["index"] for it in ok])
        batch["x"] = torch.stack([it["x"] for it in ok])
        batch["C"] = torch.stack([it["C"] for it in ok])
        batch["groups"] = torch.stack([it["groups"] for it in ok])
        batch["n_keypoints"] = [it["n_keypoints"] for it in ok]
        batch["kp"] = [(it["kp_xy"], it["kp_size"]) for it in ok]
    return batch


PER_HEAD_SCALARS = ("prefix_mass", "entropy_pp", "mean_dist_px", "entropy_cls", "partial_spearman_sift",
                    "s_cls_z", "s_cls_p", "s_pp_z", "s_pp_p")
PER_HEAD_BY_MAP = ("s_cls", "s_pp", "s_ppw", "spearman")


def rows_from_layers(layer_out: list[dict], image_ids: np.ndarray, map_names: tuple[str, ...],
                     groups: int) -> pa.Table:
    """Flatten per-layer statistics [B, H, ...] into one row per image x layer x head."""
    L = len(layer_out)
    B, H = layer_out[0]["prefix_mass"].shape

    def col(key: str, *idx) -> np.ndarray:  # [L, B, H] -> image-major [B * L * H]
        v = torch.stack([lo[key][(slice(None), slice(None)) + idx] for lo in layer_out])
        return v.permute(1, 0, 2).reshape(-1).numpy().astype(np.float32)

    cols = {
        "image_id": np.repeat(image_ids, L * H).astype(np.int64),
        "layer": np.tile(np.repeat(np.arange(L), H), B).astype(np.int16),
        "head": np.tile(np.arange(H), B * L).astype(np.int16),
    }
    has_cls = "s_cls" in layer_out[0]
    for key in PER_HEAD_BY_MAP:
        for m, name in enumerate(map_names):
            cols[f"{key}__{name}"] = col(key, m) if (has_cls or key.startswith("s_pp")) else \
                np.full(B * L * H, np.nan, np.float32)
    for key in PER_HEAD_SCALARS:
        cols[key] = col(key) if key in layer_out[0] else np.full(B * L * H, np.nan, np.float32)
    for g in range(groups):
        for f in range(groups):
            cols[f"lift_{g}_{f}"] = col("lift", g, f)
    return pa.table(cols)


def _versions() -> dict:
    import cv2
    import timm

    v = {"siftlens": __version__, "torch": torch.__version__, "timm": timm.__version__,
         "opencv": cv2.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except ImportError:
        pass
    return v


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_images() -> Path:
    return Path(__file__).parent / "bundled" / "images"


def analyze(model: str | torch.nn.Module | LoadedModel = "vit_tiny_imagenette",
            images: str | Path | list | None = None, out: str | Path = "siftlens_out",
            config: AnalyzeConfig | None = None, checkpoint: str | None = None, random_init: bool = False,
            input_size: tuple[int, int] | None = None, **overrides) -> AnalysisResult:
    """Analyse ``model``'s attention on ``images`` against SIFT semantic maps; write ``out``.

    ``overrides`` set AnalyzeConfig fields (e.g. ``batch_size=8, map_mode="point"``).
    Returns the tables it wrote.
    """
    cfg = config or AnalyzeConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"analyze() got an unknown option {k!r}")
        setattr(cfg, k, v)
    map_cfg = cfg.map_config()
    out = ensure_writable_dir(out)
    t_start = time.time()
    torch.manual_seed(cfg.seed)

    lm = model if isinstance(model, LoadedModel) else load_model(
        model, checkpoint=checkpoint, random_init=random_init, input_size=input_size, device=cfg.device)
    lm.module.to(cfg.device).eval()
    layout = lm.layout()
    paths = find_images(images if images is not None else default_images())
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    map_names = map_cfg.map_names

    ds = ImageMapsDataset(paths, lm.preprocess, layout, map_cfg, cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                        persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None)

    tmp_rows = out / ".per_image.parquet.partial"
    writer: pq.ParquetWriter | None = None
    image_rows: list[dict] = []
    skipped: list[dict] = []
    lift_obs = lift_exp = None
    examples: dict[str, list] = {"index": [], "rgb": [], "C": [], "groups": [], "kp_xy": [], "kp_size": [],
                                 "cls_attn": [], "rollout": []}
    full_maps: list[np.ndarray] = []
    layer_out: dict[int, dict] = {}
    state: dict = {}

    def on_attention(idx: int, attn: torch.Tensor) -> None:
        if attn.shape[-1] != layout.num_tokens:
            raise RuntimeError(
                f"{lm.name}: layer {idx} attends over {attn.shape[-1]} tokens but the layout read from the "
                f"model says {layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches = "
                f"{layout.num_tokens}; this architecture's token layout is not supported")
        st = layer_statistics(attn, layout.num_prefix, layout.cls_index, state["maps"])
        state["rollout"].update(attn)
        k = state["keep_examples"]
        if k and "cls_attn" in st:
            state["ex_cls"].append(st["cls_attn"][:k].cpu())
        kf = state["keep_full"]
        if kf:
            state["full"].append(attn[:kf].detach().to(torch.float16).cpu())
        st.pop("cls_attn", None)
        layer_out[idx] = {key: v.detach().cpu() for key, v in st.items()}

    n_done = 0
    bar = tqdm(total=len(paths), desc="analyze", unit="img", disable=not cfg.progress)
    try:
        with torch.inference_mode(), AttentionCapture(lm.module, lm.backend, on_attention) as cap:
            for batch in loader:
                for i, err in batch["errors"]:
                    skipped.append({"path": str(paths[i]), "reason": err})
                bar.update(len(batch["errors"]))
                if batch["n"] == 0:
                    continue
                x = batch["x"].to(cfg.device)
                ids = batch["index"].numpy()
                state["maps"] = prepare_maps(
                    batch["C"].to(cfg.device), batch["groups"].to(cfg.device), map_names, cfg.groups,
                    layout.grid, layout.patch_size, null_seeds=[hash_seed(cfg.seed + 1, int(i)) for i in ids],
                    n_perm=cfg.null_permutations)
                state["rollout"] = RolloutState()
                state["keep_examples"] = max(0, min(batch["n"], cfg.examples - len(examples["index"])))
                state["keep_full"] = max(0, min(batch["n"], cfg.keep_full_maps - len(full_maps)))
                state["ex_cls"], state["full"] = [], []
                layer_out.clear()
                calls_before = cap.calls
                logits = lm.forward(x)
                if cap.calls == calls_before:
                    raise RuntimeError(f"{lm.name}: the forward pass produced no attention maps")
                L = len(layer_out)
                per_layer = [layer_out[i] for i in range(L)]
                table = rows_from_layers(per_layer, ids, map_names, cfg.groups)
                if writer is None:
                    writer = pq.ParquetWriter(tmp_rows, table.schema, compression="zstd")
                writer.write_table(table)

                obs = torch.stack([lo["lift_obs"].sum(0) for lo in per_layer]).double()
                exp = torch.stack([lo["lift_exp"].sum(0) for lo in per_layer]).double()
                lift_obs = obs if lift_obs is None else lift_obs + obs
                lift_exp = exp if lift_exp is None else lift_exp + exp

                rollout = state["rollout"].cls_map(layout.num_prefix, layout.cls_index)
                C = state["maps"].C
                s_roll = (layout.num_patches * (rollout[:, None, :] * C).sum(-1)).cpu().numpy() \
                    if rollout is not None else np.full((batch["n"], len(map_names)), np.nan)
                probs = logits.float().softmax(-1) if logits.dim() == 2 else None
                for b, i in enumerate(ids):
                    row = {"image_id": int(i), "path": str(paths[i]), "n_keypoints": batch["n_keypoints"][b],
                           "sift_coverage": float((batch["C"][b, 0] > 0).float().mean())
                           if batch["n_keypoints"][b] else 0.0,
                           "has_sift_map": bool(state["maps"].sift_valid[b])}
                    if probs is not None:
                        row["pred"] = int(probs[b].argmax())
                        row["pred_label"] = lm.label_names[row["pred"]] if lm.label_names and \
                            row["pred"] < len(lm.label_names) else str(row["pred"])
                        row["confidence"] = float(probs[b].max())
                    for m, name in enumerate(map_names):
                        row[f"rollout_s__{name}"] = float(s_roll[b, m])
                    image_rows.append(row)

                k = state["keep_examples"]
                if k:
                    examples["index"] += [int(i) for i in ids[:k]]
                    examples["rgb"] += [lm.preprocess.to_uint8_rgb(batch["x"][b]) for b in range(k)]
                    examples["C"] += [batch["C"][b].numpy() for b in range(k)]
                    examples["groups"] += [batch["groups"][b].numpy() for b in range(k)]
                    examples["kp_xy"] += [batch["kp"][b][0] for b in range(k)]
                    examples["kp_size"] += [batch["kp"][b][1] for b in range(k)]
                    if state["ex_cls"]:
                        cls = torch.stack(state["ex_cls"], 1)  # [k, L, H, n]
                        examples["cls_attn"] += list(cls.numpy())
                    if rollout is not None:
                        examples["rollout"] += list(rollout[:k].cpu().numpy())
                if state["keep_full"]:
                    full_maps += list(torch.stack(state["full"], 1).numpy())
                n_done += batch["n"]
                bar.update(batch["n"])
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    if writer is None:
        raise RuntimeError(f"no image could be analysed out of {len(paths)} ({len(skipped)} skipped); "
                           f"first error: {skipped[0]['reason'] if skipped else 'none'}")
    os.replace(tmp_rows, out / "per_image.parquet")
    images_df = pd.DataFrame(image_rows)
    _write_parquet(images_df, out / "images.parquet")
    lift = {"obs": lift_obs.numpy(), "exp": lift_exp.numpy(), "map_names": np.array(map_names)}
    _write_npz(out / "lift.npz", **lift)
    if examples["index"]:
        ex = {"index": np.array(examples["index"]), "map_names": np.array(map_names),
              "grid": np.array(layout.grid), "patch": np.array(layout.patch_size)}
        for key in ("rgb", "C", "groups", "cls_attn", "rollout"):
            if examples[key]:
                ex[key] = np.stack(examples[key])
        for j, (xy, sz) in enumerate(zip(examples["kp_xy"], examples["kp_size"])):
            ex[f"kp_xy_{j}"], ex[f"kp_size_{j}"] = xy, sz
        _write_npz(out / "examples.npz", **ex)
    if full_maps:
        _write_npz(out / "attention_maps.npz", attention=np.stack(full_maps),
                   index=np.array(examples["index"][: len(full_maps)]))

    no_kp = int((~images_df["has_sift_map"]).sum())
    manifest = {
        "siftlens_version": __version__,
        "model": {"name": lm.name, "backend": lm.backend, "class": type(lm.module).__name__,
                  "num_layers": len(per_layer), "num_heads": int(per_layer[0]["prefix_mass"].shape[1]),
                  "label_names": lm.label_names, **{k: v for k, v in lm.info.items() if v is not None}},
        "preprocess": lm.preprocess.to_dict(),
        "layout": {"prefix_tokens": list(layout.prefix_names), "grid": list(layout.grid),
                   "patch_size": layout.patch_size, "num_patches": layout.num_patches},
        "options": {**{k: v for k, v in asdict(cfg).items() if k not in ("sift",)},
                    "sift": asdict(cfg.sift), "map_names": list(map_names)},
        "images_source": str(images if images is not None else default_images()),
        "counts": {"inputs": len(paths), "analysed": n_done, "skipped": len(skipped),
                   "no_keypoints": no_kp, "rows": n_done * len(per_layer) * int(per_layer[0]["prefix_mass"].shape[1])},
        "skipped": skipped,
        "no_keypoints": images_df.loc[~images_df["has_sift_map"], "path"].tolist(),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "device": cfg.device,
        "seconds": round(time.time() - t_start, 2),
        "files": ["per_image.parquet", "images.parquet", "lift.npz", "examples.npz", "report.html"],
    }
    atomic_write_json(out / "manifest.json", manifest)
    result = AnalysisResult(out, pd.read_parquet(out / "per_image.parquet"), images_df, lift, manifest)
    if cfg.report:
        from .report import write_report

        write_report(out)
    return result


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import io as _io

    buf = _io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _write_npz(path: Path, **arrays) -> None:
    import io as _io

    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
