"""Model files of a given ViT shape with C outputs, for calibrating claims on random weights (`siftlens spurious
--random-init --seed S` redraws every weight, so only the shape, preprocessing and label names matter).

    python benchmarks/shortcut_suite/random_models.py --like runs/suite/.../model/model.json --outputs 2 3 5 --out M
    python benchmarks/shortcut_suite/random_models.py --like ... --outputs 2 10 --shape 8 12 192 3 --size 64 --out M

Writes M/c{C}/model.safetensors + model.json (the first C of --like's label names). RESULTS.md "Calibration by
output count" ran with these shapes: --like's own (ViT-Ti/16, 6 blocks, 96 px) and patch 8, 12 blocks, 64 px.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file


def write_model(like: dict, outputs: int, out: Path, shape: tuple[int, int, int, int] | None = None,
                size: int | None = None) -> None:
    """One model file like ``like`` (an exported model.json) with ``outputs`` outputs and, optionally, another
    (patch, depth, dim, heads) ``shape`` and input ``size``."""
    kwargs = dict(like["timm_kwargs"], num_classes=outputs)
    if shape is not None:
        kwargs.update(zip(("patch_size", "depth", "embed_dim", "num_heads"), shape))
    if size is not None:
        kwargs["img_size"] = size
    meta = {k: v for k, v in like.items() if k != "history"}
    meta.update(timm_kwargs=kwargs, label_names=like["label_names"][:outputs],
                input_size=[3, kwargs["img_size"], kwargs["img_size"]])
    torch.manual_seed(0)
    model = timm.create_model(meta["timm_arch"], pretrained=False, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--like", required=True, help="an exported model.json (timm_arch, timm_kwargs, label_names)")
    p.add_argument("--outputs", type=int, nargs="+", required=True)
    p.add_argument("--shape", type=int, nargs=4, metavar=("PATCH", "DEPTH", "DIM", "HEADS"))
    p.add_argument("--size", type=int, help="input size (default: --like's)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    like = json.loads(Path(a.like).read_text())
    for c in a.outputs:
        write_model(like, c, Path(a.out) / f"c{c}", a.shape, a.size)
        print(f"-> {Path(a.out) / f'c{c}'}")


if __name__ == "__main__":
    main()
