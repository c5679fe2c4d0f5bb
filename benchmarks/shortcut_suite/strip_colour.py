"""Dev diagnosis: do a thin frame's border tokens tell a class apart better by their outer-strip colour than by the
mean colour that the colour-only dense words describe?

    python benchmarks/shortcut_suite/strip_colour.py RUN [--strip 4]

Per class k (a generated run's discovery images): the centroid of the border tokens' opponent colours over the
class's aligned images; each image scored by its border tokens' mean distance to it (closer: higher); printed, the
AUROC of the class's aligned images against every other class's images, for the token's mean colour and for the
mean colour of its outer ``--strip`` pixels along the image border. The centroid is fitted on the positives it then
scores, so both numbers are optimistic alike; only their difference is read. Colours as the dense words'
(``siftlens.spurious.discover.opponent_colour``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from planted.evaluate import auroc

from siftlens.spurious.discover import border_tokens, opponent_colour


def border_colours(rgb: np.ndarray, patch: int, strip: int) -> tuple[np.ndarray, np.ndarray]:
    """Per border token: (mean colour [t, 3], mean colour of its pixels within ``strip`` of the image border [t, 3])."""
    o = opponent_colour(rgb)
    rows, cols = o.shape[0] // patch, o.shape[1] // patch
    mean, outer = [], []
    for r, c in (divmod(k, cols) for k in border_tokens((rows, cols))):
        t = o[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        edges = ([t[:strip]] if r == 0 else []) + ([t[-strip:]] if r == rows - 1 else []) + \
            ([t[:, :strip]] if c == 0 else []) + ([t[:, -strip:]] if c == cols - 1 else [])
        mean.append(t.reshape(-1, 3).mean(0))
        outer.append(np.concatenate([e.reshape(-1, 3) for e in edges]).mean(0))
    return np.array(mean), np.array(outer)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--strip", type=int, default=4, help="outer strip width in pixels")
    ap.add_argument("--patch", type=int, default=16, help="model token side in pixels (scratch_p16: 16)")
    a = ap.parse_args(argv)
    d = pd.read_csv(a.run / "discovery.csv", keep_default_na=False)
    feats = {p: border_colours(np.asarray(Image.open(a.run / p).convert("RGB")), a.patch, a.strip) for p in d.path}
    for k in sorted(d.label.unique()):
        pos, neg = d[(d.label == k) & (d.group == "aligned")].path, d[d.label != k].path
        y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
        res = []
        for j in (0, 1):
            centre = np.concatenate([feats[p][j] for p in pos]).mean(0)
            score = [-np.linalg.norm(feats[p][j] - centre, axis=1).mean() for p in (*pos, *neg)]
            res.append(auroc(np.array(score), y))
        name = d.loc[d.label == k, "class_name"].iloc[0]
        print(f"{name}: AUROC by mean colour {res[0]:.3f}, by outer {a.strip} px strip {res[1]:.3f}")


if __name__ == "__main__":
    main()
