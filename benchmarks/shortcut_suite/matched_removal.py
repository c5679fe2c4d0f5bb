"""Does a claimed word-set unit move p_k only because it removes many tokens? A check for `spurious` runs.

For each word-set unit (`words:…`) in a run's shortcuts.json: per image that holds it, the drop of p_k when its
tokens are masked (as keys in the run's layers, as the causal ranking does) against masking as many random tokens
in the same image (``--draws`` seeded draws, averaged), in the class's images and in the others.

    python benchmarks/shortcut_suite/matched_removal.py --run SPURIOUS_OUT --images A20 \
        --model vit_tiny_imagenette --random-init
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from siftlens.image_source import read_model_input
from siftlens.models import load_model
from siftlens.spurious.causal import ShortcutSet, masked_probs
from siftlens.spurious.discover import image_descriptors
from siftlens.spurious.source import TensorSource


def unit_masks(lm, x: torch.Tensor, sc: ShortcutSet, words: list[int]) -> list[np.ndarray]:
    """Per image, bool [n]: the tokens whose dense word is one of ``words``."""
    out = []
    for b in range(len(x)):
        dense = image_descriptors(lm, x[b], *sc.descriptor_weights, dense=True,
                                  dense_gradient_weight=sc.dense_gradient_weight)[3]
        out.append(np.isin(sc.dense_word_ids(dense[2]), words))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a `siftlens spurious` output folder")
    ap.add_argument("--images", required=True, help="ImageFolder directory (the run's images)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=8)
    a = ap.parse_args()
    lm = load_model(a.model, random_init=a.random_init, seed=a.seed)
    sc = ShortcutSet.load(a.run)
    root = Path(a.images)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(ci, f) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    x = torch.stack([read_model_input(lm, f) for _, f in files])
    labels = np.array([ci for ci, _ in files])
    source, rng = TensorSource(x), np.random.default_rng(a.seed)
    n = lm.layout(tuple(x.shape[-2:])).num_patches
    p0 = masked_probs(lm, source, sc.layers, [(i, np.zeros(n, bool)) for i in range(len(x))])
    for u in (u for u in sc.units if u["kind"] == "words"):
        k = u["cls"]
        jobs = [(i, m) for i, m in enumerate(unit_masks(lm, x, sc, u["gate_words"])) if m.any()]
        rand = [(i, np.isin(np.arange(n), rng.choice(n, int(m.sum()), replace=False)))
                for i, m in jobs for _ in range(a.draws)]
        idx = np.array([i for i, _ in jobs])
        drop_unit = p0[idx, k] - masked_probs(lm, source, sc.layers, jobs)[:, k]
        drop_rand = p0[idx, k] - masked_probs(lm, source, sc.layers, rand)[:, k].reshape(len(jobs), a.draws).mean(1)
        count = np.array([m.sum() for _, m in jobs])
        own = labels[idx] == k
        print(f"{u['class_name']} {u['unit']}: in {len(jobs)}/{len(x)} images; tokens removed: class "
              f"{count[own].mean():.1f}, others {count[~own].mean():.1f}")
        for name, sel in (("class images", own), ("other images", ~own)):
            print(f"  {name} (n={sel.sum()}): drop of p_k, unit {drop_unit[sel].mean():+.4f}, "
                  f"as many random tokens {drop_rand[sel].mean():+.4f}")


if __name__ == "__main__":
    main()
