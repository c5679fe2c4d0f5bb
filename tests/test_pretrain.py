"""SIFT-guided MAE pre-training: masking functions, keypoints through crop/flip, training, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from siftlens.pretrain.data import PretrainDataError, load_pretrain_data, resize_center_crop
from siftlens.pretrain.evaluate import knn_accuracy, linear_probe_accuracy
from siftlens.pretrain.guidance import (
    CropParams,
    apply_crop,
    box_footprint_mass,
    detect_keypoint_table,
    edge_mass,
    sample_crop_params,
    to_concentration,
    transform_keypoints,
)
from siftlens.pretrain.loop import PretrainConfig, Pretrainer, pretrain
from siftlens.pretrain.mae import MAE, MAEConfig
from siftlens.pretrain.masking import (
    alpha_schedule,
    guidance_weights,
    loss_weights,
    mask_from_noise,
    masking_noise,
)
from siftlens.semantic_maps import Keypoints, edge_density, keypoint_mass

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "siftlens" / "bundled" / "images"
TINY = MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1,
                 decoder_heads=2)


def bundled_images(size: int) -> torch.Tensor:
    files = sorted(p for p in BUNDLED.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return torch.from_numpy(np.stack([resize_center_crop(Image.open(p).convert("RGB"), size) for p in files]))


# ------------------------------------------------------------------ masking

@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_mask_from_noise_exact_ratio_and_restore(ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 49, 8, generator=g)
    noise = torch.rand(5, 49, generator=g)
    vis, mask, restore = mask_from_noise(x, noise, ratio)
    n_keep = int(49 * (1 - ratio))
    assert vis.shape == (5, n_keep, 8)
    assert (mask.sum(1) == 49 - n_keep).all()
    # the visible tokens are exactly the unmasked ones, in noise order, and the smallest noise stays visible
    for b in range(5):
        kept = torch.argsort(noise[b])[:n_keep]
        assert torch.equal(vis[b], x[b, kept])
        assert (mask[b, kept] == 0).all()
    shuffled = torch.cat([vis, torch.zeros(5, 49 - n_keep, 8)], 1)
    unshuffled = torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(unshuffled[mask == 0], x[mask == 0])


def test_alpha_zero_and_uniform_maps_give_random_masks():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(64, 36, generator=g)
    c = to_concentration(torch.rand(64, 36, generator=g) ** 4)
    x = torch.zeros(64, 36, 1)
    random_mask = mask_from_noise(x, masking_noise("random", u), 0.75)[1]
    for strategy in ("sift", "sift-curriculum", "edge"):
        assert torch.equal(mask_from_noise(x, masking_noise(strategy, u, c, c, alpha=0.0), 0.75)[1], random_mask)
    flat = torch.full((64, 36), 1 / 36)
    assert torch.equal(mask_from_noise(x, masking_noise("sift", u, flat, alpha=2.0), 0.75)[1], random_mask)
    no_keypoints = torch.zeros(64, 36)  # an image without keypoints is masked at random
    assert torch.equal(mask_from_noise(x, masking_noise("sift", u, no_keypoints, alpha=2.0), 0.75)[1], random_mask)


@pytest.mark.parametrize("alpha", [1.0, -1.0, 2.0])
def test_first_masked_patch_follows_weights(alpha):
    """One masked patch out of N: its distribution must be (c + eps/N)^alpha normalised (chi-square)."""
    n, draws = 16, 40_000
    c = torch.linspace(0, 1, n) ** 2
    c = (c / c.sum()).expand(draws, n)
    u = torch.rand(draws, n, generator=torch.Generator().manual_seed(2))
    _, mask, _ = mask_from_noise(torch.zeros(draws, n, 1), masking_noise("sift", u, c, alpha=alpha), 1 / n)
    counts = mask.sum(0).numpy()
    w = guidance_weights(c[:1], alpha)[0].double().numpy()
    expected = w / w.sum() * draws
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # and the sampler is not merely uniform
    assert stats.chisquare(counts, np.full(n, draws / n)).pvalue < 1e-6


def test_alpha_sign_sets_which_patches_are_masked():
    n, draws = 36, 5_000
    c = to_concentration(torch.rand(1, n, generator=torch.Generator().manual_seed(3)) ** 3).expand(draws, n)
    u = torch.rand(draws, n, generator=torch.Generator().manual_seed(4))
    dense = c[0] > c[0].median()
    freq = {a: mask_from_noise(torch.zeros(draws, n, 1), masking_noise("sift", u, c, alpha=a), 0.75)[1].mean(0)
            for a in (1.0, 0.0, -1.0)}
    assert freq[1.0][dense].mean() > freq[0.0][dense].mean() + 0.05 > freq[-1.0][dense].mean() + 0.1
    assert abs(freq[0.0].mean() - 0.75) < 1e-6 and abs(freq[1.0].mean() - 0.75) < 1e-6


def test_alpha_schedule_and_loss_weights():
    assert alpha_schedule(-1, 1, 0.0) == -1 and alpha_schedule(-1, 1, 1.0) == 1
    assert alpha_schedule(-1, 1, 0.5) == pytest.approx(0.0)
    assert alpha_schedule(-1, 1, 0.25, "cosine") < alpha_schedule(-1, 1, 0.25)
    c = to_concentration(torch.rand(3, 16))
    w = loss_weights(c, 1.0)
    assert torch.allclose(w.mean(1), torch.ones(3))
    assert torch.equal(torch.argsort(w, 1), torch.argsort(c, 1))
    assert torch.allclose(loss_weights(c, 0.0), torch.ones(3, 16))


# ------------------------------------------------------------------ guidance maps

def test_box_footprint_matches_disc_footprint():
    x = bundled_images(128)
    table, valid = detect_keypoint_table(x, max_keypoints=500)
    for i in range(len(x)):
        k = table[i][valid[i]].double().numpy()
        disc = keypoint_mass(Keypoints(k[:, :2], k[:, 2], k[:, 3], np.zeros(len(k), int)), (16, 16), 8)
        box = box_footprint_mass(table[i:i + 1].double(), valid[i:i + 1], (16, 16), 8)[0].numpy()
        assert np.abs(disc / disc.sum() - box / box.sum()).sum() < 0.05


def test_edge_mass_matches_numpy_edge_density():
    x = bundled_images(64)
    ours = edge_mass(x.float() / 255, 8)
    gray = (0.299 * x[:, 0].double() + 0.587 * x[:, 1].double() + 0.114 * x[:, 2].double()).round().numpy()
    for i in range(len(x)):
        ref = edge_density(gray[i].astype(np.uint8), (8, 8), 8)
        assert np.corrcoef(ref, ours[i].numpy())[0, 1] > 0.99


def _map_agreement(x: torch.Tensor, crop: CropParams, size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: fraction of SIFT keypoints recomputed on the augmented image with a mapped keypoint
    within 1.5 px, and the correlation of the two concentration maps."""
    table, valid = detect_keypoint_table(x, max_keypoints=1000)
    augmented = (apply_crop(x.float() / 255, crop, size) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    again, valid2 = detect_keypoint_table(augmented, max_keypoints=1000)
    mapped, inside = transform_keypoints(table, valid, crop, size)
    patch = size // grid
    c_mapped = to_concentration(box_footprint_mass(mapped, inside, (grid, grid), patch))
    c_again = to_concentration(box_footprint_mass(again, valid2, (grid, grid), patch))
    match, corr = [], []
    for i in range(len(x)):
        a, b = mapped[i][inside[i]], again[i][valid2[i]]
        match.append((torch.cdist(b[:, :2], a[:, :2]).min(1).values < 1.5).float().mean().item())
        corr.append(np.corrcoef(c_mapped[i], c_again[i])[0, 1])
    return np.array(match), np.array(corr)


def test_keypoints_through_flip_match_sift_on_the_flipped_image():
    x = bundled_images(128)
    n = len(x)
    flip = CropParams(torch.zeros(n), torch.zeros(n), torch.full((n,), 128.0), torch.full((n,), 128.0),
                      torch.ones(n, dtype=torch.bool))
    match, corr = _map_agreement(x, flip, 128, 16)
    assert match.mean() > 0.85 and match.min() > 0.75  # measured: 0.85-0.98 per image
    assert corr.mean() > 0.9 and corr.min() > 0.85  # measured: 0.92-1.00


def test_keypoints_through_random_resized_crop_match_sift_recomputed():
    """Rescaled crops change what SIFT finds (scale-space sampling, resampling), so the tolerance is
    looser; the control is the same comparison with the crop boxes of other images."""
    x = bundled_images(128)
    crop = sample_crop_params(len(x), (128, 128), (0.3, 1.0), torch.Generator().manual_seed(0))
    match, corr = _map_agreement(x, crop, 96, 12)
    assert match.mean() > 0.5 and corr.mean() > 0.55  # measured: 0.62 and 0.70
    wrong = CropParams(*(torch.roll(getattr(crop, f), 1) for f in ("x0", "y0", "w", "h", "flip")))
    table, valid = detect_keypoint_table(x, max_keypoints=1000)
    augmented = (apply_crop(x.float() / 255, crop, 96) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    again, valid2 = detect_keypoint_table(augmented, max_keypoints=1000)
    c_wrong = to_concentration(box_footprint_mass(*transform_keypoints(table, valid, wrong, 96), (12, 12), 8))
    c_again = to_concentration(box_footprint_mass(again, valid2, (12, 12), 8))
    corr_wrong = np.array([np.corrcoef(c_wrong[i], c_again[i])[0, 1] for i in range(len(x))])
    assert corr.mean() > np.nanmean(corr_wrong) + 0.3


def test_keypoint_table_with_worker_processes_is_identical():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (300, 3, 8, 8), dtype=np.uint8).repeat(4, 2).repeat(4, 3)
    x = torch.from_numpy(np.ascontiguousarray(smooth))
    one, two = detect_keypoint_table(x, 32), detect_keypoint_table(x, 32, workers=2)
    assert one[1].any() and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# ------------------------------------------------------------------ probes

def test_knn_and_linear_probe_on_hand_made_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    ytr, yte = torch.arange(200) % 4, torch.arange(80) % 4
    ftr = centers[ytr] + torch.randn(200, 16, generator=g)
    fte = centers[yte] + torch.randn(80, 16, generator=g)
    assert knn_accuracy(ftr, ytr, fte, yte) == 1.0
    assert linear_probe_accuracy(ftr, ytr, fte, yte) == 1.0
    noise_tr, noise_te = torch.randn(200, 16, generator=g), torch.randn(80, 16, generator=g)
    assert knn_accuracy(noise_tr, ytr, noise_te, yte) < 0.5
    # 1-NN on a hand-checked case: the nearest neighbour by cosine decides
    tr = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert knn_accuracy(tr, torch.tensor([0, 1]), torch.tensor([[0.9, 0.2], [0.1, 3.0]]), torch.tensor([0, 1]),
                        k=1) == 1.0


# ------------------------------------------------------------------ training

def synthetic_npz(path: Path, n: int = 96, size: int = 40, seed: int = 0) -> Path:
    """Learnable toy images: coloured blobs and stripes on smooth backgrounds, 4 classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, labels = [], []
    for i in range(n):
        k = i % 4
        base = np.stack([xx * rng.uniform(0, 1), yy * rng.uniform(0, 1), np.full_like(xx, rng.uniform(0, 1))])
        cx, cy = rng.uniform(0.25, 0.75, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
        pattern = [blob, np.sin(xx * 20) > 0, np.sin(yy * 20) > 0, np.sin((xx + yy) * 15) > 0][k]
        img = 0.5 * base + 0.5 * pattern[None] * np.eye(3)[k % 3][:, None, None]
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
        labels.append(k)
    np.savez(path, images=np.stack(images), labels=np.array(labels))
    return path


def tiny_cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), model=TINY, stored_size=40, batch_size=16, epochs=2, lr=2e-3,
                warmup_epochs=0.5, eval_every=1, probe_train_limit=None, checkpoint_every=3, progress=False,
                cache_dir=str(out.parent / "cache"))
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return synthetic_npz(tmp_path_factory.mktemp("data") / "toy.npz")


def test_tiny_mae_loss_falls(npz, tmp_path):
    torch.manual_seed(0)
    model = MAE(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = load_pretrain_data(npz, 32)
    x = (data.train[:32].float() / 255 - 0.45) / 0.25
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss, pred, mask = model(x, torch.rand(32, 16, generator=g), 0.75)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pred.shape == (32, 16, 8 * 8 * 3) and mask.sum().item() == 32 * 12
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.mark.parametrize("masking", ["random", "sift", "sift-curriculum", "edge"])
def test_pretrain_runs_logs_and_exports(npz, tmp_path, masking):
    log = pretrain(tiny_cfg(npz, tmp_path / masking, masking=masking, loss_gamma=1.0 if masking == "sift" else 0.0))
    assert list(log["epoch"]) == [0, 1, 2]
    assert log["knn_acc"].notna().all() and log["linear_acc"].notna().all()
    assert log["loss"].iloc[2] < log["loss"].iloc[1]
    with np.load(tmp_path / masking / "probe_outcomes.npz") as z:  # per-image outcomes behind each logged accuracy
        assert list(z["epochs"]) == [0, 1, 2] and z["knn"].dtype == bool and z["knn"].shape == z["linear"].shape
        np.testing.assert_allclose(z["knn"].mean(1), log["knn_acc"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(z["linear"].mean(1), log["linear_acc"], rtol=0, atol=1e-6)
    meta = json.loads((tmp_path / masking / "encoder.json").read_text())
    assert (tmp_path / masking / "masking_examples.png").stat().st_size > 1000
    assert meta["probe_split"].startswith("10% of train held out")
    if masking.startswith("sift"):
        assert meta["keypoint_seconds"] > 0 and meta["guidance_seconds"] > 0
    if masking == "sift-curriculum":
        assert log["alpha"].iloc[-1] == pytest.approx(1.0, abs=0.05)


def test_exported_encoder_loads_in_timm_and_analyze(npz, tmp_path):
    import timm

    from siftlens.models import load_model

    out = tmp_path / "run"
    pretrain(tiny_cfg(npz, out, epochs=1))
    meta = json.loads((out / "encoder.json").read_text())
    model = timm.create_model(meta["timm_arch"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay={"file": str(out / "encoder.safetensors")})
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    mae = MAE(TINY)
    mae.load_state_dict(ck["model"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), mae.eval().encoder(x), atol=1e-6)
    lm = load_model(str(out / "encoder.safetensors"))
    assert lm.preprocess.input_size == (32, 32) and lm.label_names is None
    from siftlens import analyze

    res = analyze(str(out / "encoder.safetensors"), images=str(BUNDLED), out=tmp_path / "an", limit=2,
                  workers=0, progress=False, report=False, null_permutations=5)
    assert len(res.per_image) > 0


def test_resume_after_crash_equals_uninterrupted(npz, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    pretrain(tiny_cfg(npz, ref, masking="sift", epochs=3))
    crashed = tmp_path / "crashed"
    real = Pretrainer.batch_inputs

    def crash_at_step_8(self, step, idx):
        if step == 8:  # last checkpoint was at step 6: steps 6-7 are redone after the restart
            raise KeyboardInterrupt
        return real(self, step, idx)

    monkeypatch.setattr(Pretrainer, "batch_inputs", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(npz, crashed, masking="sift", epochs=3))
    assert not (crashed / "encoder.safetensors").exists()
    monkeypatch.undo()
    pretrain(tiny_cfg(npz, crashed, masking="sift", epochs=3))
    assert (ref / "step_losses.csv").read_text() == (crashed / "step_losses.csv").read_text()
    assert (ref / "encoder.safetensors").read_bytes() == (crashed / "encoder.safetensors").read_bytes()
    a, b = pd.read_parquet(ref / "log.parquet"), pd.read_parquet(crashed / "log.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["train_seconds", "guidance_seconds"]),
                                  b.drop(columns=["train_seconds", "guidance_seconds"]))
    with np.load(ref / "probe_outcomes.npz") as za, np.load(crashed / "probe_outcomes.npz") as zb:
        assert list(zb["epochs"]) == list(za["epochs"])  # no probe twice after the resume
        assert (za["knn"] == zb["knn"]).all() and (za["linear"] == zb["linear"]).all()


def test_kill_9_then_resume_gives_the_same_loss_curve(npz, tmp_path):
    import signal
    import time

    ref = tmp_path / "ref"
    args = ["--data", str(npz), "--img-size", "32", "--stored-size", "40", "--patch-size", "8", "--embed-dim", "32",
            "--depth", "2", "--heads", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--batch-size", "16", "--epochs", "6", "--eval-every", "0", "--checkpoint-every", "1", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    cmd = [sys.executable, "-m", "siftlens", "pretrain", *args]
    assert subprocess.run([*cmd, "--out", str(ref)], capture_output=True).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ref / "step_losses.csv").read_text() == (out / "step_losses.csv").read_text()


def test_torchrun_two_processes_equals_one(npz, tmp_path):
    ref = tmp_path / "one"
    pretrain(tiny_cfg(npz, ref, masking="sift", epochs=2, eval_every=0))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "siftlens", "pretrain", "--data", str(npz), "--out", str(out), "--masking", "sift",
           "--img-size", "32", "--stored-size", "40", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
           "--heads", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size",
           "16", "--epochs", "2", "--lr", "2e-3", "--warmup-epochs", "0.5", "--eval-every", "0",
           "--checkpoint-every", "3", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = pd.read_csv(ref / "step_losses.csv")["loss"].to_numpy()
    two = pd.read_csv(out / "step_losses.csv")["loss"].to_numpy()
    np.testing.assert_allclose(two, one, rtol=1e-4)  # float summation order differs (gradient all-reduce)
    from safetensors.torch import load_file

    wa, wb = load_file(ref / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ bad input

def test_bad_data_inputs_name_the_input(tmp_path):
    with pytest.raises(PretrainDataError, match="no such file"):
        load_pretrain_data(tmp_path / "missing", 32)
    np.savez(tmp_path / "noimages.npz", x=np.zeros(3))
    with pytest.raises(PretrainDataError, match="no 'images'"):
        load_pretrain_data(tmp_path / "noimages.npz", 32)
    np.savez(tmp_path / "badlabels.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(3))
    with pytest.raises(PretrainDataError, match="3 train labels for 4 images"):
        load_pretrain_data(tmp_path / "badlabels.npz", 32)
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(PretrainDataError, match="uint8"):
        load_pretrain_data(tmp_path / "float.npz", 32)
    (tmp_path / "broken.tar").write_bytes(b"not a tar")
    with pytest.raises(PretrainDataError, match="broken.tar"):
        load_pretrain_data(tmp_path / "broken.tar", 32, cache_dir=tmp_path / "cache")


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    root = tmp_path / "folder"
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 60 * k + 10 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    data = load_pretrain_data(root, 16, val_fraction=0.0)
    assert data.train.shape == (6, 3, 16, 16) and data.classes == ["a", "b"]
    assert [s["path"] for s in data.skipped] == [str(root / "a" / "broken.jpg")]


def test_cli_errors_are_one_line(npz, tmp_path):
    from siftlens.cli import main

    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["pretrain", "--data", str(npz), "--out", str(tmp_path / "o"), "--batch-size", "4096",
                 "--img-size", "32", "--stored-size", "40"]) == 2
    out = tmp_path / "o2"
    pretrain(tiny_cfg(npz, out, epochs=1))
    with pytest.raises(ValueError, match="different settings"):
        pretrain(tiny_cfg(npz, out, epochs=1, masking="edge"))


def test_edge_matched_control_has_the_sift_samplers_entropy():
    from siftlens.pretrain.masking import masking_noise, matched_alpha, powered_weights, weight_entropy

    g = torch.Generator().manual_seed(0)
    n = 16
    # SIFT: mass on 3 patches, zeros elsewhere (peaked); edges: smooth and dense (flat)
    sift = torch.zeros(4, n)
    sift[:, [1, 5, 9]] = torch.tensor([0.5, 0.3, 0.2])
    edge = torch.rand(4, n, generator=g) + 0.5
    edge = edge / edge.sum(1, keepdim=True)
    for alpha in (1.0, -1.0):
        target = weight_entropy(guidance_weights(sift, alpha))
        a = matched_alpha(edge, target, 1.0 if alpha > 0 else -1.0)
        got = weight_entropy(powered_weights(edge, a))
        torch.testing.assert_close(got, target, atol=1e-4, rtol=0)
        assert (a.abs() > abs(alpha)).all()  # flat edge weights need a larger |alpha| to depart as far
        assert (a.sign() == np.sign(alpha)).all()
        # at the same alpha the plain edge control stays much closer to uniform than SIFT
        assert (weight_entropy(guidance_weights(edge, alpha)) > target + 0.1).all()
    u = torch.rand(4, n, generator=g)
    noise = masking_noise("edge-matched", u, sift, edge, 1.0)
    assert noise.shape == (4, n) and torch.isfinite(noise).all()
    with pytest.raises(ValueError, match="needs the SIFT and the edge"):
        masking_noise("edge-matched", u, None, edge, 1.0)


def test_pretrain_runs_with_the_edge_matched_control(npz, tmp_path):
    log = pretrain(tiny_cfg(npz, tmp_path / "em", masking="edge-matched", epochs=1, eval_every=0))
    assert list(log["epoch"]) == [0, 1] and log["loss"].notna().iloc[-1]


def test_cls_attention_matches_timms_own_attention_weights():
    """cls_attention recomputes the last block's attention by hand; timm's unfused path forms the same weights
    (captured at attn_drop), so the two must agree on a random-init model with asymmetric inputs."""
    import timm

    from siftlens.pretrain.guidance import cls_attention

    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
                            num_heads=3, num_classes=0, global_pool="avg", fc_norm=False)
    x = torch.randn(3, 3, 32, 32)
    got = cls_attention(enc, x)
    seen = {}
    last = enc.blocks[-1].attn
    last.fused_attn = False
    hook = last.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    enc.eval()
    with torch.no_grad():
        enc(x)
    hook.remove()
    want = seen["a"][:, :, 0, 1:].mean(1)
    want = want / want.sum(1, keepdim=True)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    enc.train()  # the caller's mode is restored
    cls_attention(enc, x)
    assert enc.training


def test_attmask_high_masks_the_most_attended_patches():
    attention = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.30, 0.05, 0.25, 0.20, 0.20]])
    u = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    _, mask, _ = mask_from_noise(torch.zeros(2, 5, 1), masking_noise("attmask-high", u, attention=attention), 0.6)
    # n_keep = int(5 * 0.4) = 2: the two least attended stay visible, whatever the uniform draws
    assert mask[0].tolist() == [0, 1, 0, 1, 1]
    # row 2: patches 3 and 4 tie at 0.20; the uniform draw picks which one stays visible beside patch 1
    assert mask[1, :3].tolist() == [1, 0, 1] and mask[1, 3:].sum() == 1
    with pytest.raises(ValueError, match="CLS attention"):
        masking_noise("attmask-high", u)


def test_pretrain_attmask_high_runs(npz, tmp_path):
    log = pretrain(tiny_cfg(npz, tmp_path / "am", masking="attmask-high", epochs=1, eval_every=0))
    assert np.isfinite(log["loss"].dropna()).all()
    assert (tmp_path / "am" / "masking_examples.png").is_file()


def test_pretrain_logs_curve_area_and_epochs_to_a_reference(npz, tmp_path):
    ref = pretrain(tiny_cfg(npz, tmp_path / "ref", epochs=2))
    assert ref["knn_area"].notna().all()  # eval_every=1: every row is a probe
    assert "knn_epochs_to_reference" not in ref
    log = pretrain(tiny_cfg(npz, tmp_path / "other", epochs=2, masking="sift", reference=str(tmp_path / "ref")))
    reached = log["knn_epochs_to_reference"].dropna()
    target = 0.95 * ref["knn_acc"].iloc[-1]
    first = log.index[log["knn_acc"] >= target]
    assert reached.empty == first.empty  # NaN exactly until the probe reaches 95% of the reference's final
    if len(first):
        assert 0 <= reached.iloc[-1] <= log["epoch"].iloc[first[0]]
