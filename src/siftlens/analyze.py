"""`siftlens analyze`: SIFT maps in DataLoader workers (with ``--keypoint-detector kornia``: SIFT on each batch
on the model's device, see BatchRunner.kornia_maps), attention reduced inside the capture hooks,
per-image rows streamed to Parquet, group matrices summed in streaming form, then the report.

Outputs in ``out``:
  per_image.parquet  one row per image x layer x head (all statistics, every map)
  images.parquet     one row per analysed image (keypoints, prediction, rollout ratios)
  lift.npz           summed observed / expected group mass per layer x head (G x G)
  examples.npz       maps and CLS attention of the first few images, for figures
  manifest.json      model, preprocessing, options, versions, counts, skipped inputs + reasons
  report.html        self-contained report
While running, finished batches live in ``.parts/`` (one atomic part per batch; removed after the
merge and the report): that is what makes a killed run resumable and a torchrun run mergeable. The
random-weights twin (``twin/``) runs on the same batches right after the model, into ``twin/.parts``.

Per batch: the workers load the image and build its maps (``ImageMapsDataset``, collated into a ``Batch``);
``BatchRunner.run`` prepares the maps on the model's device and runs the forward pass inside an
``AttentionCapture`` whose hook closes over that batch's ``BatchContext`` and reduces each layer there;
the statistics are copied to the host once per batch and written as one part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .argtypes import analyze_option_types, check_ranges
from .capture import AttentionCapture, TokenLayout
from .image_source import find_images
from .io import (
    OutputDirError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    ensure_writable_dir,
)
from .models import LoadedModel, load_model
from .preprocess import BadImageError, Preprocess, load_rgb
from .runguard import OutputLock, retire_outputs
from .semantic_maps import (
    KeypointCache,
    Keypoints,
    MapConfig,
    SiftParams,
    assemble_maps,
    compute_maps,
    concentration,
    detect_sift,
    keypoint_free_maps,
    keypoint_maps,
    keypoint_mass,
)
from .stats import (
    ANTI_CONSERVATIVE_NULLS,
    NULL_MODES,
    BatchMaps,
    RolloutState,
    Workspace,
    layer_statistics,
    prepare_maps,
    swap_columns,
)
from .validation import (
    NonFiniteError,
    UserRuntimeError,
    UserValueError,
    check_finite_attention,
    check_finite_output,
    check_finite_parameters,
    check_model_accepts_input,
)

KEYPOINT_DETECTORS = ("opencv", "kornia")


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
    # K null maps per image -> z-score, p-value and null mean per head. swap: K other images' SIFT maps
    # (the default, calibrated); shift: cyclic grid shifts of the image's own map; permute: shuffles over
    # patches (anti-conservative on smooth maps: kept for comparison only)
    null_permutations: int = 999
    null_mode: str = "swap"
    # the randomised-model sanity check: the same architecture with random weights, analysed on the first
    # twin_images images in the same run (OUT/twin/); the verdict states an effect only where the model
    # beats it by MIN_EFFECT (verdict.py)
    twin: str = "random-init"  # random-init | none
    twin_images: int = 100
    examples: int = 4  # images whose CLS attention and maps are kept for figures
    keep_full_maps: int = 0  # images whose full [L, H, T, T] attention is saved (float16)
    sift: SiftParams = field(default_factory=SiftParams)
    # opencv: cv2 SIFT per image in the DataLoader workers; kornia: SIFT on each batch on `device` in the main
    # process (keypoints_kornia; pip install "siftlens[gpu]"), the maps built from its keypoints there too
    keypoint_detector: str = "opencv"
    keypoint_cache: str | None = None  # directory of cached keypoints (keyed by image content + params)
    amp: bool = False  # bf16 autocast for the forward pass (statistics stay in float32)
    report: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        """What the CLI checks at parse time, for library callers too (and for every copy analyze() makes)."""
        check_ranges(asdict(self), analyze_option_types())
        if self.null_mode not in NULL_MODES:
            raise UserValueError(f"--null-mode {self.null_mode!r} is not one of {NULL_MODES}")
        if self.twin not in ("random-init", "none"):
            raise UserValueError(f"--twin {self.twin!r} is not one of random-init, none")
        if self.keypoint_detector not in KEYPOINT_DETECTORS:
            raise UserValueError(f"--keypoint-detector {self.keypoint_detector!r} is not one of {KEYPOINT_DETECTORS}")

    def map_config(self) -> MapConfig:
        return MapConfig(mode=self.map_mode, weight=self.weight, groups=self.groups, sift=self.sift)


class AnalysisResult:
    """What ``analyze`` wrote: the output directory, its manifest, and the tables, read from disk only when
    asked for (so a run of any size ends without its per-image table in memory)."""

    def __init__(self, out: Path, manifest: dict) -> None:
        self.out, self.manifest = Path(out), manifest

    @property
    def per_image_path(self) -> Path:
        return self.out / "per_image.parquet"

    @property
    def images_path(self) -> Path:
        return self.out / "images.parquet"

    @cached_property
    def per_image(self) -> pd.DataFrame:
        """One row per image x layer x head (read on first access: at 50,000 images x 144 heads, GBs)."""
        return pd.read_parquet(self.per_image_path)

    @cached_property
    def images(self) -> pd.DataFrame:
        return pd.read_parquet(self.images_path)

    @cached_property
    def lift(self) -> dict[str, np.ndarray]:
        with np.load(self.out / "lift.npz") as z:
            return {k: z[k] for k in z.files}

    def __repr__(self) -> str:
        return f"AnalysisResult(out={str(self.out)!r}, analysed={self.manifest['counts']['analysed']})"


class ImageMapsDataset(Dataset):
    """Loads, preprocesses and builds all maps of one image; bad files come back as errors."""

    def __init__(self, paths: list[Path], preprocess: Preprocess, layout: TokenLayout,
                 map_cfg: MapConfig, seed: int, cache_dir: str | None = None, sift_here: bool = True,
                 cache_writes: bool = True, sift_map_only: bool = False) -> None:
        self.paths, self.preprocess, self.layout, self.map_cfg, self.seed = paths, preprocess, layout, map_cfg, seed
        self.cache = KeypointCache(cache_dir, write=cache_writes) if cache_dir else None
        # False (--keypoint-detector kornia): only the maps that do not need SIFT keypoints; the main process
        # detects SIFT on the batch and fills in the rest (BatchRunner.kornia_maps)
        self.sift_here = sift_here
        # True (the swap null's bank pass, OpenCV): only the SIFT map, no model input and no baseline maps
        self.sift_map_only = sift_map_only and sift_here

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            img = load_rgb(path, min_side=self.layout.patch_size)
            x = self.preprocess(img)
            gray = self.preprocess.to_uint8_gray(x)
            if self.sift_map_only:
                return {"index": i, "sift_map": self._sift_map(gray)}
            if self.sift_here:
                maps = compute_maps(gray, self.layout.grid, self.layout.patch_size, self.map_cfg,
                                    seed=hash_seed(self.seed, i), cache=self.cache)
            else:
                other, edges = keypoint_free_maps(gray, self.layout.grid, self.layout.patch_size, self.map_cfg,
                                                  self.cache)
        except BadImageError as e:
            return {"index": i, "error": str(e)}
        except Exception as e:  # anything else unexpected about this one file: skip, keep going
            return {"index": i, "error": f"{path}: {type(e).__name__}: {e}"}
        if not self.sift_here:
            return {"index": i, "x": x, "pending": {"gray": torch.from_numpy(gray), "maps": other, "edges": edges}}
        n = self.layout.num_patches
        C = np.stack([m if m is not None else np.full(n, np.nan) for m in maps.maps.values()])
        return {"index": i, "x": x, "C": torch.from_numpy(C).float(), "groups": torch.from_numpy(maps.groups),
                "n_keypoints": len(maps.keypoints), "keypoints": (maps.keypoints.xy, maps.keypoints.size)}

    def _sift_map(self, gray: np.ndarray) -> torch.Tensor | None:
        """The SIFT concentration map [n] as compute_maps makes it (float32), None without keypoints."""
        cfg, layout = self.map_cfg, self.layout
        kp = (self.cache.get_or_detect(gray, "sift", cfg.sift, lambda: detect_sift(gray, cfg.sift))
              if self.cache is not None else detect_sift(gray, cfg.sift))
        c = concentration(keypoint_mass(kp, layout.grid, layout.patch_size, cfg.mode, cfg.weight))
        return None if c is None else torch.from_numpy(c).float()


WORKER_NICENESS = 5


@contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """OpenCV's thread count for the run (restored after). Set in this process, before the DataLoader forks
    its workers, so each worker runs SIFT on one thread: by default OpenCV spreads it over every core, on top
    of the other workers and the forward pass's threads. (Calling cv2.setNumThreads in a forked worker can
    deadlock when this process has used OpenCV's thread pool.) The keypoints do not depend on it (tested)."""
    old = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(old)


