"""Dev probe: class-specificity of dense word-set units by how many tokens hold their words, not by any one token.
Usage: setspec_probe.py RUN [EVAL] (RUN: a shortcut-suite run with EVAL/spurious from dense words)"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from siftlens.models import load_model
from siftlens.spurious.causal import ShortcutSet
from siftlens.spurious.discover import image_descriptors
from siftlens.spurious.source import PathSource

run = Path(sys.argv[1]).resolve()
ev = sys.argv[2] if len(sys.argv) > 2 else "eval"
torch.set_num_threads(1)
lm = load_model(str(run / "model" / "model.safetensors"))
sc = ShortcutSet.load(run / ev / "spurious")
m = pd.read_csv(run / ev / "spurious" / "motifs.csv")
sets = m[(m.family == "dense") & (m.kind == "words")].copy()
sets["words"] = sets.gate_words.map(
    lambda s: [int(w) for w in str(s).replace("[", "").replace("]", "").replace(",", " ").split()])
disc = pd.read_csv(run / "discovery.csv")
src = PathSource(lm, [run / q for q in disc.path], run)
layout = lm.layout(tuple(src.get([0]).shape[-2:]))
p, grid = layout.patch_size, layout.grid
counts = np.zeros((len(disc), len(sets)), int)
with torch.no_grad():
    for c in range(src.n_chunks(32)):
        kept, x, _ = src.read_chunk(c, 32)
        for b in range(len(x)):
            _, kp, desc, dense = image_descriptors(lm, x[b], *sc.descriptor_weights, dense=True,
                                                   dense_gradient_weight=sc.dense_gradient_weight,
                                                   dense_colour=sc.dense_colour)
            words = sc.dense_word_ids(dense[2])
            row = np.clip(dense[0][:, 1] // p, 0, grid[0] - 1)
            tok = (row * grid[1] + np.clip(dense[0][:, 0] // p, 0, grid[1] - 1)).astype(int)
            for s, ws in enumerate(sets.words):
                counts[int(kept[b]), s] = len(np.unique(tok[np.isin(words, ws)]))
lab = disc.label.to_numpy()
rows = []
for s, r in enumerate(sets.itertuples()):
    own = lab == r.cls
    typical = np.median(counts[own, s])
    row = {"cls": r.cls, "f_in": r.f_in, "f_out": r.f_out, "median_tokens_in": typical,
           "median_tokens_out": np.median(counts[~own, s])}
    for frac in (0.25, 0.5):
        need = max(1, int(np.ceil(frac * typical)))
        fi, fo = (counts[own, s] >= need).mean(), (counts[~own, s] >= need).mean()
        row[f"f_in@{frac}"], row[f"f_out@{frac}"] = round(fi, 3), round(fo, 3)
    rows.append(row)
print(pd.DataFrame(rows).round(3).to_string())
