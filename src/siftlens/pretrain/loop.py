"""`siftlens pretrain`: MAE pre-training with swappable masking, readable top to bottom.

Determinism: all randomness of step s (crop boxes, flips, masking draws) comes from a generator
seeded by (seed, s) and is drawn for the *global* batch, so a run resumed at any step, or split
over N processes (``torchrun``), sees the same batches as one uninterrupted process. The epoch's
image order comes from (seed, epoch).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from ..io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_parquet,
    atomic_write_text,
    ensure_writable_dir,
)
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..runguard import OutputLock
from ..schedule import warmup_cosine_lr
from ..validation import NonFiniteError, UserValueError
from .data import PretrainData, load_pretrain_data
from .evaluate import extract_features, knn_correct, linear_probe_correct
from .figures import masks_figure
from .guidance import (
    apply_crop,
    box_footprint_mass,
    cached_keypoint_table,
    cls_attention,
    edge_mass,
    sample_crop_params,
    to_concentration,
    transform_keypoints,
)
from .mae import ENCODER_ARCH, MAE, MAEConfig
from .masking import MASKINGS, alpha_schedule, loss_weights, mask_from_noise, masking_noise
from .protocol import curve_metrics

REFERENCE_FRACTION = 0.95  # issue 15's target: this fraction of the reference run's final probe accuracy


def reference_targets(run: str | Path) -> dict[str, float]:
    """{probe: REFERENCE_FRACTION x the final accuracy} of a finished `siftlens pretrain` run (its log.parquet)."""
    path = Path(run) / "log.parquet"
    if not path.is_file():
        raise UserValueError(f"--reference {run}: no log.parquet there (not a `siftlens pretrain` run directory)")
    log = pd.read_parquet(path)
    out = {}
    for probe in ("knn_acc", "linear_acc"):
        done = log.dropna(subset=[probe]) if probe in log else log.iloc[:0]
        if done.empty:
            raise UserValueError(f"--reference {run}: its log has no {probe} probe (run it with --eval-every > 0)")
        out[probe] = REFERENCE_FRACTION * float(done[probe].iloc[-1])
    return out


MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


@dataclass
class PretrainConfig:
    data: str
    out: str
    masking: str = "random"  # random | sift | sift-curriculum | edge | edge-matched | attmask-high
    alpha: float = 1.0  # exponent of (c + eps); the curriculum's final value
    alpha_start: float = -1.0  # sift-curriculum: alpha moves from here to ``alpha``
    alpha_shape: str = "linear"  # sift-curriculum: linear | cosine
    eps: float = 1e-3  # relative to the uniform share 1/N
    loss_gamma: float = 0.0  # KAMIM-style loss weights (c + eps) ** gamma; 0 = plain MAE loss
    mask_ratio: float = 0.75
    model: MAEConfig = field(default_factory=MAEConfig)
    stored_size: int = 72  # images are decoded once at this size; crops are resized to model.img_size
    crop_scale: tuple[float, float] = (0.2, 1.0)
    epochs: int = 20
    batch_size: int = 256  # global, over all processes
    lr: float = 1.5e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    eval_every: int = 2  # epochs between kNN / linear-probe evaluations (also at 0 and at the end)
    knn_k: int = 20
    probe_train_limit: int | None = 5000  # memory bank / probe training images (evenly spaced subset)
    probe_val_limit: int | None = None
    checkpoint_every: int = 100  # steps
    max_keypoints: int = 128
    keypoint_workers: int = 0  # processes for the one-time SIFT pass over the data
    limit: int | None = None  # pre-train on at most this many images
    seed: int = 0
    device: str = "cpu"
    amp: bool = False  # bf16 autocast (GPU)
    cache_dir: str | None = None
    progress: bool = True
    reference: str | None = None  # a finished run (e.g. random masking): log epochs to 95% of its final probes

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = MAEConfig(**self.model)
        self.crop_scale = tuple(self.crop_scale)
        if self.masking not in MASKINGS:
            raise UserValueError(f"--masking {self.masking!r} is not one of {MASKINGS}")
        if not 0 < self.mask_ratio < 1:
            raise UserValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.stored_size < self.model.img_size:
            raise UserValueError(f"--stored-size {self.stored_size} is smaller than --img-size {self.model.img_size}")
        m = self.model
        for what, n, d in (("--img-size", m.img_size, ("--patch-size", m.patch_size)),
                           ("--embed-dim", m.embed_dim, ("--heads", m.num_heads)),
                           ("--decoder-dim", m.decoder_dim, ("--decoder-heads", m.decoder_heads))):
            if n % d[1]:
                raise UserValueError(f"{what} {n} is not divisible by {d[0]} {d[1]}")

    # what must match for a resume to continue the same run
    def identity(self) -> dict:
        skip = {"out", "progress", "device", "amp", "cache_dir", "checkpoint_every", "keypoint_workers", "reference"}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["model"] = self.model.to_dict()
        return json.loads(json.dumps(d))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_at(step: int, total: int, warmup: int, cfg: PretrainConfig) -> float:
    return warmup_cosine_lr(step, total, warmup, cfg.lr, cfg.min_lr)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Pretrainer:
    """One pre-training run; ``run()`` does everything and returns the per-epoch log."""

    def __init__(self, cfg: PretrainConfig, data: PretrainData | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world = _dist_info()
        if cfg.batch_size % self.world:
            raise UserValueError(f"--batch-size {cfg.batch_size} is not divisible by {self.world} processes")
        self.out = Path(cfg.out)
        if self.rank == 0:
            ensure_writable_dir(self.out)
        device = cfg.device
        if device == "cuda" and self.world > 1:  # one GPU per process
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)  # model initialisation
        self.data = data if data is not None else load_pretrain_data(
            cfg.data, cfg.stored_size, cfg.cache_dir, seed=cfg.seed)
        if cfg.limit is not None and cfg.limit < len(self.data.train):  # a seeded subset, not the first classes
            keep = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(cfg.seed))
            keep = keep[:cfg.limit].sort().values
            self.data.train = self.data.train[keep]
            if self.data.train_labels is not None:
                self.data.train_labels = self.data.train_labels[keep]
        n = len(self.data.train)
        if n < cfg.batch_size:
            raise UserValueError(f"--data {cfg.data}: {n} training images, fewer than one batch ({cfg.batch_size})")
        self.steps_per_epoch = n // cfg.batch_size  # drop_last, as MAE
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.grid = cfg.model.img_size // cfg.model.patch_size

        t0 = time.perf_counter()
        self.keypoints = self.valid = None
        if cfg.masking.startswith("sift") or cfg.masking == "edge-matched" or cfg.loss_gamma:
            self._compute_keypoints()
        self.keypoint_seconds = time.perf_counter() - t0

        self.model = MAE(cfg.model).to(self.device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        decay = [p for n_, p in self.model.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n_, p in self.model.named_parameters() if p.requires_grad and p.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)
        self.targets = None  # --reference: set in run()
        self.state = {"step": 0, "history": [], "step_losses": [], "train_seconds": 0.0,
                      "guidance_seconds": 0.0, "epoch_loss_sum": 0.0}

    def _compute_keypoints(self) -> None:
        # rank 0 fills the on-disk cache first, the others then read it
        if self.rank != 0 and self.world > 1:
            dist.barrier()
        self.keypoints, self.valid = cached_keypoint_table(self.data.train, self.cfg.cache_dir, self.cfg.max_keypoints,
                                                           workers=self.cfg.keypoint_workers)
        if self.rank == 0 and self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step's inputs
    def batch_inputs(self, step: int, idx: torch.Tensor):
        """Images, masking noise and loss weights of this process's share of global batch ``idx``."""
        cfg, b = self.cfg, len(idx)
        g = step_generator(cfg.seed, step)
        S = cfg.stored_size
        crop = sample_crop_params(b, (S, S), cfg.crop_scale, g)
        uniform = torch.rand(b, self.grid ** 2, generator=g)
        share = slice(self.rank * b // self.world, (self.rank + 1) * b // self.world)
        local = idx[share]
        crop = type(crop)(*(getattr(crop, f.name)[share] for f in fields(crop)))
        x01 = apply_crop(self.data.train[local].float() / 255, crop, cfg.model.img_size)

        t0 = time.perf_counter()
        sift_c = edge_c = None
        if self.keypoints is not None:
            kp, ok = transform_keypoints(self.keypoints[local], self.valid[local], crop, cfg.model.img_size)
            sift_c = to_concentration(box_footprint_mass(kp, ok, (self.grid, self.grid), cfg.model.patch_size))
        if cfg.masking in ("edge", "edge-matched"):
            edge_c = to_concentration(edge_mass(x01, cfg.model.patch_size))
        attention = self._encoder_attention(x01) if cfg.masking == "attmask-high" else None
        alpha = cfg.alpha
        if cfg.masking == "sift-curriculum":
            alpha = alpha_schedule(cfg.alpha_start, cfg.alpha, step / max(1, self.total_steps - 1), cfg.alpha_shape)
        noise = masking_noise(cfg.masking, uniform[share], sift_c, edge_c, alpha, cfg.eps, attention)
        weights = loss_weights(sift_c, cfg.loss_gamma, cfg.eps) if cfg.loss_gamma else None
        guidance_seconds = time.perf_counter() - t0
        return (x01 - self.mean) / self.std, noise, weights, alpha, guidance_seconds

    def _encoder_attention(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, N] the current encoder's own CLS attention on these crops (AttMask's saliency; no gradient)."""
        return cls_attention(self.model.encoder, ((x01 - self.mean) / self.std).to(self.device)).cpu()

    def write_masking_figure(self, path: Path, n: int = 4) -> None:
        """masking_examples.png: step 0's first crops, their SIFT and edge maps, random vs this run's masks."""
        cfg, size, patch = self.cfg, self.cfg.model.img_size, self.cfg.model.patch_size
        g = step_generator(cfg.seed, 0)  # the crops of step 0 (a fresh generator: training draws are untouched)
        S = cfg.stored_size
        crop = sample_crop_params(n, (S, S), cfg.crop_scale, g)
        uniform = torch.rand(n, self.grid ** 2, generator=g)
        images = self.data.train[:n]
        x01 = apply_crop(images.float() / 255, crop, size)
        table, valid = cached_keypoint_table(images, None, cfg.max_keypoints)
        kp, ok = transform_keypoints(table, valid, crop, size)
        sift_c = to_concentration(box_footprint_mass(kp, ok, (self.grid, self.grid), patch))
        edge_c = to_concentration(edge_mass(x01, patch))
        zeros = torch.zeros(n, self.grid ** 2, 1)
        masks = {"random": mask_from_noise(zeros, uniform, cfg.mask_ratio)[1]}
        if cfg.masking != "random":
            alpha = cfg.alpha_start if cfg.masking == "sift-curriculum" else cfg.alpha
            attention = self._encoder_attention(x01) if cfg.masking == "attmask-high" else None
            noise = masking_noise(cfg.masking, uniform, sift_c, edge_c, alpha, cfg.eps, attention)
            masks[f"{cfg.masking} a={alpha:+g}"] = mask_from_noise(zeros, noise, cfg.mask_ratio)[1]
        masks_figure(x01, {"SIFT": sift_c, "edge": edge_c}, masks, self.grid, path)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        buf = io.BytesIO()
        torch.save({"config": self.cfg.identity(), "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(), "state": self.state}, buf)
        atomic_write_bytes(self.out / "checkpoint.pt", buf.getvalue())

    def try_resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]  # torch's unpickling errors run to many lines
            raise UserValueError(f"{path}: cannot read the checkpoint to resume ({type(e).__name__}: {first}); "
                             "delete it to start over") from None
        lacking = [k for k in ("config", "model", "optimizer", "state") if not isinstance(ck, dict) or k not in ck
                   or (k in ("config", "state") and not isinstance(ck[k], dict))]
        lacking += [f"state.{k}" for k in self.state if isinstance(ck, dict) and isinstance(ck.get("state"), dict)
                    and k not in ck["state"]]
        if lacking:
            raise UserValueError(f"{path}: not a siftlens pretrain checkpoint (lacks {', '.join(lacking)}); "
                                 "delete it to start over")
        if ck["config"] != self.cfg.identity():
            diff = sorted(k for k in ck["config"] if ck["config"].get(k) != self.cfg.identity().get(k))
            raise UserValueError(f"--out {self.out} holds a run with different settings ({', '.join(diff)}); "
                             "use another --out or delete its checkpoint.pt")
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # same settings, other tensors: an edited file
            first = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:2])[:300]  # the cause: line 2
            raise UserValueError(f"{path}: the checkpoint's weights do not fit the model its settings build "
                                 f"({type(e).__name__}: {first}); delete it to start over") from None
        self.state = ck["state"]
        return True

    # ------------------------------------------------------------------ evaluation
    def _probe_sets(self):
        d, cfg = self.data, self.cfg
        if d.train_labels is None or d.val is None or d.val_labels is None:
            return None
        if len(torch.unique(d.train_labels)) < 2:  # every probe would score 100%: no accuracy to report
            print(f"note: --data {cfg.data} has one class ({', '.join(d.classes or ['0'])[:80]}): no kNN / linear "
                  "probes (they need two classes)")
            return None

        def subset(x, y, limit):
            if limit is None or limit >= len(x):
                return x, y
            keep = torch.linspace(0, len(x) - 1, limit).round().long()
            return x[keep], y[keep]

        crop = (cfg.stored_size - cfg.model.img_size) // 2
        c = lambda x: x[..., crop:crop + cfg.model.img_size, crop:crop + cfg.model.img_size]
        (tx, ty), (vx, vy) = subset(d.train, d.train_labels, cfg.probe_train_limit), subset(d.val, d.val_labels,
                                                                                          cfg.probe_val_limit)
        return c(tx), ty, c(vx), vy

    def evaluate(self) -> dict:
        if self.probes is None:
            return {}
        tx, ty, vx, vy = self.probes
        enc = self.model.encoder
        ftr = extract_features(enc, tx, MEAN, STD, device=self.device)
        fva = extract_features(enc, vx, MEAN, STD, device=self.device)
        knn = knn_correct(ftr, ty, fva, vy, k=self.cfg.knn_k)
        lin = linear_probe_correct(ftr, ty, fva, vy)
        self._pending_outcomes = (knn.numpy(), lin.numpy())  # written with the epoch's log row
        # the same arithmetic as knn_accuracy / linear_probe_accuracy, so the logged numbers do not move
        return {"knn_acc": knn.sum().item() / len(knn), "linear_acc": lin.float().mean().item()}

    def _write_outcomes(self, epoch: int) -> None:
        """probe_outcomes.npz: per probe epoch, each validation image's kNN / linear-probe outcome (for the
        bootstrap over seeds and images of pretrain/protocol.py). A probe logged again after a resume
        replaces the earlier one of the same or a later epoch."""
        knn, lin = self._pending_outcomes
        self._pending_outcomes = None
        path = self.out / "probe_outcomes.npz"
        epochs, k_rows, l_rows = [], [], []
        if path.is_file():
            with np.load(path) as z:
                keep = z["epochs"] < epoch
                epochs, k_rows, l_rows = list(z["epochs"][keep]), list(z["knn"][keep]), list(z["linear"][keep])
        atomic_write_npz(path, epochs=np.array(epochs + [epoch]), knn=np.array(k_rows + [knn]),
                         linear=np.array(l_rows + [lin]))

    # ------------------------------------------------------------------ the loop
    def run(self) -> pd.DataFrame:
        cfg = self.cfg
        resumed = self.try_resume()
        self.probes = self._probe_sets() if self.rank == 0 else None
        self.targets = reference_targets(cfg.reference) if cfg.reference and self.rank == 0 else None
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        if self.rank == 0 and not self.state["history"]:
            try:  # a picture must never cost a training run
                self.write_masking_figure(self.out / "masking_examples.png")
            except Exception as e:  # noqa: BLE001
                print(f"warning: masking_examples.png not written ({type(e).__name__}: {e})")
            self._log_epoch(0, extra=self.evaluate())
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=f"pretrain {cfg.masking}",
                       dynamic_ncols=True)
        if resumed and self.rank == 0:
            print(f"resuming {self.out} at step {self.state['step']}/{self.total_steps}")
        self.ddp.train()
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        while self.state["step"] < self.total_steps:
            step = self.state["step"]
            epoch, i = divmod(step, self.steps_per_epoch)
            order = torch.randperm(len(self.data.train), generator=step_generator(cfg.seed, -1 - epoch))
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]

            t0 = time.perf_counter()
            x, noise, weights, alpha, guidance_s = self.batch_inputs(step, idx)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(step, self.total_steps, warmup, cfg)
            with amp:
                loss, _, _ = self.ddp(x.to(self.device), noise.to(self.device), cfg.mask_ratio,
                                      None if weights is None else weights.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_value = loss.detach().float()
            if self.world > 1:  # the logged loss is the global batch's, whatever the world size
                dist.all_reduce(loss_value)
                loss_value /= self.world
            if not math.isfinite(loss_value.item()):  # stop before a NaN model is checkpointed or exported
                raise NonFiniteError(f"--out {self.out}: the training loss is {loss_value.item()} at step {step} "
                                     "(diverged: lower --lr or --loss-gamma, or check --data); the last checkpoint "
                                     "is kept")
            self.state["train_seconds"] += time.perf_counter() - t0
            self.state["guidance_seconds"] += guidance_s
            self.state["step_losses"].append(loss_value.item())
            self.state["epoch_loss_sum"] += loss_value.item()
            self.state["step"] = step + 1
            self.state["alpha"] = alpha
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value.item():.4f}", epoch=epoch + 1)

            epoch_done = (step + 1) % self.steps_per_epoch == 0
            if epoch_done and self.rank == 0:
                last = step + 1 == self.total_steps
                do_eval = last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
                self._log_epoch(epoch + 1, extra=self.evaluate() if do_eval else {})
            if epoch_done or (step + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            self.export_encoder()
        if self.world > 1:
            dist.barrier()
        return pd.DataFrame(self.state["history"])

    def _log_epoch(self, epoch: int, extra: dict) -> None:
        s = self.state
        row = {"epoch": epoch, "step": s["step"], "loss": s["epoch_loss_sum"] / self.steps_per_epoch if epoch else None,
               "lr": lr_at(max(0, s["step"] - 1), self.total_steps, int(self.cfg.warmup_epochs * self.steps_per_epoch),
                           self.cfg) if epoch else None,
               "alpha": s.get("alpha", self.cfg.alpha), "train_seconds": s["train_seconds"],
               "guidance_seconds": s["guidance_seconds"], "knn_acc": None, "linear_acc": None, **extra}
        s["history"].append(row)
        if extra:
            row.update(curve_metrics(s["history"], self.targets))
        s["epoch_loss_sum"] = 0.0
        if getattr(self, "_pending_outcomes", None) is not None:
            self._write_outcomes(epoch)
        df = pd.DataFrame(s["history"])
        atomic_write_parquet(df, self.out / "log.parquet")
        atomic_write_text(self.out / "log.csv", df.to_csv(index=False))
        atomic_write_text(self.out / "step_losses.csv", "step,loss\n" + "".join(
            f"{i + 1},{v!r}\n" for i, v in enumerate(s["step_losses"])))
        if extra and self.cfg.progress:
            shown = {k: row[k] for k in row if k.endswith(("_acc", "_area", "_to_reference"))}
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))

    def export_encoder(self) -> Path:
        """encoder.safetensors (timm state dict) + encoder.json (how to build it, preprocessing)."""
        from safetensors.torch import save as save_safetensors

        cfg = self.cfg
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.encoder.state_dict().items()}
        path = self.out / "encoder.safetensors"
        atomic_write_bytes(path, save_safetensors(tensors))
        last_eval = next((r for r in reversed(self.state["history"]) if r.get("knn_acc") is not None), {})
        meta = {"timm_arch": ENCODER_ARCH, "timm_kwargs": cfg.model.encoder_kwargs(),
                "input_size": [3, cfg.model.img_size, cfg.model.img_size],
                "crop_pct": cfg.model.img_size / cfg.stored_size, "interpolation": "bicubic",
                "mean": list(MEAN), "std": list(STD), "label_names": self.data.classes,
                "pretrain": self.cfg.identity(),
                "knn_acc": last_eval.get("knn_acc"), "linear_acc": last_eval.get("linear_acc"),
                "keypoint_seconds": self.keypoint_seconds, "train_seconds": self.state["train_seconds"],
                "guidance_seconds": self.state["guidance_seconds"],
                "skipped_images": self.data.skipped, "probe_split": self.data.val_source}
        atomic_write_json(self.out / "encoder.json", meta)
        return path


def pretrain(cfg: PretrainConfig, data: PretrainData | None = None) -> pd.DataFrame:
    """Run (or resume) MAE pre-training; returns the per-epoch log (also in ``cfg.out``/log.parquet).

    Under ``torchrun`` each process takes its share of every global batch (gloo on CPU, nccl on GPU).
    """
    started_here = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        started_here = True
    lock = None
    try:
        if _dist_info()[0] == 0:  # one run per --out (runguard.py); rank 0 holds it for the job
            lock = OutputLock(ensure_writable_dir(cfg.out), "pretrain").acquire()
        return Pretrainer(cfg, data).run()
    finally:
        if lock is not None:
            lock.release()
        if started_here:
            dist.destroy_process_group()