def init_map_worker(_worker_id: int) -> None:
    """A DataLoader worker that decodes and maps images runs at a lower priority than the forward pass, whose
    parallel ops stall whenever one of their threads is descheduled; the workers take the cycles it leaves."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not allowed here: run at the same priority
        pass


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads, then restore the previous number."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def hash_seed(seed: int, index: int) -> int:
    """A per-image seed that does not depend on which worker loads the image."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class Batch:
    """The images of one batch that loaded, and the inputs that did not (one layout for both detectors)."""

    errors: list[tuple[int, str]]  # (image index, reason) of inputs that could not be loaded
    index: torch.Tensor  # [B] image indices into the run's input list
    x: torch.Tensor | None  # [B, 3, h, w] model inputs
    C: torch.Tensor | None = None  # [B, M, n] maps (NaN rows where undefined); None until kornia_maps ran
    groups: torch.Tensor | None = None  # [B, n] SIFT concentration groups
    n_keypoints: list[int] = field(default_factory=list)
    keypoints: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (xy, size) per image
    # --keypoint-detector kornia: what the workers made for BatchRunner.kornia_maps (grey images [B, H, W]
    # uint8, the maps that do not need SIFT, edge densities); None once the maps above are filled in
    pending: dict | None = None

    @property
    def n(self) -> int:
        return len(self.index)

    def below(self, limit: int) -> Batch:
        """The same batch restricted to the inputs with index < limit (maps already built)."""
        keep = self.index < limit
        if bool(keep.all()) and all(i < limit for i, _ in self.errors):
            return self
        rows = keep.nonzero().flatten().tolist()
        return Batch([(i, e) for i, e in self.errors if i < limit], self.index[keep],
                     None if self.x is None or not rows else self.x[keep],
                     None if self.C is None else self.C[keep], None if self.groups is None else self.groups[keep],
                     [self.n_keypoints[r] for r in rows], [self.keypoints[r] for r in rows])


def collate(items: list[dict]) -> Batch:
    ok = [it for it in items if "error" not in it]
    errors = [(it["index"], it["error"]) for it in items if "error" in it]
    batch = Batch(errors, torch.tensor([it["index"] for it in ok], dtype=torch.long),
                  torch.stack([it["x"] for it in ok]) if ok else None)
    if not ok:
        return batch
    if "pending" in ok[0]:  # SIFT still to detect on the batch (kornia)
        batch.pending = {"gray": torch.stack([it["pending"]["gray"] for it in ok]),
                         "maps": [it["pending"]["maps"] for it in ok],
                         "edges": [it["pending"]["edges"] for it in ok]}
    else:  # maps built in the worker (OpenCV SIFT)
        batch.C = torch.stack([it["C"] for it in ok])
        batch.groups = torch.stack([it["groups"] for it in ok])
        batch.n_keypoints = [it["n_keypoints"] for it in ok]
        batch.keypoints = [it["keypoints"] for it in ok]
    return batch


PER_HEAD_SCALARS = ("prefix_mass", "entropy_pp", "mean_dist_px", "entropy_cls", "partial_spearman_sift",
                    "s_cls_z", "s_cls_p", "s_cls_null", "s_pp_z", "s_pp_p", "s_pp_null")
