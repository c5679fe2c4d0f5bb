"""Random-weights ViTs of the suite's scratch_d12 shape (ViT-Ti/8, 12 blocks, 64 px) with C outputs (C = 2, 10)."""
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

src = json.loads(Path("runs/r30/models/c2/model.json").read_text())
for c in (2, 10):
    names = json.loads(Path("runs/suite_heldout27/heldout27_text/scratch_p16/s101/model/model.json").read_text())
    meta = dict(src, input_size=[3, 64, 64], label_names=names["label_names"][:c])
    meta["timm_kwargs"] = dict(img_size=64, patch_size=8, depth=12, embed_dim=192, num_heads=3, num_classes=c)
    meta["architecture"] = dict(src["architecture"], patch_size=8, depth=12, img_size=64, num_classes=c)
    torch.manual_seed(0)
    m = timm.create_model(meta["timm_arch"], pretrained=False, **meta["timm_kwargs"])
    out = Path(f"models_d12/c{c}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(meta, indent=1))
