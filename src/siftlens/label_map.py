"""Which model output is which label: class folders / CSV labels matched to a model's outputs by name.

``read_labels`` numbers the labels 0..C-1 in sorted order. A model fine-tuned on exactly those labels has
them as outputs 0..C-1 in the same order, but a pretrained model (ImageNet-1k: 1000 outputs; an Imagenette
folder ``n01440764/`` .. ``n03888257/`` is outputs 0, 217, 482, ...) does not. So where the model knows its
outputs' names, each label is looked up among them (``map_labels``):

- the names an output answers to (``output_names``): its label name (``LoadedModel.label_names``: the
  bundled model's, an HF ``config.id2label``, torchvision weights' ``meta["categories"]``, an exported
  model's), each comma-separated part of it ("tench, Tinca tinca": "tench", "Tinca tinca"), and for
  ImageNet classes the WordNet id and description (``timm.data.ImageNetInfo``, offline: a timm head of 1000
  outputs, or names that are ImageNet-1k's in its order); compared case-insensitively, "_" read as " ";
- every label names exactly one output: class k of the run is output ``output_index[k]``;
- no label names an output (a model fine-tuned on these folders, a model without names): by position,
  class k is output k, as before;
- some do, some do not, or a label names two outputs ("crane"), or two labels one output: a one-line error.

Class probabilities are the softmax over all the model's outputs, read at the mapped columns; a prediction
is the argmax over all outputs (docs/CHOICES.md, "Labels and model outputs").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .validation import UserValueError


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


@lru_cache(maxsize=4)
def _imagenet(subset: str = "imagenet-1k") -> tuple[list[str], list[str]] | None:
    """(wnids, descriptions) of an ImageNet subset in timm's index order, from the files timm ships (offline)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(subset)
        n = info.num_classes()
        return [info.index_to_label_name(j) for j in range(n)], [info.index_to_description(j) for j in range(n)]
    except Exception:  # an older timm, or a subset it has no files for: no ImageNet names
        return None


def _parts(name: str) -> list[str]:
    return [name] + [p.strip() for p in str(name).split(",") if p.strip() and p.strip() != name]


def _head_names(lm, num_outputs: int) -> list[str] | None:
    """Names of a head the model does not name itself: a timm ImageNet head (by its size, as timm's own
    ``infer_imagenet_subset``) or the categories of a torchvision architecture's default weights."""
    if lm.backend == "timm":
        try:
            from timm.data import infer_imagenet_subset

            subset = infer_imagenet_subset(lm.module)
        except Exception:
            subset = None
        net = _imagenet(subset) if subset else None
        if net is not None and len(net[0]) == num_outputs:
            return list(net[1])
    if lm.backend == "torchvision" and lm.name.startswith("torchvision:"):
        from .models import _torchvision_default_weights

        w = _torchvision_default_weights(lm.name.split(":", 1)[1])
        cats = list((w.meta.get("categories") or []) if w is not None else [])
        if len(cats) == num_outputs:
            return cats
    return None


def output_names(lm, num_outputs: int) -> list[list[str]] | None:
    """Per model output, the names it answers to (the first is its display name); None when the model does
    not name its outputs."""
    from .bundled_model import IMAGENETTE_NAMES

    names = list(lm.label_names) if lm.label_names and len(lm.label_names) == num_outputs else None
    if names and all(re.fullmatch(r"LABEL_\d+", str(n)) for n in names):
        names = None  # Hugging Face's default id2label: no names
    names = names or _head_names(lm, num_outputs)
    if not names:
        return None
    out = [_parts(str(n)) for n in names]
    readable_to_wnid = {_norm(v): k for k, v in IMAGENETTE_NAMES.items()}
    net = _imagenet("imagenet-1k")
    if net is not None:
        wnids, descs = net
        wnid_index = {w: j for j, w in enumerate(wnids)}
        counts: dict[str, int] = {}
        for d in descs:
            counts[_norm(d)] = counts.get(_norm(d), 0) + 1
        desc_index = {_norm(d): j for j, d in enumerate(descs) if counts[_norm(d)] == 1}  # "crane" is two classes
        # names that are ImageNet-1k's in its own order (torchvision's categories, an HF ImageNet head): the
        # WordNet ids and descriptions too (2 of torchvision's 1000 names differ from timm's descriptions)
        in_order = num_outputs == len(wnids) and sum(
            _norm(o[0]) in {_norm(p) for p in _parts(descs[j])} or _norm(o[0]) == _norm(descs[j])
            for j, o in enumerate(out)) >= 0.99 * num_outputs
    for j, o in enumerate(out):
        extra = []
        for n in o:
            if _norm(n) in readable_to_wnid:
                extra.append(readable_to_wnid[_norm(n)])
            if n in IMAGENETTE_NAMES:
                extra.append(IMAGENETTE_NAMES[n])
            if net is not None:
                i = wnid_index.get(n, desc_index.get(_norm(n)))
                if i is not None:
                    extra += [wnids[i], *_parts(descs[i])]
        if net is not None and in_order:
            extra += [wnids[j], *_parts(descs[j])]
        seen = {_norm(n) for n in o}
        for n in extra:
            if _norm(n) not in seen:
                o.append(n)
                seen.add(_norm(n))
    return out