PER_HEAD_BY_MAP = ("s_cls", "s_pp", "s_ppw", "spearman")


def rows_from_layers(layer_out: list[dict], image_ids: np.ndarray, map_names: tuple[str, ...],
                     groups: int) -> pa.Table:
    """Flatten per-layer statistics [B, H, ...] into one row per image x layer x head."""
    stacked = {key: torch.stack([lo[key] for lo in layer_out]) for key in layer_out[0] if key != "cls_attn"}
    return rows_from_stacked(stacked, image_ids, map_names, groups)


def rows_from_stacked(stacked: dict[str, torch.Tensor], image_ids: np.ndarray, map_names: tuple[str, ...],
                      groups: int) -> pa.Table:
    """One row per image x layer x head from every layer's statistics stacked: [L, B, H, ...] per key (CPU)."""
    L, B, H = stacked["prefix_mass"].shape

    def image_major(v: torch.Tensor) -> np.ndarray:  # [L, B, H, ...] -> [B * L * H, ...]
        v = v.movedim(1, 0).reshape(B * L * H, *v.shape[3:])
        return v.numpy().astype(np.float32, copy=False)

    nan = np.full(B * L * H, np.nan, np.float32)
    cols = {
        "image_id": np.repeat(image_ids, L * H).astype(np.int64),
        "layer": np.tile(np.repeat(np.arange(L), H), B).astype(np.int16),
        "head": np.tile(np.arange(H), B * L).astype(np.int16),
    }
    for key in PER_HEAD_BY_MAP:
        v = image_major(stacked[key]) if key in stacked else None  # [rows, M]; s_cls etc. absent without CLS
        for m, name in enumerate(map_names):
            cols[f"{key}__{name}"] = np.ascontiguousarray(v[:, m]) if v is not None else nan
    for key in PER_HEAD_SCALARS:
        cols[key] = image_major(stacked[key]) if key in stacked else nan
    lift = image_major(stacked["lift"])  # [rows, G, G]
    for g in range(groups):
        for f in range(groups):
            cols[f"lift_{g}_{f}"] = np.ascontiguousarray(lift[:, g, f])
    return pa.table(cols)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import cv2

    v = {"siftlens": __version__, "python": platform.python_version(), "opencv": cv2.__version__}
    for pkg in ("torch", "timm", "numpy", "transformers"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return v


def _detector_info(cfg: AnalyzeConfig) -> dict:
    """Which SIFT implementation made the keypoints (and, for kornia, on which device)."""
    if cfg.keypoint_detector == "kornia":
        from .keypoints_kornia import KORNIA_VERSION

        return {"name": "kornia", "version": KORNIA_VERSION, "device": cfg.device,
                "function": "siftlens.keypoints_kornia.detect_sift_kornia"}
    import cv2

    return {"name": "opencv", "version": cv2.__version__, "device": "cpu (DataLoader workers)",
            "function": "siftlens.semantic_maps.detect_sift"}


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
            input_size: tuple[int, int] | None = None, _null_bank: tuple | None = None,
            **overrides) -> AnalysisResult | None:
    """Analyse ``model``'s attention on ``images`` against SIFT semantic maps; write ``out``.

    ``overrides`` set AnalyzeConfig fields (e.g. ``batch_size=8, map_mode="point"``). Returns the
    tables it wrote (on rank 0; other ranks of a torchrun job return None).

    Each batch is written to ``out/.parts`` as soon as it is done; a run that is killed and started
    again with the same arguments skips the finished batches. Under torchrun (WORLD_SIZE > 1) each
    rank takes every WORLD_SIZE-th batch and rank 0 merges the parts in batch order, so the result is
    the same as a single-process run.

    With ``twin="random-init"`` the same architecture with random weights is analysed on the first
    ``twin_images`` images into ``out/twin`` (same maps, same null), for the report's sanity check.
    """
    base = config or AnalyzeConfig()
    for k in overrides:
        if not hasattr(base, k):
            raise TypeError(f"analyze() got an unknown option {k!r}")
    cfg = dataclasses.replace(base, **overrides)  # a copy: the caller's config is never changed (device included)
    if cfg.keypoint_detector == "kornia":
        try:
            from . import keypoints_kornia  # noqa: F401
        except ImportError as e:
            raise UserRuntimeError(str(e)) from e
    map_cfg = cfg.map_config()
    rank, world = _distributed_setup(cfg)
    t_start = time.time()
    torch.manual_seed(cfg.seed)

    lm = model if isinstance(model, LoadedModel) else load_model(
        model, checkpoint=checkpoint, random_init=random_init, input_size=input_size, device=cfg.device,
        seed=cfg.seed)  # --random-init: --seed draws the weights
    lm.module.to(cfg.device).eval()
    check_finite_parameters(lm.module, lm.name)  # NaN weights would give NaN attention, never a finding
    check_model_accepts_input(lm, cfg.device, input_size)
    out = ensure_writable_dir(out)  # after the model: a bad --model leaves no empty output directory
    with OutputLock(out, "analyze", enabled=rank == 0), opencv_threads(1):  # one run per --out (runguard.py)
        return _analyze_locked(lm, images, out, cfg, map_cfg, rank, world, t_start, checkpoint, random_init,
                               _null_bank)


