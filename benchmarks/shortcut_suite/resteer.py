"""Dev tool: re-steer a suite run's test images with variants of the counterfactual gate, beside its eval's oracle.

Reads RUN/EVAL_DIR/spurious (a `siftlens spurious` run) and RUN/EVAL_DIR/eval.json (its `evaluate.py run`), masks
each group's test images as gated `prompt --method mask_tokens --layers all` does and prints accuracy per group,
the share touched and the tokens masked. With the run's own options it reproduces the eval's mask_tokens row.

    python benchmarks/shortcut_suite/resteer.py RUN eval_both always where_found where_found+complete

Variants: ``always`` / ``where_found`` (``--dense-token-test``), with ``--fired-margin 0``; ``+complete``: with
``--fired-margin 4`` (``REMOVAL_MARGIN_BELOW``: every fired removal of at most 4 tokens is masked with its 8
neighbouring tokens, the gate's decision unchanged; prompt's default since held-out round 46, so
``where_found+complete`` is prompt's default gate). (Until 7bed6c0 this was a dev probe here, with a
``+complete_gain`` variant: only units whose discovery measured a margin gain.)
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from evaluate import GROUPS, TRAIN_MIX

from siftlens.image_source import find_images
from siftlens.models import load_model
from siftlens.prompting import SteeredViT
from siftlens.spurious.causal import REMOVAL_MARGIN_BELOW, ShortcutSet
from siftlens.spurious.prompt_cli import RowMask, gated_steering
from siftlens.spurious.source import PathSource


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("eval_dir")
    p.add_argument("variants", nargs="+")
    a = p.parse_args()
    torch.set_num_threads(1)
    lm = load_model(str(a.run / "model" / "model.safetensors"))
    sc = ShortcutSet.load(a.run / a.eval_dir / "spurious")
    test = pd.read_csv(a.run / "test.csv")
    acc = json.loads((a.run / a.eval_dir / "eval.json").read_text())["accuracy"]
    print(a.run, "| oracle_tokens", " / ".join(f"{acc['oracle_tokens'][g]:.3f}" for g in GROUPS),
          "| eval's mask_tokens", " / ".join(f"{acc['mask_tokens'][g]:.3f}" for g in GROUPS))
    # the test folder in prompt's order and batches (--batch-size 32), so that the gate's masked forwards see the
    # same batches as the eval's prompt run did
    paths = find_images(a.run / "test")
    source = PathSource(lm, paths, a.run / "test")
    chunks = [source.read_chunk(c, 32)[1] for c in range(source.n_chunks(32))]
    info = test.set_index(test.path.map(lambda q: str((a.run / q).resolve()))).loc[[str(q.resolve()) for q in paths]]
    group, label = info.group.to_numpy(), info.label.to_numpy()
    holder = RowMask()
    for v in a.variants:
        test_kind, _, extra = v.partition("+")
        if extra not in ("", "complete"):
            raise SystemExit(f"unknown variant {v!r}: DENSE_TOKEN_TEST or DENSE_TOKEN_TEST+complete")
        sc.dense_token_test = test_kind
        gate = sc.masker(lm, fired_margin=REMOVAL_MARGIN_BELOW if extra else 0)
        preds, touched, tokens = [], [], []
        with torch.no_grad(), SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=holder) as st:
            for c, x in enumerate(chunks):  # prompt's own steering of a batch
                p1, rows, n_masked = gated_steering(lm, gate, st, holder, x, lm.forward(x).float().softmax(-1),
                                                    "mask_tokens", c)
                preds.append(p1.argmax(1).numpy())
                touched.append(rows.numpy())
                tokens.append(n_masked.numpy())
        pred, fired, n = np.concatenate(preds), np.concatenate(touched), np.concatenate(tokens)
        row = {}
        for g in GROUPS:
            at = group == g
            row[g] = ((pred[at] == label[at]).mean(), fired[at].mean(),
                      n[at & fired].mean() if fired[at].any() else 0.0)
        print(f"{v:28s}", " ".join(f"{g} {r[0]:.3f} ({r[1]:.0%}, {r[2]:.1f} tok)" for g, r in row.items()),
              f"| balanced {np.mean([r[0] for r in row.values()]):.3f}",
              f"| training mix {sum(TRAIN_MIX[g] * row[g][0] for g in GROUPS):.3f}")


if __name__ == "__main__":
    main()
