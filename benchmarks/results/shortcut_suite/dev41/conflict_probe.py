"""Dev diag: why gated mask_tokens leaves conflicting images unsteered. Usage: conflict.py RUN [EVAL]"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from siftlens.models import load_model
from siftlens.spurious.causal import ShortcutSet
from siftlens.spurious.source import PathSource

run = Path(sys.argv[1]); ev = sys.argv[2] if len(sys.argv) > 2 else "eval"
torch.set_num_threads(1)
lm = load_model(str(run / "model" / "model.safetensors"))
sc = ShortcutSet.load(run / ev / "spurious")
t = pd.read_csv(run / "test.csv")
t = t[t.group == "conflict"].reset_index(drop=True)
p = pd.read_parquet(run / ev / "prompt_mask_tokens" / "predictions.parquet")
p["path"] = p.path.map(lambda q: str(Path(q).resolve()))
t["path"] = t.path.map(lambda q: str((run / q).resolve()))
d = t.merge(p.drop(columns=["label"]), on="path")
src = PathSource(lm, [Path(q) for q in d.path], run)
rows = []
det = len(sc.centroids) - sc.dense_words
with torch.no_grad():
    for c in range(src.n_chunks(32)):
        kept, x, _ = src.read_chunk(c, 32)
        info = {}
        pred = lm.forward(x).argmax(1).tolist()
        sc.present_units(lm, x, "gated", info=info, pred=pred)
        for b in range(len(x)):
            found = info["found"][b] if info.get("found") else []
            inplace = info["in_place"][b] if info.get("in_place") else []
            cls_of = [int(sc.units[j]["cls"]) for j in found]
            rows.append({"pred": pred[b], "n_found": len(found),
                         "pred_unit_found": int(any(k == pred[b] for k in cls_of)),
                         "pred_unit_in_place": int(any(int(sc.units[j]["cls"]) == pred[b] for j in inplace))})
r = pd.DataFrame(rows)
d = pd.concat([d.reset_index(drop=True), r], axis=1)
d["cue_pred"] = d.pred_base == d.cue_class if "cue_class" in d else np.nan
d["right_after"] = d.pred_steered == d.label
print(run.parent.parent.name, run.parent.name, ev, len(d), "conflicting")
print("units per class:", pd.Series([int(u["cls"]) for u in sc.units]).value_counts().sort_index().to_dict())
print(pd.crosstab([d.pred_unit_found, d.pred_unit_in_place], [d.steered, d.right_after], margins=True))
print(d.columns.tolist())
