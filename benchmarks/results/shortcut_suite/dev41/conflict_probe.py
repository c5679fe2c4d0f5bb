"""Dev probe (session 41): why gated ``mask_tokens`` leaves a run's conflicting images unsteered.

    python conflict_probe.py RUN [EVAL]     # EVAL: the eval dir under RUN (default eval)

Per conflicting test image: whether a shortcut unit of the predicted class is found (its words there) and in its
place (``ShortcutSet.present_units`` info), crossed with whether the gate steered it and whether it is right after.
"""

import sys
from pathlib import Path

import pandas as pd
import torch

from siftlens.models import load_model
from siftlens.spurious.causal import ShortcutSet
from siftlens.spurious.source import PathSource


def main(run: Path, ev: str) -> None:
    torch.set_num_threads(1)
    lm = load_model(str(run / "model" / "model.safetensors"))
    sc = ShortcutSet.load(run / ev / "spurious")
    test = pd.read_csv(run / "test.csv")
    test = test[test.group == "conflict"].reset_index(drop=True)
    test["path"] = test.path.map(lambda q: str((run / q).resolve()))
    steered = pd.read_parquet(run / ev / "prompt_mask_tokens" / "predictions.parquet").drop(columns=["label"])
    steered["path"] = steered.path.map(lambda q: str(Path(q).resolve()))
    d = test.merge(steered, on="path")
    source = PathSource(lm, [Path(q) for q in d.path], run)
    rows = []
    with torch.no_grad():
        for c in range(source.n_chunks(32)):
            _, x, _ = source.read_chunk(c, 32)
            info: dict = {}
            pred = lm.forward(x).argmax(1).tolist()
            sc.present_units(lm, x, "gated", info=info, pred=pred)
            for b in range(len(x)):
                cls_found = {int(sc.units[j]["cls"]) for j in info["found"][b]}
                cls_in_place = {int(sc.units[j]["cls"]) for j in info["in_place"][b]}
                rows.append({"pred_unit_found": pred[b] in cls_found, "pred_unit_in_place": pred[b] in cls_in_place})
    d = pd.concat([d.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    d["right_after"] = d.pred_steered == d.label
    print(run.parent.parent.name, run.parent.name, ev, len(d), "conflicting images")
    print(pd.crosstab([d.pred_unit_found, d.pred_unit_in_place], [d.steered, d.right_after], margins=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "eval")
