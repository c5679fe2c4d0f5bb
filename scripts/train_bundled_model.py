"""Train the bundled ViT that `siftlens analyze` uses by default.

    python scripts/train_bundled_model.py --data ../shared/data/imagenette2-160.tar --epochs 20

Writes src/siftlens/bundled/vit_tiny_imagenette.safetensors (+ .json config and the card).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from siftlens.bundled_model import BUNDLED_CONFIG, BUNDLED_DIR, build_bundled_architecture
from siftlens.image_source import load_image_folder
from siftlens.train import TrainConfig, evaluate, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/imagenette2-160.tar")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(BUNDLED_DIR))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = BUNDLED_CONFIG
    size = cfg["input_size"][-1]
    short = int(size / cfg["crop_pct"])
    t0 = time.time()
    # the archive is streamed (nothing extracted); centre square then bicubic resize, full JPEG decode
    xtr, ytr, classes = load_image_folder(args.data, "train", size=short, crop="fit", draft=False)
    xva, yva, _ = load_image_folder(args.data, "val", size=short, crop="fit", draft=False)
    print(f"decoded {len(xtr)} train / {len(xva)} val in {time.time() - t0:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    model = build_bundled_architecture()
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    history = train_classifier(model, xtr, ytr, size, mean, std, tc,
                               eval_fn=lambda m: evaluate(m, xva, yva, size, mean, std),
                               log=lambda r: print(json.dumps(r), flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "vit_tiny_imagenette.safetensors"))
    meta = dict(cfg, label_names=classes, train_args=vars(args), history=history,
                val_top1=history[-1]["val_acc"], n_train=len(xtr), n_val=len(xva))
    (out / "vit_tiny_imagenette.json").write_text(json.dumps(meta, indent=2))
    print("val top-1", history[-1]["val_acc"])


if __name__ == "__main__":
    main()
