"""Sufficiency of a shortcut unit: paste it into other classes' images and see whether the class evidence follows.

Removal (``causal.py``) asks whether class k's evidence *needs* the unit. A planted shortcut is also *enough*: the
model follows it into an image of another class (a conflicting image). An object part or a scene colour of class
k is needed a little but rarely enough on its own. For each claimable unit of class k (``shortcut_candidates``):

- donors: class k's causal-sample images where removing the unit lowered p_k by > 0.01 (where it carries the
  evidence; none: the images holding it);
- recipients: up to ``transplant_images`` images of the other classes from the causal sample (seeded), each paired
  with one donor in turn;
- the composite: the recipient with the donor's pixels on the unit's tokens (a word: the tokens its keypoints
  cover in the donor), re-predicted unmasked; the rise of p_k over the recipient's own;
- the control: as many tokens of the same donor drawn at random (seeded), pasted at their own places.

``sufficiency`` = mean over recipients of (rise with the unit - rise with the random tokens), with a 95% bootstrap
CI; ``transplant_rise`` = mean rise with the unit; ``transplant_flip`` = share of recipients then predicted k.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..models import LoadedModel
from ..resume import Part, RunParts
from .causal import token_mask

COLUMNS = ("transplant_rise", "transplant_rise_random", "sufficiency", "sufficiency_lo", "sufficiency_hi",
           "transplant_flip", "transplant_n")


def paste_tokens(recipient: torch.Tensor, donor: torch.Tensor, tokens: np.ndarray, grid: tuple[int, int],
                 patch: int) -> torch.Tensor:
    """``recipient`` [3, H, W] with ``donor``'s pixels on ``tokens`` (bool [n], row-major on ``grid``)."""
    out = recipient.clone()
    for t in np.flatnonzero(tokens):
        r, c = divmod(int(t), grid[1])
        out[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = \
            donor[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
    return out


@torch.no_grad()
def transplant_probs(lm: LoadedModel, source, jobs: list[tuple[int, int, np.ndarray]], grid: tuple[int, int],
                     patch: int, batch_size: int = 64, parts: RunParts | None = None, name: str = "transplant",
                     columns: np.ndarray | None = None) -> np.ndarray:
    """For job j = (recipient, donor, bool tokens [n]): the composite's class probabilities [J, K] (softmax over
    all outputs; ``columns``: the run's classes' outputs, in its order; None: all) and its predicted class [J] (the
    argmax over all outputs as a run class, -1 where it is none of them)."""
    if not jobs:
        return np.zeros((0, 0)), np.zeros(0, int)
    device = next(lm.module.parameters()).device
    parts = parts or RunParts.memory()

    def batch(c: int) -> Part:
        chunk = jobs[c * batch_size:(c + 1) * batch_size]
        uniq = np.unique([i for r, d, _ in chunk for i in (r, d)])
        x = dict(zip(uniq.tolist(), source.get(uniq)))
        comp = torch.stack([paste_tokens(x[r], x[d], m, grid, patch) for r, d, m in chunk])
        p = lm.forward(comp.to(device)).float().softmax(-1).cpu().numpy()
        top = p.argmax(1)
        if columns is not None:  # the model's prediction, as a run class (-1: an output that is no run class)
            col_of = {int(c): i for i, c in enumerate(columns)}
            top = np.array([col_of.get(int(t), -1) for t in top])
        return Part(arrays={"p": p if columns is None else p[:, columns], "pred": top})

    done = list(parts.run(name, -(-len(jobs) // batch_size), batch))
    return (np.concatenate([d.arrays["p"] for d in done]).astype(np.float64),
            np.concatenate([d.arrays["pred"] for d in done]))


def transplant_check(lm: LoadedModel, source, units: pd.DataFrame, unit_tokens, sample: np.ndarray, y: np.ndarray,
                     drops: np.ndarray, probs: np.ndarray, grid: tuple[int, int], patch: int, tested: dict,
                     cfg, parts: RunParts | None = None, columns: np.ndarray | None = None) -> pd.DataFrame:
    """``units`` (motifs rows) with the columns of the module docstring for the rows in ``tested`` (class ->
    unit indices; NaN elsewhere). ``unit_tokens(sample position, unit index)``: bool [n], the unit's tokens in
    that image (None where it is absent); ``drops`` [S, U, K]: the removal drops of the causal sample (``sample``,
    its labels ``y``); ``probs`` [N, K]: every image's class probabilities."""
    out = units.copy()
    for c in COLUMNS:
        out[c] = np.nan
    n = grid[0] * grid[1]
    # one random stream per class (recipients) and per (class, unit) (random tokens, bootstrap): a unit's numbers
    # must not depend on which other units were tested (they did: a floor that dropped one unit moved another's CI)
    jobs, at = [], []  # at: (row of units, recipient position, with the unit or random)
    for k, unit_indices in tested.items():
        others = np.flatnonzero(y != k)
        if not len(others) or cfg.transplant_images <= 0:
            continue
        recipients = others if len(others) <= cfg.transplant_images else \
            np.sort(np.random.default_rng([cfg.seed, 29, k]).choice(others, cfg.transplant_images, replace=False))
        own = np.flatnonzero(y == k)
        for j in unit_indices:
            rng = np.random.default_rng([cfg.seed, 29, k, j])
            row = out.index[(out["cls"] == k) & (out["unit_index"] == j)][0]
            held = [o for o in own if unit_tokens(o, j) is not None]
            donors = [o for o in held if drops[o, j, k] > 0.01] or held
            for q, r in enumerate(recipients):
                if not donors:
                    break
                d = donors[q % len(donors)]
                m = unit_tokens(d, j)
                rand = token_mask(rng.choice(n, int(m.sum()), replace=False), n)
                for kind, mask in (("unit", m), ("random", rand)):
                    jobs.append((int(sample[r]), int(sample[d]), mask))
                    at.append((row, int(sample[r]), kind))
    if not jobs:
        return out
    pm, pred = transplant_probs(lm, source, jobs, grid, patch, cfg.batch_size, parts, "transplant", columns)
    a = pd.DataFrame(at, columns=["row", "recipient", "kind"])
    k_of = out.loc[a["row"], "cls"].to_numpy()
    a["rise"] = pm[np.arange(len(a)), k_of] - probs[a["recipient"].to_numpy(), k_of]
    a["flip"] = pred == k_of
    for row, g in a.groupby("row"):
        unit, rand = g[g["kind"] == "unit"], g[g["kind"] == "random"]
        diff = unit["rise"].to_numpy() - rand["rise"].to_numpy()
        k, j = int(out.loc[row, "cls"]), int(out.loc[row, "unit_index"])
        boot = np.random.default_rng([cfg.seed, 30, k, j]).integers(0, len(diff), size=(cfg.n_boot, len(diff)))
        lo, hi = np.quantile(diff[boot].mean(1), [0.025, 0.975])
        out.loc[row, list(COLUMNS)] = [unit["rise"].mean(), rand["rise"].mean(), diff.mean(), lo, hi,
                                       unit["flip"].mean(), len(diff)]
    return out
