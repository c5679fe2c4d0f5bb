"""Probe (session 22, dev only): which colour-cast removal would undo a *background* tint (bg_tint), and does pasting
a class's cast *map* (its colour beyond the classes' mean, per cell of a 4 x 4 grid) take other classes' images
where pasting its mean colour does not? Not the method: a diagnosis on one suite run's test and discovery images.

    python benchmarks/shortcut_suite/bg_cast_probe.py RUN   # RUN = OUT/VARIANT/SETTING/sSEED with model/

Removals, each applied to every test image with the map of its predicted class: gw / lv (grey world / levels, the
method's), rgw_lin / rgw_thr (grey world computed and applied with a per-pixel weight from the map's norm, linear or
thresholded), rlv_thr (levels over the thresholded region), sub_map / sub_vec (the predicted class's map / mean cast
subtracted), cell_gw / cell_lv (grey world / levels on each cell of the 4 x 4 grid alone), and mask_place (the
tokens where the predicted class's thresholded map weight is above 1/2 removed as keys in every block). Prints accuracy
per group and the share of cue-free predictions changed; then per class the share of
other classes' discovery images predicted as it after grey world + its mean cast (vec) or its cast map (map)."""
import glob
import sys

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from siftlens.models import load_model
from siftlens.spurious.cast import _mean_std, grey_world, levels

run = sys.argv[1]
lm = load_model(glob.glob(run + '/model/*.safetensors')[0])
lm.module.eval()

GRID = 4  # cells per side of a cast map


def load(paths) -> torch.Tensor:
    X = np.stack([np.asarray(Image.open(run + "/" + p).convert("RGB"), np.float32) / 255 for p in paths])
    return (torch.from_numpy(X).permute(0, 3, 1, 2) - mean) / std


@torch.no_grad()
def predict(z: torch.Tensor) -> np.ndarray:
    return torch.cat([lm.forward(z[i:i + 64]).argmax(-1) for i in range(0, len(z), 64)]).numpy()


def up(m: torch.Tensor) -> torch.Tensor:  # [1, C, GRID, GRID] -> [1, C, H, W]
    return F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)


def weight(k: int, thresholded: bool) -> torch.Tensor:
    """[1, 1, H, W]: class k's cast-map norm over its largest cell's (thresholded: 0 below 1/4, 1 above 3/4)."""
    w = maps[k].norm(dim=0, keepdim=True)[None]
    w = w / w.max()
    return up(((w - 0.25) / 0.5).clamp(0, 1) if thresholded else w)


