"""Train the shortcut suite's model on one generated (variant, setting, seed) folder.

    python benchmarks/shortcut_suite/train.py --run runs/suite/dev_fixed_patch_0/scratch/s0

Settings (planted.py's training code, no geometric augmentation):
* ``scratch``: timm ViT, patch 8, depth 8, dim 128, 4 heads, 64 px, random init, lr 1e-3;
* ``bundled``: the bundled Imagenette ViT-Tiny (patch 16, depth 6) fine-tuned with a new head, 128 px,
  lr 2e-4;
* ``scratch_p16`` (session 15): ViT-Ti/16 shape (patch 16, depth 6, dim 192, 3 heads) at 96 px from scratch: a 6 x 6
  token grid, with the cues drawn on the suite's 8 x 8 geometry (a cue unit is 3/4 of a patch), so neither the
  grid nor the cue-to-patch ratio is the one the method was designed on (the issue's text benchmark's model).
* ``scratch_d12`` (session 16): ViT-Ti/8 shape (patch 8, depth 12, dim 192, 3 heads) at 64 px from scratch: the
  suite's 8 x 8 geometry on the issue's fixed-patch benchmark model (12 blocks, 50% deeper than ``scratch``).
Writes ``RUN/model/model.safetensors`` + ``RUN/model/model.json`` (timm_arch, timm_kwargs, preprocessing,
label names: ``siftlens ... --model RUN/model/model.safetensors`` loads it; no crop, the images are at
the input size), and ``RUN/model/erm.json`` (per-group test accuracy, train seconds). Skips a run that
already has its model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planted.build import (  # noqa: E402
    PlantedDataset,
    PlantedModelConfig,
    PlantedSplit,
    train_planted_model,
)

from siftlens.io import atomic_write_json  # noqa: E402

MODEL_CONFIGS = {
    "scratch": PlantedModelConfig(patch_size=8, depth=8, embed_dim=128, num_heads=4, init="scratch"),
    "bundled": PlantedModelConfig(init="bundled"),
    "scratch_p16": PlantedModelConfig(patch_size=16, depth=6, embed_dim=192, num_heads=3, init="scratch"),
    "scratch_d12": PlantedModelConfig(patch_size=8, depth=12, embed_dim=192, num_heads=3, init="scratch"),
}
DEFAULT_EPOCHS = {"scratch": 15, "bundled": 4, "scratch_p16": 15, "scratch_d12": 15}


def read_split(run: Path, name: str) -> tuple[PlantedSplit, pd.DataFrame]:
    """A generated split as planted.py's PlantedSplit (uint8 images; planted's group name 'absent' for none)."""
    df = pd.read_csv(run / f"{name}.csv", keep_default_na=False)
    imgs = np.stack([np.asarray(Image.open(run / p).convert("RGB")) for p in df["path"]])
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    n, s = len(df), images.shape[-1]
    groups = df["group"].replace({"none": "absent"}).to_numpy().astype("<U8")
    boxes = df[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()
    bboxes = torch.from_numpy(np.where(boxes >= 0, np.round(boxes * s), -1).astype(np.int64))
    split = PlantedSplit(images, torch.tensor(df["label"].to_numpy(), dtype=torch.int64), groups,
                         torch.tensor(df["cue_class"].to_numpy(), dtype=torch.int64),
                         torch.zeros(n, s, s, dtype=torch.bool), bboxes, torch.arange(n))
    return split, df


def export_meta(model_cfg: PlantedModelConfig, num_classes: int, size: int, meta: dict) -> dict:
    """What siftlens.models' ``PATH.safetensors`` loader needs (timm_arch, timm_kwargs, preprocessing)."""
    if model_cfg.init == "bundled":
        kwargs = {"img_size": size, "depth": 6, "num_classes": num_classes, "dynamic_img_size": True}
    else:
        kwargs = {"img_size": size, "patch_size": model_cfg.patch_size, "depth": model_cfg.depth,
                  "embed_dim": model_cfg.embed_dim, "num_heads": model_cfg.num_heads, "num_classes": num_classes}
    return {"timm_arch": model_cfg.model_name, "timm_kwargs": kwargs, "input_size": [3, size, size],
            "mean": meta["mean"], "std": meta["std"], "crop_pct": None, "interpolation": "bicubic",
            "label_names": meta["display_names"]}


def train_run(run: Path, epochs: int | None = None, threads: int = 1) -> dict:
    out = run / "model"
    if (out / "erm.json").exists():
        return json.loads((out / "erm.json").read_text())
    torch.set_num_threads(threads)
    variant = json.loads((run / "variant.json").read_text())
    setting, seed = variant["setting"], int(variant["seed"])
    model_cfg = MODEL_CONFIGS[setting]
    epochs = epochs or DEFAULT_EPOCHS[setting]
    train, _ = read_split(run, "train")
    test, _ = read_split(run, "test")
    ds = PlantedDataset(train, test, list(variant["class_names"]), {"variant": variant["variant"], "setting": setting})
    t0 = time.time()
    model, meta = train_planted_model(ds, epochs, seed, model_cfg=model_cfg,
                                      log=lambda row: print(json.dumps(row), flush=True))
    train_s = time.time() - t0
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    meta = meta | export_meta(model_cfg, ds.num_classes, ds.image_size, meta)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    atomic_write_json(out / "model.json", meta)
    ga = meta["group_accuracy"]
    erm = {"variant": variant["variant"]["name"], "setting": setting, "seed": seed, "epochs": epochs,
           "threads": threads, "train_seconds": round(train_s, 1),
           "test_accuracy": {"aligned": ga.get("aligned"), "conflict": ga.get("conflict"), "none": ga.get("absent"),
                             "average": ga["average"], "worst_group": ga["worst_group"]}}
    atomic_write_json(out / "erm.json", erm)
    return erm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs="+", required=True, help="generated (variant, setting, seed) folders")
    p.add_argument("--epochs", type=int, help=f"default per setting: {DEFAULT_EPOCHS}")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for r in a.run:
        print(json.dumps(train_run(Path(r), a.epochs, a.threads)), flush=True)


if __name__ == "__main__":
    main()