def _analyze_locked(lm: LoadedModel, images, out: Path, cfg: AnalyzeConfig, map_cfg: MapConfig, rank: int,
                    world: int, t_start: float, checkpoint, random_init: bool,
                    _null_bank: tuple | None) -> AnalysisResult | None:
    layout = lm.layout()
    paths = find_images(images if images is not None else default_images())
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    map_names = map_cfg.map_names

    parts = out / ".parts"
    fingerprint = _fingerprint(lm, paths, cfg, checkpoint, random_init)
    if rank == 0:
        _start_or_resume(out, parts, fingerprint)
    _barrier(world)
    n_batches = -(-len(paths) // cfg.batch_size)
    todo = [b for b in range(n_batches) if b % world == rank and not _part_done(parts, b)]
    batches = [list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, len(paths)))) for b in todo]

    swap = cfg.null_mode == "swap" and cfg.null_permutations > 0 and _null_bank is None
    # the swap null's bank pass keeps the keypoints it detects (in .parts, or in the user's cache) and the
    # main pass reads them back, so no image's keypoints are detected twice
    cache = cfg.keypoint_cache or (str(parts / "bank_keypoints") if swap else None)
    ds = ImageMapsDataset(paths, lm.preprocess, layout, map_cfg, cfg.seed, cache,
                          sift_here=cfg.keypoint_detector == "opencv", cache_writes=cfg.keypoint_cache is not None)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                        prefetch_factor=4 if cfg.workers > 0 else None, worker_init_fn=init_map_worker)
    runner = BatchRunner(lm, layout, map_names, cfg, bank=_null_bank)
    if _null_bank is None and swap:
        bank_ds = ImageMapsDataset(paths, lm.preprocess, layout, map_cfg, cfg.seed, cache,
                                   sift_here=cfg.keypoint_detector == "opencv", sift_map_only=True)
        runner.set_bank(swap_null_bank(bank_ds, cfg.null_permutations, runner))
    twin = _plan_twin(lm, out, cfg, paths, cache) if cfg.twin != "none" else None
    # the twin runs on the main pass's batches (its images are the first ones), so they are loaded and mapped once
    twin_pass = _start_twin_pass(twin, out, paths, layout, map_names, runner.bank, rank, world) \
        if twin is not None and twin.model is not None and not twin.finished else None  # every rank: a barrier
    if twin_pass is not None:
        twin_pass[0].workspace = runner.workspace  # the two run one after the other: one set of temporaries
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"analyze[{rank}]" if world > 1 else "analyze",
               unit="img", disable=not cfg.progress)
    with torch.inference_mode():
        for b, batch in zip(todo, loader if batches else ()):
            _write_part(parts, b, runner.run(batch, paths, keep=b < max(cfg.examples, cfg.keep_full_maps)))
            if twin_pass is not None and b * cfg.batch_size < twin.limit and not _part_done(twin_pass[1], b):
                _write_part(twin_pass[1], b, twin_pass[0].run(batch.below(twin.limit), paths, keep=False))
            bar.update(len(batch.errors) + batch.n)
    bar.close()
    _barrier(world)
    twin_info = _run_twin(twin, images, out, runner.bank) if twin is not None else {"mode": "none"}
    if rank != 0:
        return None
    null = {"mode": cfg.null_mode, "K": cfg.null_permutations}
    if cfg.null_mode == "swap":
        null["K"] = 0 if runner.bank is None else len(runner.bank[0]) - 1
        null["bank_image_ids"] = [] if runner.bank is None else runner.bank[1].tolist()
    null["min_p"] = 1 / (null["K"] + 1) if null["K"] else None
    null["anti_conservative"] = cfg.null_mode in ANTI_CONSERVATIVE_NULLS
    result = _merge_parts(out, parts, n_batches, lm, layout, map_names, paths, cfg, images, t_start,
                          {"null": null, "twin": twin_info, "fingerprint": fingerprint})
    if cfg.report:
        from .report import write_report

        try:
            write_report(out)
        except BaseException:  # no manifest without its report; the parts stay, so a rerun only redoes the merge
            (out / "manifest.json").unlink(missing_ok=True)
            raise
    if cfg.twin == "none" and (out / "twin" / "manifest.json").is_file():  # an earlier run's twin is not ours
        shutil.rmtree(out / "twin", ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)
    return result


@dataclass
class BatchContext:
    """One batch's forward pass: the maps its capture hook reduces attention against and what the hook
    collects, layer by layer (on the model's device until the batch is done: one host copy per batch)."""

    maps: BatchMaps
    keep_ex: int  # images of this batch whose CLS attention is kept for figures
    keep_full: int  # images of this batch whose full attention maps are kept
    rollout: RolloutState = field(default_factory=RolloutState)
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)  # statistics [B, H, ...] per layer
    ex_cls: list[torch.Tensor] = field(default_factory=list)  # [keep_ex, H, n] per layer
    full: list[torch.Tensor] = field(default_factory=list)  # [keep_full, H, T, T] float16 per layer
    finite: list[torch.Tensor] = field(default_factory=list)  # off CPU: one 0-d bool per layer, checked after