def region_grey_world(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rgb = z * std + mean
    ch = (rgb * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True)
    gain = ch.mean(1, keepdim=True) / ch.clamp_min(1e-3)
    return ((rgb + w * (rgb * gain - rgb)).clamp(0, 1) - mean) / std


def region_levels(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rgb, sel = z * std + mean, w > 0.5
    lo = torch.where(sel, rgb, torch.full_like(rgb, 9)).amin((2, 3), keepdim=True)
    hi = torch.where(sel, rgb, torch.full_like(rgb, -9)).amax((2, 3), keepdim=True)
    stretched = (rgb - lo) / (hi - lo).clamp_min(1 / 255)
    return ((rgb + w * (stretched - rgb)).clamp(0, 1) - mean) / std


def per_cell(remove, z: torch.Tensor) -> torch.Tensor:
    """``remove`` (grey world or levels) applied to each cell of a GRID x GRID tiling on its own."""
    out, h, w = z.clone(), z.shape[-2], z.shape[-1]
    for r in range(GRID):
        for c in range(GRID):
            ys, xs = slice(r * h // GRID, (r + 1) * h // GRID), slice(c * w // GRID, (c + 1) * w // GRID)
            out[..., ys, xs] = remove(z[..., ys, xs], lm)
    return out


mean, std = _mean_std(lm)
disc = pd.read_csv(run + "/discovery.csv", keep_default_na=False)
test = pd.read_csv(run + "/test.csv", keep_default_na=False)
xd, y = load(disc.path), disc.label.to_numpy()
K = int(y.max()) + 1
cells = F.adaptive_avg_pool2d(xd, GRID)  # [n, 3, GRID, GRID]
maps = torch.stack([cells[torch.from_numpy(y == k)].mean(0) for k in range(K)])
maps = maps - maps.mean(0)  # [K, 3, GRID, GRID]: each class's colour beyond the classes' mean, per cell
x, lab, grp = load(test.path), test.label.to_numpy(), test.group.to_numpy()
p0 = predict(x)
REMOVALS = {
    "none": lambda z, k: z,
    "gw": lambda z, k: grey_world(z, lm),
    "lv": lambda z, k: levels(z, lm),
    "rgw_lin": lambda z, k: region_grey_world(z, weight(k, False)),
    "rgw_thr": lambda z, k: region_grey_world(z, weight(k, True)),
    "rlv_thr": lambda z, k: region_levels(z, weight(k, True)),
    "cell_gw": lambda z, k: per_cell(grey_world, z),
    "cell_lv": lambda z, k: per_cell(levels, z),
    "sub_map": lambda z, k: z - up(maps[k][None]),
    "sub_vec": lambda z, k: z - maps[k].mean((1, 2))[None, :, None, None],
}
for name, remove in REMOVALS.items():
    z = torch.cat([remove(x[b:b + 1], int(p0[b])) for b in range(len(x))])
    p = predict(z)
    acc = {g: round(float((p == lab)[grp == g].mean()), 3) for g in ("aligned", "conflict", "none")}
    print(name, acc | {"changed_none": round(float((p != p0)[grp == "none"].mean()), 3)})
# the cast's place masked as tokens instead of its colour removed: tokens whose centre falls where the predicted
# class's thresholded map weight is above 1/2, removed as keys in every block (as token units and the oracle are)
from siftlens.spurious.causal import masked_probs  # noqa: E402
from siftlens.spurious.source import TensorSource  # noqa: E402

layout = lm.layout(tuple(x.shape[-2:]))
gh, gw_ = layout.grid
centres = [(int((i + 0.5) * x.shape[-2] / gh), int((j + 0.5) * x.shape[-1] / gw_))
           for i in range(gh) for j in range(gw_)]
place = {k: np.array([bool(weight(k, True)[0, 0, r, c] > 0.5) for r, c in centres]) for k in range(K)}
blocks = list(range(len(lm.module.blocks)))
p = masked_probs(lm, TensorSource(x), blocks, [(b, place[int(p0[b])]) for b in range(len(x))]).argmax(1)
acc = {g: round(float((p == lab)[grp == g].mean()), 3) for g in ("aligned", "conflict", "none")}
print("mask_place", acc | {"changed_none": round(float((p != p0)[grp == "none"].mean()), 3)},
      "tokens", {k: int(v.sum()) for k, v in place.items()}, "of", gh * gw_)
for k in range(K):  # other classes' discovery images, grey world + class k's mean cast / cast map
    z = grey_world(xd[torch.from_numpy(y != k)], lm)
    flip_vec = (predict(z + maps[k].mean((1, 2))[None, :, None, None]) == k).mean()
    flip_map = (predict(z + up(maps[k][None])) == k).mean()
    print("class", k, "flip vec", round(float(flip_vec), 2), "flip map", round(float(flip_map), 2))

# --- session 23 (dev only, after held-out round 20's plan): a cast *with a place*, i.e. the class's cast map itself
# as the unit. Claim: other classes' images with their own class's map swapped for class k's (x - map_j + map_k).
# Removal: the predicted class's map subtracted, or the map's place masked as tokens, each ungated and gated as
# `prompt` gates (applied only where it changes the prediction and lowers its probability by >= 1/2). Flag: how far
# the removal lowers the predicted class's probability, scored as evaluate.py scores flag_score.
from planted.evaluate import auroc  # noqa: E402


def auc_of(positive: np.ndarray, score: np.ndarray) -> float:
    return float(auroc(score, positive))


@torch.no_grad()
def softmax(z: torch.Tensor) -> np.ndarray:
    return torch.cat([lm.forward(z[i:i + 64]).softmax(-1) for i in range(0, len(z), 64)]).numpy()


for k in range(K):
    others = torch.from_numpy(y != k)
    z = xd[others] - up(maps[torch.from_numpy(y[y != k])].reshape(-1, 3, GRID, GRID)) + up(maps[k][None])
    print("class", k, "flip swap", round(float((predict(z) == k).mean()), 2))
twins = test.twin_path.to_numpy()
has_twin = twins != ""
pt = predict(load(twins[has_twin]))
twin_ok = np.ones(len(test), bool)
twin_ok[has_twin] = pt == lab[has_twin]
P0 = softmax(x)
aligned_ok = (grp == "aligned") & (p0 == lab)
rwr = aligned_ok & ~twin_ok
conflict = grp == "conflict"
print("right for the wrong reason", int(rwr.sum()), "of", int(aligned_ok.sum()), "aligned correct")
print("1 - max softmax: rwr", round(auc_of(rwr[aligned_ok], 1 - P0.max(1)[aligned_ok]), 3),
      "conflict vs rest", round(auc_of(conflict, 1 - P0.max(1)), 3))
sub = torch.cat([x[b:b + 1] - up(maps[int(p0[b])][None]) for b in range(len(x))])
P_sub = softmax(sub)
P_mask = masked_probs(lm, TensorSource(x), blocks, [(b, place[int(p0[b])]) for b in range(len(x))])
idx = np.arange(len(x))
for name, P in (("sub_map", P_sub), ("mask_place", P_mask)):
    drop = P0[idx, p0] - P[idx, p0]
    gate = (P.argmax(1) != p0) & (drop >= 0.5)
    pg = np.where(gate, P.argmax(1), p0)
    acc = {g: round(float((pg == lab)[grp == g].mean()), 3) for g in ("aligned", "conflict", "none")}
    print(name, "gated", acc | {"changed_none": round(float(gate[grp == "none"].mean()), 3)},
          "flag rwr", round(auc_of(rwr[aligned_ok], drop[aligned_ok]), 3),
          "conflict vs rest", round(auc_of(conflict, drop), 3))
