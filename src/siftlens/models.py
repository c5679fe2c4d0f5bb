"""Load a ViT from a spec string, with its own preprocessing and token layout.

Specs: ``vit_tiny_imagenette`` (bundled), ``timm:NAME``, ``hf:PATH_OR_ID``, ``torchvision:NAME``, or
``PATH.safetensors`` with a ``PATH.json`` beside it naming its timm architecture (what
``siftlens pretrain`` exports).
Nothing touches the network unless the user names hub weights (``timm:NAME`` without
``--checkpoint`` and without ``--random-init``, or an ``hf:`` hub id).
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bundled_model import BUNDLED_NAME, IMAGENETTE_NAMES, load_bundled_model
from .capture import ATTENTION_FINDERS, NoAttentionLayersError, TokenLayout, detect_backend
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .validation import UserValueError


class ModelSpecError(UserValueError):
    """A model spec or checkpoint that cannot be loaded; the message says which and why."""


@dataclass
class LoadedModel:
    """A ViT in eval mode with everything needed to analyse it."""

    module: nn.Module
    backend: str  # timm | hf | torchvision
    name: str
    preprocess: Preprocess
    label_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        return patch_size_of(self.module, self.backend)

    def layout(self, input_hw: tuple[int, int] | None = None) -> TokenLayout:
        return token_layout(self.module, self.backend, input_hw or self.preprocess.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or the pooled output for models without a classifier head)."""
        if self.backend == "hf":
            kw = {}
            cfg_size = getattr(getattr(self.module, "config", None), "image_size", None)
            if cfg_size is not None and tuple(x.shape[-2:]) != _pair(cfg_size) and \
                    _accepts(self.module.forward, "interpolate_pos_encoding"):
                kw["interpolate_pos_encoding"] = True
            out = self.module(pixel_values=x, **kw)
            for key in ("logits", "pooler_output", "last_hidden_state"):
                if getattr(out, key, None) is not None:
                    return getattr(out, key)
            return out[0]
        return self.module(x)

    @property
    def is_hf_classifier(self) -> bool:
        """A Hugging Face model with a classification head (``*ForImageClassification*``), not a bare encoder
        whose output is a pooled feature."""
        return self.backend == "hf" and "ForImageClassification" in type(self.module).__name__

    @property
    def num_layers(self) -> int:
        return len(ATTENTION_FINDERS[self.backend](self.module))


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a parameter ``name`` (follows decorators' __wrapped__, unlike __code__)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def patch_size_of(model: nn.Module, backend: str) -> int:
    if backend == "timm":
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(pe, "patch_size"):
            raise ModelSpecError(f"{type(model).__name__}: timm model has no patch_embed.patch_size")
        p = _pair(pe.patch_size)
    elif backend == "hf":
        p = _pair(model.config.patch_size)
    else:
        p = _pair(model.patch_size)
    if p[0] != p[1]:
        raise ModelSpecError(f"non-square patches {p} are not supported")
    return p[0]


def token_layout(model: nn.Module, backend: str, input_hw: tuple[int, int]) -> TokenLayout:
    """Prefix tokens and patch grid, read from the model itself."""
    p = patch_size_of(model, backend)
    H, W = input_hw
    if backend == "timm":
        pe = model.patch_embed
        grid = tuple(pe.dynamic_feat_size((H, W))) if hasattr(pe, "dynamic_feat_size") and \
            getattr(pe, "dynamic_img_pad", False) else (H // p, W // p)
        names = []
        if getattr(model, "cls_token", None) is not None:
            names.append("cls")
        if getattr(model, "dist_token", None) is not None:
            names.append("dist")
        names += [f"reg{i}" for i in range(getattr(model, "num_reg_tokens", 0) or 0)]
        expected = getattr(model, "num_prefix_tokens", len(names))
        if expected != len(names):
            raise ModelSpecError(
                f"{type(model).__name__}: num_prefix_tokens={expected} but found tokens {names}")
    elif backend == "hf":
        cfg = model.config
        grid = (H // p, W // p)
        emb = next((m for m in model.modules() if type(m).__name__.endswith("Embeddings")), None)
        # HF ViT-family embeddings: [cls] [dist] [registers] patches; cls unless the model says otherwise
        names = [] if emb is not None and hasattr(emb, "cls_token") and emb.cls_token is None else ["cls"]
        if emb is not None and getattr(emb, "distillation_token", None) is not None:
            names.append("dist")
        names += [f"reg{i}" for i in range(getattr(cfg, "num_register_tokens", 0) or 0)]
    else:
        grid = (H // p, W // p)
        names = ["cls"] if getattr(model, "class_token", None) is not None else []
    return TokenLayout(prefix_names=tuple(names), grid=grid, patch_size=p)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors or a torch file (weights_only=True: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"--checkpoint {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / pickled code / wrong format
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or type(e).__name__ == "UnpicklingError":
            raise ModelSpecError(f"--checkpoint {path}: refused, it is not a plain tensor checkpoint (it would need "
                                 f"unpickling code; convert it to safetensors): {first}") from None
        raise ModelSpecError(f"--checkpoint {path}: cannot be loaded ({type(e).__name__}: {first})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ModelSpecError(f"--checkpoint {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_weights(model: nn.Module, checkpoint: str | Path, name: str,
                  sd: dict[str, torch.Tensor] | None = None) -> None:
    sd = load_state_dict_file(checkpoint) if sd is None else sd
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches are errors even with strict=False
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelSpecError(f"--checkpoint {checkpoint} does not match {name}: {' '.join(lines[1:3]) or lines[0]}"
                             + (" ..." if len(lines) > 3 else "")) from None
    if missing or unexpected:
        raise ModelSpecError(
            f"--checkpoint {checkpoint} does not match {name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}")


def load_model(spec: str | nn.Module = BUNDLED_NAME, checkpoint: str | Path | None = None,
               random_init: bool = False, input_size: tuple[int, int] | None = None,
               device: str = "cpu", preprocess: Preprocess | None = None, seed: int = 0) -> LoadedModel:
    """Build a LoadedModel from a spec string (see module docstring) or an nn.Module. ``random_init``: fresh
    weights drawn with ``seed``, whatever the caller's RNG state (the same spec and seed give the same model)."""
    if isinstance(spec, nn.Module):
        lm = from_module(spec, preprocess=preprocess, input_size=input_size)
    elif spec in (BUNDLED_NAME, f"bundled:{BUNDLED_NAME}"):
        module, meta = load_bundled_model()
        pre = Preprocess(input_size=tuple(meta["input_size"][1:]), mean=tuple(meta["mean"]),
                         std=tuple(meta["std"]), crop_pct=meta["crop_pct"], interpolation=meta["interpolation"])
        labels = [IMAGENETTE_NAMES.get(c, c) for c in meta.get("label_names", [])] or None
        lm = LoadedModel(module, "timm", BUNDLED_NAME, pre, labels,
                         {"val_top1": meta.get("val_top1"), "bundled": True})
        if random_init:  # the bundled architecture with fresh weights (a calibration control), not its trained ones
            lm = _with_random_weights(lm, seed)
    elif str(spec).endswith(".safetensors"):
        lm = _load_exported_timm(Path(spec))
        if random_init:
            lm = _with_random_weights(lm, seed)
    elif ":" in str(spec):
        kind, name = str(spec).split(":", 1)
        loader = {"timm": _load_timm, "hf": _load_hf, "torchvision": _load_torchvision}.get(kind)
        if loader is None:
            raise ModelSpecError(f"--model {spec}: unknown model source {kind!r} (use timm:, hf: or torchvision:)")
        if random_init:  # seeded whatever the caller's RNG state: two commands on the same spec get the same model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = loader(name, checkpoint, random_init, input_size)
        else:
            lm = loader(name, checkpoint, random_init, input_size)
    else:
        raise ModelSpecError(
            f"--model {spec}: unknown model; use {BUNDLED_NAME}, timm:NAME, hf:PATH_OR_ID or torchvision:NAME")
    if preprocess is not None:
        lm.preprocess = preprocess
    if input_size is not None and lm.preprocess.input_size != tuple(input_size):
        lm.preprocess = Preprocess(tuple(input_size), lm.preprocess.mean, lm.preprocess.std,
                                   lm.preprocess.crop_pct, lm.preprocess.interpolation)
    lm.module.eval().to(device)
    try:  # fail now, not mid-run, if nothing can be captured
        ATTENTION_FINDERS[lm.backend](lm.module)
    except NoAttentionLayersError as e:
        raise NoAttentionLayersError(f"--model {lm.name}: {e}") from None
    return lm


def from_module(module: nn.Module, preprocess: Preprocess | None = None,
                input_size: tuple[int, int] | None = None, name: str | None = None) -> LoadedModel:
    """Wrap a model the user built themselves."""
    backend = detect_backend(module)
    ATTENTION_FINDERS[backend](module)  # NoAttentionLayersError now, with the reason, not mid-run
    if preprocess is None:
        preprocess = {"timm": _timm_preprocess, "hf": _hf_preprocess,
                      "torchvision": _torchvision_preprocess}[backend](module, None, input_size)
    return LoadedModel(module.eval(), backend, name or type(module).__name__, preprocess)


def _timm_preprocess(model: nn.Module, _src, input_size) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    # the size the model was built for (img_size=...), not the pretrained config's default: a model
    # created with img_size=32 rejects 224 inputs, and pretrained_cfg is not updated by create_model
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    default = _pair(built) if built is not None else tuple(cfg["input_size"][1:])
    hw = tuple(input_size) if input_size else default
    return Preprocess(hw, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("crop_pct", 0.875),
                      cfg.get("interpolation", "bicubic"))


def _load_timm(name: str, checkpoint, random_init: bool, input_size) -> LoadedModel:
    import timm

    kwargs = {}
    if input_size is not None:
        kwargs["img_size"] = tuple(input_size)
    pretrained = not random_init and checkpoint is None
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelSpecError(f"--model timm:{name}: unknown timm model name") from None
        raise ModelSpecError(f"--model timm:{name}: {e}") from None
    except Exception as e:  # hub errors when offline
        raise ModelSpecError(
            f"--model timm:{name}: pretrained weights could not be fetched ({type(e).__name__}: {e}); "
            "pass --checkpoint FILE for local weights or --random-init") from None
    if checkpoint is not None:
        sd = load_state_dict_file(checkpoint)
        _match_timm_classifier(model, sd)
        _load_weights(model, checkpoint, f"timm:{name}", sd)
    return LoadedModel(model, "timm", f"timm:{name}", _timm_preprocess(model, None, input_size),
                       None, {"pretrained": pretrained, "checkpoint": str(checkpoint) if checkpoint else None})


def _match_timm_classifier(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Give ``model`` the classifier of checkpoint ``sd``: timm builds NAME with its pretrained head (e.g. 1000
    classes, or none for an encoder), but a fine-tuned checkpoint has its own number of classes and an encoder
    checkpoint has none. Anything else that differs is still refused when the weights are loaded."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    head = head[0] if isinstance(head, (tuple, list)) else head
    if not hasattr(model, "reset_classifier") or not isinstance(head, str):
        return
    w = sd.get(f"{head}.weight")
    if w is not None and w.dim() == 2 and w.shape[0] != getattr(model, "num_classes", w.shape[0]):
        model.reset_classifier(int(w.shape[0]))
    elif w is None and getattr(model, "num_classes", 0) and not any(k.startswith(f"{head}.") for k in sd):
        model.reset_classifier(0)  # an encoder's weights: the model without a head


def _load_exported_timm(path: Path) -> LoadedModel:
    """A timm model saved as safetensors + a JSON of how to build it (``timm_arch``, ``timm_kwargs``)
    and its preprocessing, e.g. the encoder ``siftlens pretrain`` writes."""
    import timm

    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise ModelSpecError(f"--model {path}: no such file")
    if not meta_path.exists():
        raise ModelSpecError(f"--model {path}: needs {meta_path.name} beside it (timm_arch, timm_kwargs); "
                             "for plain weights use --model timm:NAME --checkpoint FILE")
    try:
        meta = json.loads(meta_path.read_text())
        model = timm.create_model(meta["timm_arch"], pretrained=False, **meta.get("timm_kwargs", {}))
        pre = Preprocess(tuple(meta["input_size"][1:]), tuple(meta["mean"]), tuple(meta["std"]),
                         meta.get("crop_pct", 0.875), meta.get("interpolation", "bicubic"))
        _check_exported_preprocess(meta)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as e:
        raise ModelSpecError(f"--model {path}: {meta_path.name} does not describe a timm model "
                             f"({type(e).__name__}: {e})") from None
    _load_weights(model, path, f"{meta['timm_arch']} from {meta_path.name}")
    try:  # the input size the JSON states must be one the model takes (an edited file fails here, not mid-run)
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *pre.input_size))
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelSpecError(f"--model {path}: {meta_path.name}'s input_size {meta['input_size']} does not fit the "
                             f"model ({type(e).__name__}: {first})") from None
    labels = meta.get("label_names") if getattr(model, "num_classes", 0) else None  # an encoder has no head
    if labels is not None and not (isinstance(labels, list) and len(labels) == model.num_classes
                                   and all(isinstance(c, str) for c in labels)):
        # outputs are matched to labels by these names (siftlens.label_map): wrong ones would pair them wrongly
        got = f"{len(labels)} entries" if isinstance(labels, list) else type(labels).__name__
        raise ModelSpecError(f"--model {path}: {meta_path.name}'s label_names ({got}) is not a list of "
                             f"{model.num_classes} names, one per output")
    return LoadedModel(model, "timm", str(path), pre, labels, {"checkpoint": str(path), "exported": meta_path.name})


def _check_exported_preprocess(meta: dict) -> None:
    """ValueError naming the first preprocessing field of an exported model's JSON that cannot be applied."""
    from torchvision.transforms import InterpolationMode

    size, mean, std = meta["input_size"], meta["mean"], meta["std"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"input_size {size!r} is not [3, H, W]")
    for key, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(c, (int, float)) for c in v)):
            raise ValueError(f"{key} {v!r} is not 3 numbers")
    if min(std) <= 0:
        raise ValueError(f"std {std!r} must be positive")
    interpolation = meta.get("interpolation", "bicubic")
    if interpolation not in {m.value for m in InterpolationMode}:
        raise ValueError(f"interpolation {interpolation!r} is not one of {[m.value for m in InterpolationMode]}")
    crop = meta.get("crop_pct", 0.875)
    if crop is not None and not (isinstance(crop, (int, float)) and crop > 0):
        raise ValueError(f"crop_pct {crop!r} is not a positive number")


def _hf_preprocessor_file(src: str) -> Path | None:
    """preprocessor_config.json of a local model dir, or of a hub id already fetched with the model."""
    if Path(src).is_dir():
        return Path(src) / "preprocessor_config.json"
    try:
        from transformers.utils import cached_file

        f = cached_file(src, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        return Path(f) if f else None
    except Exception:  # no preprocessor config on the hub: fall back to the config's defaults
        return None


def _hf_preprocess(model: nn.Module, src: str | None, input_size) -> Preprocess:
    cfg = model.config
    hw = _pair(getattr(cfg, "image_size", 224))
    mean, std, crop_pct = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None
    pp = _hf_preprocessor_file(src) if src else None
    if pp is not None and pp.is_file():
        d = json.loads(pp.read_text())
        mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        crop = d.get("crop_size") if d.get("do_center_crop") else None
        size = d.get("size", {})
        if crop:
            hw = _pair(crop.get("height", 224)) if isinstance(crop, dict) else _pair(crop)
            short = size.get("shortest_edge") if isinstance(size, dict) else None
            crop_pct = hw[0] / short if short else 0.875
        elif isinstance(size, dict) and "height" in size:
            hw = (size["height"], size["width"])
    if input_size:
        hw = tuple(input_size)
    return Preprocess(hw, mean, std, crop_pct, "bicubic" if crop_pct else "bilinear")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face hub id (``name`` or ``org/name``) rather than a local path."""
    import re

    part = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
    return bool(re.fullmatch(f"(?:{part}/)?{part}", name)) and ".." not in name and "--" not in name


def _load_hf(name: str, checkpoint, random_init: bool, input_size) -> LoadedModel:
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    except ImportError:
        raise ModelSpecError("--model hf:...: transformers is not installed (pip install siftlens[hf])") from None
    local = Path(name).exists()
    if not local and not _is_hub_id(name):
        raise ModelSpecError(f"--model hf:{name}: no such folder")
    if local and not Path(name).is_dir():
        raise ModelSpecError(f"--model hf:{name}: not a folder (a Hugging Face model is a folder with config.json)")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local)
        classifier = [a for a in (config.architectures or []) if "ForImageClassification" in a]
        auto = AutoModelForImageClassification if getattr(config, "num_labels", 0) and classifier else AutoModel
        # a classifier the auto class does not map to (DeiTForImageClassificationWithTeacher: two heads) is
        # built as the class its config names, so its own heads are loaded
        if classifier and not classifier[0].endswith("ForImageClassification"):
            import transformers

            auto = getattr(transformers, classifier[0], auto)
        if random_init:
            model = auto.from_config(config, attn_implementation="eager")
        else:
            model = auto.from_pretrained(name, local_files_only=local, attn_implementation="eager")
    except Exception as e:
        raise ModelSpecError(f"--model hf:{name}: cannot load ({type(e).__name__}: {e})") from None
    if checkpoint is not None:
        _load_weights(model, checkpoint, f"hf:{name}")
    labels = None
    if getattr(model.config, "id2label", None) and len(model.config.id2label) > 2:
        labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
    return LoadedModel(model, "hf", f"hf:{name}", _hf_preprocess(model, name, input_size),
                       labels, {"checkpoint": str(checkpoint) if checkpoint else None})


def _torchvision_preprocess(model: nn.Module, weights, input_size) -> Preprocess:
    """The eval transform of ``weights`` (a torchvision weights enum: metadata only, nothing is
    downloaded) when it was made for this model's image size; else ImageNet's 256 -> 224 recipe."""
    size = getattr(model, "image_size", 224)
    hw = tuple(input_size) if input_size else (size, size)
    if weights is not None:
        try:
            t = weights.transforms()
            crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
            if crop == size:
                return Preprocess(hw, tuple(t.mean), tuple(t.std), crop / resize, t.interpolation.value)
        except (AttributeError, TypeError, IndexError, ValueError):
            pass
    return Preprocess(hw, IMAGENET_MEAN, IMAGENET_STD, 224 / 256, "bilinear")


def _torchvision_default_weights(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _load_torchvision(name: str, checkpoint, random_init: bool, input_size) -> LoadedModel:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelSpecError(f"--model torchvision:{name}: unknown torchvision model name")
    weights = None if (random_init or checkpoint is not None) else "DEFAULT"
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as e:
        raise ModelSpecError(
            f"--model torchvision:{name}: weights could not be fetched ({type(e).__name__}: {e}); "
            "pass --checkpoint FILE or --random-init") from None
    if checkpoint is not None:
        _load_weights(model, checkpoint, f"torchvision:{name}")
    default = _torchvision_default_weights(name)
    # random init: the architecture's usual recipe is still the sensible input pipeline
    labels = None
    if weights is not None and default is not None:  # the pretrained weights' class names
        labels = list(default.meta.get("categories") or []) or None
    return LoadedModel(model, "torchvision", f"torchvision:{name}",
                       _torchvision_preprocess(model, default, input_size), labels,
                       {"checkpoint": str(checkpoint) if checkpoint else None})


def _with_random_weights(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    """``--random-init`` on a model that comes with its weights: the same model with fresh ones, named so."""
    twin = random_init_twin(lm, seed=seed)
    twin.name = f"{lm.name} (random init)"
    twin.info = {"random_init": True}  # not the trained weights' val_top1
    return twin


# a run's random-weights twin is drawn with its --seed + this: not the seed a --random-init model itself was drawn with
TWIN_SEED_OFFSET = 1_000_003


def random_init_twin(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture, preprocessing and token layout with fresh random weights: the randomised-model
    sanity check (Adebayo et al., 2018). A finding that the twin shows too comes from the architecture and
    the image statistics, not from what the model learned.

    Every submodule with ``reset_parameters`` (linear, conv, norm layers) is reset, then the model's own
    initialiser runs where it has one (timm ``init_weights``, Hugging Face ``_init_weights``), which also
    redraws position embeddings and class tokens. Raises ValueError if a weight matrix kept its values.
    """
    module = copy.deepcopy(lm.module)
    # the original's weights, which the reset below does not touch: what the copy held, without a second copy
    before = {k: v.detach() for k, v in lm.module.state_dict().items() if v.is_floating_point()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            if m is not module and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        if lm.backend == "timm" and callable(getattr(module, "init_weights", None)):
            module.init_weights()
        elif lm.backend == "hf" and callable(getattr(module, "_init_weights", None)):
            module.apply(module._init_weights)
        for name, p in module.named_parameters():  # anything left (e.g. a torchvision class token): N(0, 0.02)
            if p.dim() >= 2 and name in before and torch.equal(p, before[name]) and p.abs().sum() > 0:
                torch.nn.init.trunc_normal_(p, std=0.02)
    kept = [k for k, v in module.state_dict().items()
            if k in before and v.dim() >= 2 and before[k].abs().sum() > 0 and torch.equal(v, before[k])]
    if kept:
        raise ValueError(f"{lm.name}: could not re-initialise {kept[:3]} for the random-weights twin")
    return LoadedModel(module.eval(), lm.backend, f"{lm.name} [random-init twin, seed {seed}]", lm.preprocess,
                       lm.label_names, {"random_init_twin_of": lm.name, "twin_seed": seed})
