"""Are a frame's dense words specific to its class? A diagnosis of stripe-frame runs, not a result.

For each generated run (its discovery images): the method's dense descriptors at every token (colour weight 1,
orientation 0.5; patch 8), k-means with 64 words on all tokens; per class, over its aligned images' border tokens,
the best word's image shares in the class and in the others (f_in, f_out), and the share of those tokens in words
that are class-specific (f_in >= 3 f_out and f_in >= 0.2). Three views of the descriptor: all of it, its SIFT part,
its colour part.

    python benchmarks/shortcut_suite/dense_specificity.py runs/suite_heldout4/heldout4_stripe_frame/scratch/s100 ...
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pandas as pd
from scipy.cluster.vq import kmeans2, vq

from siftlens.spurious.discover import dense_descriptors

PATCH, N_WORDS = 8, 64
VIEWS = {"all of it": slice(None), "SIFT part": slice(0, 128), "colour part": slice(128, 131)}


def token_descriptors(run: str, disc: pd.DataFrame) -> np.ndarray:
    """[N images, n tokens, D]: the dense descriptors of the run's discovery images."""
    out = []
    for path in disc.path:
        bgr = cv2.imread(f"{run}/{path}")
        g = bgr.shape[0] // PATCH
        out.append(dense_descriptors(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), bgr[..., ::-1].copy(), (g, g), PATCH,
                                     1.0, 0.5)[2])
    return np.stack(out)


def class_specificity(words: np.ndarray, labels: np.ndarray, aligned: np.ndarray, border: np.ndarray, k: int
                      ) -> tuple[float, float, float]:
    """Class k's best border word (f_in, f_out) and the share of its border tokens in class-specific words."""
    mine = words[(labels == k) & aligned][:, border]
    best, specific = (0.0, 0.0), []
    for w in np.unique(mine):
        has = (words == w).any(1)
        f_in, f_out = has[labels == k].mean(), has[labels != k].mean()
        if f_in >= 3 * f_out and f_in >= 0.2:
            specific.append(w)
        if f_in - f_out > best[0] - best[1]:
            best = (f_in, f_out)
    return best[0], best[1], float(np.isin(mine, specific).mean())


def main(runs: list[str]) -> None:
    for run in runs:
        disc = pd.read_csv(f"{run}/discovery.csv", keep_default_na=False)
        D = token_descriptors(run, disc)
        N, n, _ = D.shape
        g = int(round(np.sqrt(n)))
        r, c = np.divmod(np.arange(n), g)
        border = (r == 0) | (c == 0) | (r == g - 1) | (c == g - 1)
        labels, aligned = disc.label.to_numpy(), (disc.group == "aligned").to_numpy()
        print(f"\n{run}: {N} images, {n} tokens")
        for view, part in VIEWS.items():
            X = D[..., part].reshape(N * n, -1).astype(np.float64)
            fit = X[np.random.default_rng(0).choice(len(X), min(len(X), 20000), replace=False)]
            centroids, _ = kmeans2(fit, N_WORDS, minit="++", seed=0)
            words = vq(X, centroids)[0].reshape(N, n)
            print(f"  {view}:")
            for k in range(labels.max() + 1):
                f_in, f_out, share = class_specificity(words, labels, aligned, border, k)
                print(f"    class {k}: best border word f_in {f_in:.2f} f_out {f_out:.2f}; "
                      f"border tokens in class-specific words {share:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