@dataclass
class LabelMap:
    """Class k of a run (``class_names[k]``, sorted label order) is model output ``output_index[k]``."""

    output_index: list[int]
    by_name: bool  # matched by name (else by position)
    num_outputs: int
    class_names: list[str]
    display: list[str] | None = field(default=None, repr=False)  # each output's name, where the model has them
    note: str = ""  # one line for the log and manifest where position is assumed and worth knowing

    @classmethod
    def positional(cls, class_names: list[str], num_outputs: int, note: str = "") -> LabelMap:
        return cls(list(range(len(class_names))), False, num_outputs, list(class_names), None, note)

    @property
    def columns(self) -> np.ndarray:
        return np.asarray(self.output_index, dtype=np.int64)

    def class_of_output(self) -> np.ndarray:
        """[num_outputs]: the run class of each output, -1 for outputs that are none of the run's labels."""
        c = np.full(max(self.num_outputs, len(self.output_index)), -1, np.int64)
        c[self.columns] = np.arange(len(self.output_index))
        return c

    def output_name(self, j: int) -> str:
        """The name of output j: the run's label where it is one, else the model's own name, else its index."""
        if j in self.output_index:
            return self.class_names[self.output_index.index(j)]
        if self.display is not None and 0 <= j < len(self.display):
            return self.display[j]
        return str(j)

    def to_json(self) -> dict:
        return {"matched_by": "name" if self.by_name else "position", "output_index": list(self.output_index),
                "num_outputs": self.num_outputs, **({"note": self.note} if self.note else {})}


def map_labels(lm, class_names: list[str], num_outputs: int, source: str = "") -> LabelMap:
    """Match the run's labels to the model's outputs by name (module docstring); a one-line error naming the
    labels when only some match, when a label names two outputs or two labels one output, and when, matched
    by position, there are more labels than outputs."""
    where = f"{source}: " if source else ""
    names = output_names(lm, num_outputs)
    display = [o[0].split(",")[0].strip() for o in names] if names else None
    matches: dict[str, list[int]] = {}
    if names:
        lookup: dict[str, list[int]] = {}
        for j, o in enumerate(names):
            for n in {_norm(n) for n in o}:
                lookup.setdefault(n, []).append(j)
        matches = {c: lookup[_norm(c)] for c in class_names if _norm(c) in lookup}
    if names and matches:
        unmatched = [c for c in class_names if c not in matches]
        if unmatched:
            shown = ", ".join(repr(c) for c in unmatched[:5]) + (f" and {len(unmatched) - 5} more"
                                                                  if len(unmatched) > 5 else "")
            raise UserValueError(f"{where}labels {shown} match no output of --model {lm.name}, while "
                                 f"{len(matches)} other label(s) do (e.g. {next(iter(matches))!r} is output "
                                 f"{matches[next(iter(matches))][0]}); name every class as the model does "
                                 "(its label, or the ImageNet WordNet id) or none")
        twice = [f"{c!r} (outputs {', '.join(map(str, js))})" for c, js in matches.items() if len(js) > 1]
        if twice:
            raise UserValueError(f"{where}label {twice[0]} names more than one output of --model {lm.name}; "
                                 "use a name only one output has (e.g. its ImageNet WordNet id)")
        index = [matches[c][0] for c in class_names]
        if len(set(index)) < len(index):
            j = next(j for j in index if index.count(j) > 1)
            both = [c for c in class_names if matches[c][0] == j]
            raise UserValueError(f"{where}labels {both[0]!r} and {both[1]!r} both name output {j} "
                                 f"({display[j]}) of --model {lm.name}")
        return LabelMap(index, True, num_outputs, list(class_names), display)
    if len(class_names) > num_outputs:
        raise UserValueError(f"{where}{len(class_names)} label classes, but --model {lm.name} has {num_outputs} "
                             "outputs (label k is read as the model's output k)")
    note = ""
    if num_outputs > len(class_names):
        why = ("none of the labels is one of its output names" if names else "it does not name its outputs")
        note = (f"labels matched to outputs by position (class k = output k): --model {lm.name} has {num_outputs} "
                f"outputs for {len(class_names)} labels and {why}")
    lm_map = LabelMap.positional(class_names, num_outputs, note)
    lm_map.display = display
    return lm_map
