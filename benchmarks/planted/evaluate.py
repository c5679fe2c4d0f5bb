"""Scores for the planted-shortcut benchmark: AUROC and the discovery rank of the planted cue."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos = np.asarray(positive).astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def planted_cue_rank(result, split, num_classes: int, inside_share: float = 0.5, margin: int = 4) -> list[float]:
    """Per class: rank of the first motif whose keypoints (in that class's cue-carrying images) lie
    on the planted cue (its mask grown by ``margin`` px: SIFT centres sit on a pattern's edges) at
    least ``inside_share`` of the time; inf when none does."""
    import torch

    kps = result.keypoints
    img = kps["image"].to_numpy()
    S = split.masks.shape[-1]
    grown = torch.nn.functional.max_pool2d(split.masks[:, None].float(), 2 * margin + 1, 1, margin)[:, 0] > 0
    xi = np.clip((kps["x"].to_numpy() * S).astype(int), 0, S - 1)
    yi = np.clip((kps["y"].to_numpy() * S).astype(int), 0, S - 1)
    kps = kps.assign(inside=grown.numpy()[img, yi, xi],
                     carries=split.cue_ids.numpy()[img] == split.labels.numpy()[img])
    ranks = []
    for k in range(num_classes):
        found = float("inf")
        for r in result.motifs[result.motifs["cls"] == k].itertuples():
            sub = kps[(kps["cls"] == k) & (kps["word"] == r.word) & kps["carries"]]
            if len(sub) and sub["inside"].mean() >= inside_share:
                found = float(r.rank)
                break
        ranks.append(found)
    return ranks