class BatchRunner:
    """Runs one batch through the model, reducing each layer's attention inside the capture hook.

    The hook closes over a fresh BatchContext per batch (no state shared between batches or with the
    caller); the capture is entered per batch, so the model runs with fused attention outside ``run``."""

    def __init__(self, lm: LoadedModel, layout: TokenLayout, map_names: tuple[str, ...], cfg: AnalyzeConfig,
                 bank: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.lm, self.layout, self.map_names, self.cfg = lm, layout, map_names, cfg
        self.map_cfg = cfg.map_config()
        self.device = torch.device(cfg.device)
        self.cache = KeypointCache(cfg.keypoint_cache) if cfg.keypoint_cache else None
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None  # image-swap null: (maps [K+1, n], image ids)
        self._bank_on_device: torch.Tensor | None = None
        self.set_bank(bank)
        self.workspace = Workspace()  # the large per-layer temporaries, reused across layers and batches
        # Threads for the statistics. They are many memory-bound ops on tens of MB, where a second thread
        # gains little, while every parallel op waits for all threads: with the SIFT workers (or any other
        # process) on the same cores a thread is often descheduled, and the op stalls for a time slice
        # (measured: 0.6 s instead of 0.07 s per ViT-B layer on 2 shared cores). So leave one core per
        # DataLoader worker; the forward pass keeps all threads. Thread counts change no result beyond
        # float summation order.
        self.stats_threads = max(1, torch.get_num_threads() - cfg.workers) \
            if self.device.type == "cpu" else torch.get_num_threads()

    def set_bank(self, bank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The swap null's bank, kept once on the model's device (each batch indexes it there)."""
        self.bank = bank
        self._bank_on_device = None if bank is None else bank[0].to(self.device)

    def on_attention(self, ctx: BatchContext, idx: int, attn: torch.Tensor) -> None:
        layout = self.layout
        if attn.shape[-1] != layout.num_tokens:
            raise UserRuntimeError(
                f"{self.lm.name}: layer {idx} attends over {attn.shape[-1]} tokens but the layout read from the "
                f"model says {layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches = "
                f"{layout.num_tokens}; this architecture's token layout is not supported")
        if attn.device.type == "cpu":
            check_finite_attention(idx, attn, self.lm.name)  # before any statistic: NaN never reaches a p-value
        else:  # no host round trip per layer: the flags are read once after the forward (run), before any output
            ctx.finite.append(torch.isfinite(attn).all())
        with torch_threads(self.stats_threads):
            self._reduce(ctx, attn)

    def _reduce(self, ctx: BatchContext, attn: torch.Tensor) -> None:
        """Statistics, rollout and kept examples of one layer's attention (all left on attn's device)."""
        layout = self.layout
        st = layer_statistics(attn, layout.num_prefix, layout.cls_index, ctx.maps, self.workspace)
        if layout.cls_index is not None:  # rollout is read from the CLS row only (no CLS: reported as NaN)
            ctx.rollout.update(attn)
        cls_attn = st.pop("cls_attn", None)
        if ctx.keep_ex and cls_attn is not None:
            ctx.ex_cls.append(cls_attn[: ctx.keep_ex])
        if ctx.keep_full:
            ctx.full.append(attn[: ctx.keep_full].detach().to(torch.float16))
        ctx.layers.append(st)

    def kornia_maps(self, batch: Batch) -> None:
        """--keypoint-detector kornia: SIFT keypoints of the whole batch on cfg.device, then every map that
        depends on them (sift, random_kp, edges_sparse) and the groups; the workers made the other maps."""
        from .keypoints_kornia import KORNIA_VERSION, detect_sift_kornia

        cfg, layout, map_cfg = self.cfg, self.layout, self.map_cfg
        grays, other_maps, edges = batch.pending["gray"], batch.pending["maps"], batch.pending["edges"]
        key = (cfg.sift, f"kornia {KORNIA_VERSION}")
        kps: list[Keypoints | None] = [self.cache.get(g, "sift-kornia", key) if self.cache else None
                                       for g in grays.numpy()]
        todo = [b for b, kp in enumerate(kps) if kp is None]
        if todo:
            g = grays[todo].to(cfg.device).float().div_(255.0).unsqueeze(1)
            for b, kp in zip(todo, detect_sift_kornia(g, cfg.sift)):
                kps[b] = kp
                if self.cache:
                    self.cache.put(grays[b].numpy(), "sift-kornia", key, kp)
        n = layout.num_patches
        C, groups = [], []
        for b, i in enumerate(batch.index.tolist()):
            kp_maps, mass = keypoint_maps(kps[b], layout.grid, layout.patch_size, map_cfg, seed=hash_seed(cfg.seed, i),
                                          edges=edges[b])
            im = assemble_maps(kps[b], mass, kp_maps, other_maps[b], map_cfg)
            C.append(np.stack([m if m is not None else np.full(n, np.nan) for m in im.maps.values()]))
            groups.append(im.groups)
        batch.C = torch.from_numpy(np.stack(C)).float()
        batch.groups = torch.from_numpy(np.stack(groups))
        batch.n_keypoints = [len(kp) for kp in kps]
        batch.keypoints = [(kp.xy, kp.size) for kp in kps]
        batch.pending = None

    def prepare(self, batch: Batch) -> BatchMaps:
        """The batch's maps, ranks and null maps on the model's device (SIFT first if still to detect)."""
        cfg, layout = self.cfg, self.layout
        if batch.pending is not None:
            self.kornia_maps(batch)
        swap = cfg.null_mode == "swap"
        bank = swap and self.bank is not None
        keep = swap_columns(self.bank[1], batch.index).to(self.device) if bank else None
        with torch_threads(self.stats_threads):
            return prepare_maps(batch.C.to(self.device), batch.groups.to(self.device), self.map_names,
                                cfg.groups, layout.grid, layout.patch_size,
                                null_seeds=[hash_seed(cfg.seed + 1, int(i)) for i in batch.index.tolist()],
                                n_perm=0 if swap else cfg.null_permutations, null_mode=cfg.null_mode,
                                null_bank=self._bank_on_device if bank else None, null_keep=keep)

    def run(self, batch: Batch, paths: list[Path], keep: bool) -> dict:
        """Everything one batch contributes: rows, lift sums, image rows, skipped inputs, examples."""
        cfg, lm = self.cfg, self.lm
        part: dict = {"skipped": [{"path": str(paths[i]), "reason": err} for i, err in batch.errors],
                      "images": []}
        if batch.n == 0:
            return part
        ctx = BatchContext(self.prepare(batch), keep_ex=min(batch.n, cfg.examples) if keep else 0,
                           keep_full=min(batch.n, cfg.keep_full_maps) if keep else 0)
        with AttentionCapture(lm.module, lm.backend, partial(self.on_attention, ctx)) as cap, \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = lm.forward(batch.x.to(self.device))
        if cap.calls == 0:
            raise UserRuntimeError(f"{lm.name}: the forward pass produced no attention maps")
        if ctx.finite:
            finite = torch.stack(ctx.finite).cpu()
            if not bool(finite.all()):
                raise NonFiniteError(
                    f"--model {lm.name}: layer {int((~finite).nonzero()[0])} attention has NaN or Inf (model "
                    "weights non-finite or so large that the attention logits overflow?); nothing was written "
                    "for this batch")
        check_finite_output(logits, lm.name)
        with torch_threads(self.stats_threads):
            return self._finish(batch, paths, part, ctx, logits)

    def _finish(self, batch: Batch, paths: list[Path], part: dict, ctx: BatchContext,
                logits: torch.Tensor) -> dict:
        """Rows, lift sums, image rows and examples of a batch whose forward pass is done."""
        layout, lm = self.layout, self.lm
        ids = batch.index.numpy()
        # every layer's statistics stacked on the device, then copied to the host once: [L, B, H, ...] per key
        stacked = {key: torch.stack([lo[key] for lo in ctx.layers]).cpu() for key in ctx.layers[0]}
        part["table"] = rows_from_stacked(stacked, ids, self.map_names, self.cfg.groups)
        part["lift_obs"] = stacked["lift_obs"].sum(1).double().numpy()
        part["lift_exp"] = stacked["lift_exp"].sum(1).double().numpy()
        part["num_layers"], part["num_heads"] = len(ctx.layers), int(stacked["prefix_mass"].shape[2])

        rollout = ctx.rollout.cls_map(layout.num_prefix, layout.cls_index)
        s_roll = (layout.num_patches * (rollout[:, None, :] * ctx.maps.C).sum(-1)).cpu().numpy() \
            if rollout is not None else np.full((batch.n, len(self.map_names)), np.nan)
        headless = getattr(lm.module, "num_classes", None) == 0  # e.g. a pre-trained encoder: outputs features
        probs = logits.float().softmax(-1).cpu() if logits.dim() == 2 and not headless else None
        if probs is not None:
            conf, pred = probs.max(-1)
        coverage = (batch.C[:, 0] > 0).float().mean(-1)
        sift_valid = ctx.maps.sift_valid.cpu()
        names = lm.label_names
        for b, i in enumerate(ids.tolist()):
            row = {"image_id": i, "path": str(paths[i]), "n_keypoints": batch.n_keypoints[b],
                   "sift_coverage": float(coverage[b]) if batch.n_keypoints[b] else 0.0,
                   "has_sift_map": bool(sift_valid[b])}
            if probs is not None:
                row["pred"] = int(pred[b])
                row["pred_label"] = names[row["pred"]] if names and row["pred"] < len(names) else str(row["pred"])
                row["confidence"] = float(conf[b])
            for m, name in enumerate(self.map_names):
                row[f"rollout_s__{name}"] = float(s_roll[b, m])
            part["images"].append(row)

        keep_ex, keep_full = ctx.keep_ex, ctx.keep_full
        if keep_ex:
            ex = {"ex_index": ids[:keep_ex], "ex_C": batch.C[:keep_ex].numpy(),
                  "ex_groups": batch.groups[:keep_ex].numpy(),
                  "ex_rgb": np.stack([lm.preprocess.to_uint8_rgb(batch.x[b]) for b in range(keep_ex)])}
            if ctx.ex_cls:
                ex["ex_cls_attn"] = torch.stack(ctx.ex_cls, 1).cpu().numpy()  # [k, L, H, n]
            if rollout is not None:
                ex["ex_rollout"] = rollout[:keep_ex].cpu().numpy()
            for j in range(keep_ex):
                ex[f"ex_kp_xy_{j}"], ex[f"ex_kp_size_{j}"] = batch.keypoints[j]
            part["examples"] = ex
        if keep_full:
            part["full_maps"] = torch.stack(ctx.full, 1).cpu().numpy()  # [k, L, H, T, T]
            part["full_index"] = ids[:keep_full]
        return part


def _collate_bank(items: list[dict]) -> list[tuple[int, torch.Tensor | None]]:
    return [(it["index"], it.get("sift_map")) for it in items]  # unreadable inputs: no map, as in the main pass


def swap_null_bank(ds: ImageMapsDataset, k: int, runner: BatchRunner) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The image-swap null's bank: SIFT maps of the first k + 1 images of the run (input order) that have
    one, and their image ids; None with fewer than 2 such images. Every rank builds the same bank."""
    maps, ids = [], []
    chunk = 32
    loader = DataLoader(ds, batch_sampler=[list(range(s, min(s + chunk, len(ds)))) for s in range(0, len(ds), chunk)],
                        num_workers=runner.cfg.workers, collate_fn=_collate_bank if ds.sift_map_only else collate,
                        worker_init_fn=init_map_worker)
    for batch in loader:
        if isinstance(batch, list):  # SIFT maps from the workers (OpenCV): (image index, map or None), in order
            for i, m in batch:
                if m is not None and not torch.isnan(m).any():
                    maps.append(m)
                    ids.append(i)
        elif batch.n:  # kornia: detect on the batch here, like the main pass
            if batch.pending is not None:
                runner.kornia_maps(batch)
            has_sift = ~torch.isnan(batch.C[:, 0]).any(-1)
            for b, i in enumerate(batch.index.tolist()):
                if has_sift[b]:
                    maps.append(batch.C[b, 0])
                    ids.append(i)
        if len(maps) > k:
            break
    if len(maps) < 2:
        return None
    return torch.stack(maps[: k + 1]), torch.tensor(ids[: k + 1])


@dataclass
class TwinPlan:
    """The random-weights twin of a run: its model (None if it cannot be made), options and images."""

    info: dict  # what the manifest says about the twin
    model: LoadedModel | None
    cfg: AnalyzeConfig | None
    limit: int  # the twin analyses the run's first `limit` images
    finished: bool  # an identical finished twin run is in out/twin already


def _plan_twin(lm: LoadedModel, out: Path, cfg: AnalyzeConfig, paths: list[Path], cache: str | None) -> TwinPlan:
    from .models import TWIN_SEED_OFFSET, random_init_twin

    twin_seed = cfg.seed + TWIN_SEED_OFFSET
    limit = cfg.twin_images if cfg.limit is None else min(cfg.limit, cfg.twin_images)
    info = {"mode": cfg.twin, "dir": "twin", "seed": twin_seed, "images": limit}
    try:
        twin = random_init_twin(lm, seed=twin_seed)
    except ValueError as e:
        return TwinPlan({**info, "mode": "none", "reason": str(e)}, None, None, limit, False)
    tcfg = replace(cfg, twin="none", report=False, examples=0, keep_full_maps=0, limit=limit, progress=False,
                   keypoint_cache=cache)  # the images' keypoints are there already
    done = out / "twin" / "manifest.json"
    finished = False
    if done.is_file() and not (out / "twin" / ".parts").exists():
        finished = json.loads(done.read_text()).get("fingerprint") == _fingerprint(twin, paths[:limit], tcfg, None,
                                                                                   True)
    return TwinPlan(info, twin, tcfg, limit, finished)


def _start_twin_pass(twin: TwinPlan, out: Path, paths: list[Path], layout: TokenLayout, map_names: tuple[str, ...],
                     bank, rank: int, world: int) -> tuple[BatchRunner, Path]:
    """The twin's runner and parts directory: out/twin/.parts, with the fingerprint of the twin's own run, which
    _run_twin then resumes (nothing left to analyse unless the main pass was interrupted) and merges."""
    twin.model.module.to(twin.cfg.device).eval()
    parts = out / "twin" / ".parts"
    if rank == 0:
        _start_or_resume(out / "twin", parts, _fingerprint(twin.model, paths[: twin.limit], twin.cfg, None, True))
    _barrier(world)
    return BatchRunner(twin.model, layout, map_names, twin.cfg, bank=bank), parts


def _run_twin(twin: TwinPlan, images, out: Path, bank) -> dict:
    """Finish the random-weights twin in out/twin: its batches not done in the main pass, the merge (skipped
    if a finished identical twin run is there)."""
    if twin.model is not None and not twin.finished:
        analyze(twin.model, images=images, out=out / "twin", config=twin.cfg, random_init=True, _null_bank=bank)
    return twin.info


# --- parts: one per batch, written atomically; the json is written last and marks the part done ---

def _part_name(b: int) -> str:
    return f"part-{b:07d}"


def _part_done(parts: Path, b: int) -> bool:
    return (parts / f"{_part_name(b)}.json").is_file()


def _write_part(parts: Path, b: int, part: dict) -> None:
    name = _part_name(b)
    if "table" in part:
        buf = io.BytesIO()
        pq.write_table(part["table"], buf, compression="zstd")
        atomic_write_bytes(parts / f"{name}.parquet", buf.getvalue())
        arrays = {"lift_obs": part["lift_obs"], "lift_exp": part["lift_exp"], **part.get("examples", {})}
        if "full_maps" in part:
            arrays.update(full_maps=part["full_maps"], full_index=part["full_index"])
        atomic_write_npz(parts / f"{name}.npz", **arrays)
    meta = {"skipped": part["skipped"], "images": part["images"], "has_rows": "table" in part,
            "num_layers": part.get("num_layers"), "num_heads": part.get("num_heads")}
    atomic_write_json(parts / f"{name}.json", meta)


def _fingerprint(lm: LoadedModel, paths: list[Path], cfg: AnalyzeConfig, checkpoint, random_init) -> dict:
    """What must match for a run to be resumed (not workers, device or progress display)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        h.update(str(p.stat().st_size if p.exists() else -1).encode())
    opts = {k: v for k, v in asdict(cfg).items()
            if k not in ("workers", "device", "progress", "report", "keypoint_cache", "twin", "twin_images")}
    weights = hashlib.sha256()
    for t in lm.module.state_dict().values():
        weights.update(t.detach().cpu().contiguous().view(-1)[:64].float().numpy().tobytes())
    fp = {"model": lm.name, "checkpoint": str(checkpoint) if checkpoint else None, "random_init": random_init,
          "weights_sample_sha": weights.hexdigest(), "preprocess": lm.preprocess.to_dict(),
          "images_sha": h.hexdigest(), "n_images": len(paths), "options": opts}
    return json.loads(json.dumps(fp, default=str))  # as it reads back from run.json


def _start_or_resume(out: Path, parts: Path, fingerprint: dict) -> None:
    run_file = parts / "run.json"
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())
        except ValueError:
            old = {}  # unreadable: cannot be resumed, so it is another run
        if old != fingerprint and not _has_finished_batch(parts):
            shutil.rmtree(parts)  # a failed run that analysed nothing holds nothing worth resuming
            parts.mkdir(parents=True)
            atomic_write_json(run_file, fingerprint)
            return
        if old != fingerprint:
            diff = sorted(k for k in fingerprint if old.get(k) != fingerprint.get(k)) if old else \
                [f"settings ({run_file} is unreadable)"]
            raise UserRuntimeError(f"--out {out} holds an unfinished run with different {', '.join(diff)}; "
                               "use another --out or delete its .parts directory to start over")
        return
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, fingerprint)


def _read_part(parts: Path, name: str) -> tuple[dict, pa.Table | None, np.lib.npyio.NpzFile | None]:
    """A finished part: its metadata and, if it analysed images, its rows and arrays."""
    meta = json.loads((parts / f"{name}.json").read_text())
    if not meta["has_rows"]:
        return meta, None, None
    return meta, pq.read_table(parts / f"{name}.parquet"), np.load(parts / f"{name}.npz")


def _has_finished_batch(parts: Path) -> bool:
    """Whether any finished part holds analysed images (parts of only skipped files do not count)."""
    for meta in parts.glob("part-*.json"):
        try:
            if json.loads(meta.read_text()).get("has_rows"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _merge_parts(out: Path, parts: Path, n_batches: int, lm: LoadedModel, layout: TokenLayout,
                 map_names: tuple[str, ...], paths: list[Path], cfg: AnalyzeConfig, images, t_start: float,
                 extra: dict | None = None) -> AnalysisResult:
    """Stream the parts, in batch order, into the final outputs (the caller removes the parts).

    Memory stays flat in the number of images: rows and image rows go from each part straight to their
    Parquet writer; only the lift sums, the few kept examples and the skipped inputs are held."""
    lift_obs = lift_exp = None
    skipped, ex_parts, full_parts, no_kp = [], [], [], []
    n_analysed = 0
    num_layers = num_heads = None
    writers: dict[str, pq.ParquetWriter] = {}
    # unique temporary names (two writers never share them), renamed when complete, removed if anything fails
    with atomic_path(out / "per_image.parquet") as tmp_rows, atomic_path(out / "images.parquet") as tmp_images, \
            ExitStack() as stack:
        def write(name: str, path: Path, table: pa.Table) -> None:
            try:
                if name not in writers:
                    writers[name] = stack.enter_context(pq.ParquetWriter(path, table.schema, compression="zstd"))
                writers[name].write_table(table)
            except OSError as e:  # name the output being written (both temporaries are open at once)
                if isinstance(e, OutputDirError):
                    raise
                raise OutputDirError(f"{out / name}: cannot write output ({e.strerror or e})") from e

        for b in range(n_batches):
            name = _part_name(b)
            try:
                meta, table, z = _read_part(parts, name) if _part_done(parts, b) else (None, None, None)
            except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a part damaged after it was written
                raise UserRuntimeError(f"{parts}/{name}.*: unreadable ({type(e).__name__}: {e}); delete {parts} "
                                       "to start over") from None
            if meta is None:
                raise UserRuntimeError(f"{parts}/{name}.json is missing: a worker did not finish its batches")
            skipped += meta["skipped"]
            if not meta["has_rows"]:
                continue
            num_layers, num_heads = meta["num_layers"], meta["num_heads"]
            write("per_image.parquet", tmp_rows, table)
            image_rows = pd.DataFrame(meta["images"])
            write("images.parquet", tmp_images, pa.Table.from_pandas(image_rows, preserve_index=False))
            n_analysed += len(image_rows)
            no_kp += image_rows.loc[~image_rows["has_sift_map"], "path"].tolist()
            with z:
                lift_obs = z["lift_obs"] if lift_obs is None else lift_obs + z["lift_obs"]
                lift_exp = z["lift_exp"] if lift_exp is None else lift_exp + z["lift_exp"]
                if "ex_index" in z and sum(len(e["ex_index"]) for e in ex_parts) < cfg.examples:
                    ex_parts.append({k: z[k] for k in z.files if k.startswith("ex_")})
                if "full_maps" in z and sum(len(f[0]) for f in full_parts) < cfg.keep_full_maps:
                    full_parts.append((z["full_maps"], z["full_index"]))
        if not writers:
            raise UserRuntimeError(f"no image could be analysed out of {len(paths)} ({len(skipped)} skipped); "
                                   f"first error: {skipped[0]['reason'] if skipped else 'none'}")
        stack.close()  # both files complete before they are renamed into place
        retire_outputs(out, "analyze")  # the previous run's outputs go first: never a mixture of two runs
    atomic_write_npz(out / "lift.npz", obs=lift_obs, exp=lift_exp, map_names=np.array(map_names))
    _write_examples(out, ex_parts, cfg.examples, map_names, layout)
    if full_parts:
        atomic_write_npz(out / "attention_maps.npz",
                   attention=np.concatenate([f[0] for f in full_parts])[: cfg.keep_full_maps],
                   index=np.concatenate([f[1] for f in full_parts])[: cfg.keep_full_maps])
    counts = {"inputs": len(paths), "analysed": n_analysed, "skipped": len(skipped), "no_keypoints": len(no_kp),
              "rows": n_analysed * num_layers * num_heads}
    outputs = ["per_image.parquet", "images.parquet", "lift.npz", "manifest.json"] \
        + (["examples.npz"] if ex_parts and cfg.examples > 0 else []) \
        + (["attention_maps.npz"] if full_parts else []) + (["report.html"] if cfg.report else [])
    manifest = _write_manifest(out, lm, layout, map_names, cfg, images, t_start, counts, skipped, no_kp,
                               (num_layers, num_heads), outputs, extra)
    return AnalysisResult(out, manifest)


def _write_manifest(out: Path, lm: LoadedModel, layout: TokenLayout, map_names: tuple[str, ...],
                    cfg: AnalyzeConfig, images, t_start: float, counts: dict, skipped: list[dict],
                    no_kp: list[str], shape: tuple[int, int], outputs: list[str], extra: dict | None) -> dict:
    """manifest.json: model, preprocessing, options, versions, counts, skipped inputs, this run's files."""
    num_layers, num_heads = shape
    manifest = {
        "siftlens_version": __version__,
        "model": {"name": lm.name, "backend": lm.backend, "class": type(lm.module).__name__,
                  "num_layers": num_layers, "num_heads": num_heads, "label_names": lm.label_names,
                  **{k: v for k, v in lm.info.items() if v is not None}},
        "preprocess": lm.preprocess.to_dict(),
        "layout": {"prefix_tokens": list(layout.prefix_names), "grid": list(layout.grid),
                   "patch_size": layout.patch_size, "num_patches": layout.num_patches},
        "options": {**{k: v for k, v in asdict(cfg).items() if k != "sift"},
                    "sift": asdict(cfg.sift), "map_names": list(map_names)},
        "images_source": str(images if images is not None else default_images()),
        "counts": counts,
        "skipped": skipped,
        "no_keypoints": no_kp,
        "keypoint_detector": _detector_info(cfg),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "device": cfg.device,
        "seconds": round(time.time() - t_start, 2),
        # the files of this run; an earlier run's others were removed (runguard.retire_outputs)
        "command": "analyze",
        "outputs": outputs,
        **(extra or {}),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _write_examples(out: Path, ex_parts: list[dict], k: int, map_names, layout: TokenLayout) -> None:
    if not ex_parts or k <= 0:
        return
    ex = {"map_names": np.array(map_names), "grid": np.array(layout.grid), "patch": np.array(layout.patch_size)}
    for key in ("index", "C", "groups", "rgb", "cls_attn", "rollout"):
        if all(f"ex_{key}" in e for e in ex_parts):
            ex[key] = np.concatenate([e[f"ex_{key}"] for e in ex_parts])[:k]
    j = 0
    for e in ex_parts:
        for i in range(len(e["ex_index"])):
            if j < k:
                ex[f"kp_xy_{j}"], ex[f"kp_size_{j}"] = e[f"ex_kp_xy_{i}"], e[f"ex_kp_size_{i}"]
            j += 1
    atomic_write_npz(out / "examples.npz", **ex)


# --- torch.distributed: shard batches over ranks; parts on a shared filesystem carry the results ---

def _distributed_setup(cfg: AnalyzeConfig) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
