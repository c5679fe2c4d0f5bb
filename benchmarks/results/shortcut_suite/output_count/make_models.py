"""Random-weights ViTs of the suite's architecture with C outputs (C = 2, 3, 5), for calibration on fewer classes."""
import json
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

src = json.loads(Path(sys.argv[1]).read_text())
for c in (2, 3, 5):
    meta = dict(src)
    meta["timm_kwargs"] = dict(src["timm_kwargs"], num_classes=c)
    meta["label_names"] = src["label_names"][:c]
    meta.pop("history", None)
    torch.manual_seed(0)
    m = timm.create_model(meta["timm_arch"], pretrained=False, **meta["timm_kwargs"])
    out = Path(f"models/c{c}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(meta, indent=1))
