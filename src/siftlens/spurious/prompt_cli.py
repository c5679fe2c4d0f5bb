"""`siftlens prompt`: predictions with and without attention steering, on a user's images.

Token-mask methods (``mask_tokens`` and its controls ``random_mask``, ``edge_mask``) are gated by the
shortcuts of a `siftlens spurious` run (``--motifs``, shortcuts.json): an image is steered only where a
discovered shortcut unit is present in it (``--gate presence``: its words are found there) or where removing
one changes the prediction (``--gate counterfactual``), and any other image keeps the unsteered prediction
exactly (it is not run through the steered model at all). Images are read batch by batch; finished batches
are kept so a killed run resumes, and under torchrun each rank steers its share (``siftlens.resume.RunParts``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..image_source import find_images, read_labels
from ..io import atomic_write_json, atomic_write_parquet, ensure_writable_dir
from ..label_map import map_labels
from ..models import load_model
from ..prompting import TOKEN_MASK_METHODS, SteeredViT
from ..resume import Part, RunParts, distributed, settings_fingerprint
from ..runguard import COMMAND_OUTPUTS, OutputLock, retire_outputs
from ..validation import UserValueError, check_finite_output, check_finite_parameters
from .causal import (
    DEFAULT_GATE,
    DEFAULT_GATE_DROP,
    DENSE_REMOVALS,
    DENSE_TOKEN_TESTS,
    GATE_DROPS,
    GATE_MIN_DROP,
    GATES,
    GROW_MIN_GAIN,
    REMOVAL_MARGIN_BELOW,
    TOGETHER_MIN_GAIN,
    TOGETHER_MODES,
    ShortcutSet,
)
from .flag import check_classifier
from .source import PathSource


class RowMask:
    """token_mask_fn for a steered model: the mask [B, n] set for the batch it is called on (``gated_steering``)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask


def run_prompt(model: str, images: str | Path, out: str | Path, method: str = "sift_bias",
               layers: str | list[int] = "late", beta: float = 1.0, motifs: str | None = None,
               labels: str | None = None, batch_size: int = 32, seed: int = 0, checkpoint: str | None = None,
               random_init: bool = False, gate: str = DEFAULT_GATE, margin: int = 0,
               gate_min_drop: float = GATE_MIN_DROP, grow: int = 0, dense_removal: str = "found",
               gate_drop: str = DEFAULT_GATE_DROP, together: str = "off", dense_token_test: str = "where_found",
               fired_margin: int | None = None, progress: bool = False) -> dict | None:
    """Write predictions.parquet (path, pred_base, pred_steered, conf_*, steered, n_masked, label; predictions
    and labels are model output indices, the labels matched to outputs by ``siftlens.label_map``) and
    summary.json; return the summary (None on torchrun ranks > 0: each rank steers its share of the chunks of
    files, rank 0 merges and writes). Finished chunks are kept in ``out/.parts/prompt`` (resume.RunParts).
    ``margin``: the gate tests (and steering masks) a unit of at most that many tokens with its 8 neighbours where
    discovery measured that this removes more of its class's evidence (``ShortcutSet.removal``); 0: tokens alone.
    ``gate_min_drop`` (counterfactual gate): a removal must also lower the predicted class's probability this much
    (``causal.GATE_MIN_DROP``; 0: any removal that changes the prediction): ``gate_drop="relative_in_place"``
    (the default): that share of the predicted class's probability for a unit SIFT finds by its words in its
    place in the image (a dense unit: its words fill its own tokens), in probability for the others;
    ``"relative_where_found"``: that share wherever the unit's words are found; ``"absolute"``: in probability;
    ``"relative"``: as a share for every unit (``causal.GATE_DROPS``, ``CounterfactualMasker``).
    ``grow`` (counterfactual gate): where no unit's removal changed the prediction, the best unit is grown one
    neighbouring token at a time, up to this many (``CounterfactualMasker``); 0: never. ``together``
    (counterfactual gate): where no unit's removal changed the prediction and the predicted class's cue spreads over
    the other classes' shortcut places (shortcuts.json ``together_gain``), every unit tested there removed at once
    (``"spreads"``; ``"where_found"``: only where SIFT also finds a unit of the predicted class, as the gate's drop
    relaxes it; ``"off"`` by default: held-out round 37; ``causal.TOGETHER_MODES``).
    ``dense_removal``: what
    removing a present dense words unit masks (``ShortcutSet.dense_removal``). ``dense_token_test``: where a
    fixed-token dense unit is tested (``ShortcutSet.dense_token_test``). ``fired_margin`` (counterfactual gate):
    a removal the gate fired on, of at most that many tokens, is masked with its 8 neighbouring tokens, the gate's
    decision unchanged (``CounterfactualMasker``); 0: as tested; None (the default): ``REMOVAL_MARGIN_BELOW`` under
    the counterfactual gate (since held-out round 46: a text's training-mix average +3.4 points), 0 under presence
    (it tests no removal). ``progress``: a bar per pass on
    stderr where it is a terminal."""
    if batch_size < 1:
        raise UserValueError(f"--batch-size must be >= 1 (got {batch_size})")
    if margin < 0:
        raise UserValueError(f"--margin must be >= 0 (got {margin})")
    if grow < 0:
        raise UserValueError(f"--grow must be >= 0 (got {grow})")
    if fired_margin is None:
        fired_margin = REMOVAL_MARGIN_BELOW if gate == "counterfactual" else 0
    if fired_margin < 0:
        raise UserValueError(f"--fired-margin must be >= 0 (got {fired_margin})")
    if fired_margin and gate != "counterfactual":
        raise UserValueError(f"--fired-margin {fired_margin} needs --gate counterfactual (it grows a removal the gate "
                             f"fired on; --gate {gate} tests no removal)")
    if grow and gate != "counterfactual":
        raise UserValueError(f"--grow {grow} needs --gate counterfactual (it grows a removal until the prediction "
                             f"changes; --gate {gate} tests no removal)")
    if not 0 <= gate_min_drop <= 1:
        raise UserValueError(f"--gate-min-drop must be in [0, 1] (got {gate_min_drop})")
    if gate_drop not in GATE_DROPS:
        raise UserValueError(f"--gate-drop {gate_drop!r} is not one of {', '.join(GATE_DROPS)}")
    if together not in TOGETHER_MODES:
        raise UserValueError(f"--gate-together {together!r} is not one of {', '.join(TOGETHER_MODES)}")
    rank, world = distributed("cpu")
    gated = method in TOKEN_MASK_METHODS
    shortcuts = None
    if gate not in GATES:
        raise UserValueError(f"--gate {gate!r} is not one of {', '.join(GATES)}")
    if gated:
        if motifs is None:
            raise UserValueError(f"--method {method} needs --motifs DIR (the output of `siftlens spurious`)")
        shortcuts = ShortcutSet.load(motifs)
        if dense_removal not in DENSE_REMOVALS:
            raise UserValueError(f"--dense-removal {dense_removal!r} is not one of {', '.join(DENSE_REMOVALS)}")
        shortcuts.dense_removal = dense_removal
        if dense_token_test not in DENSE_TOKEN_TESTS:
            raise UserValueError(f"--dense-token-test {dense_token_test!r} is not one of "
                                 f"{', '.join(DENSE_TOKEN_TESTS)}")
        shortcuts.dense_token_test = dense_token_test
    out = ensure_writable_dir(out)
    with OutputLock(out, "prompt", enabled=rank == 0):  # one run per --out (runguard.py)
        return _prompt_locked(model, images, out, method, layers, beta, motifs, shortcuts, labels, batch_size, seed,
                              checkpoint, random_init, rank, world, gate, margin, gate_min_drop, grow, progress,
                              gate_drop, together, fired_margin)


def gated_steering(lm, gate, steered: SteeredViT, holder: RowMask, x: torch.Tensor, p0: torch.Tensor, method: str,
                   c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch ``x`` of gated steering: (probabilities [B, K], steered [B] bool, tokens masked [B]). Where the gate
    fires, the image goes through ``steered`` (whose ``token_mask_fn`` is ``holder``) with the gate's mask, or, for a
    colour cast, is re-predicted on its edited input (``_cast_steering``); elsewhere it keeps ``p0``, the unsteered
    softmax. Chunk ``c`` seeds random_mask's colour shifts."""
    p1 = p0.clone()
    m = gate(x)
    rows = m.any(1)
    if rows.any():  # only images with a shortcut present go through the steered model
        holder.mask = m[rows]
        p1[rows] = steered(x[rows]).float().softmax(-1)
    edited = _cast_steering(gate, lm, x, method, c)
    if edited is not None:  # a colour cast removed (random_mask: a random shift as far): re-predicted
        idx = sorted(gate.last_cast)
        p1[idx] = lm.forward(edited[idx]).float().softmax(-1)
        rows[idx] = True
    return p1, rows, m.sum(1)


def _cast_steering(gate, lm, x: torch.Tensor, method: str, c: int) -> torch.Tensor | None:
    """``x`` with the colour edits a gated method makes where the gate removed a colour cast (cast.py; None where it
    removed none): ``mask_tokens`` removes the cast (the shortcuts' ``cast_removal``); its control ``random_mask``
    shifts those images' colour as far, in a random direction (seeded per chunk ``c``); ``edge_mask`` has no colour
    twin and leaves them as they are (None)."""
    from .cast import edit_colour, random_shift, removal_change

    rows = sorted(getattr(gate, "last_cast", ()))
    if not rows or method not in ("mask_tokens", "random_mask"):
        return None
    if method == "mask_tokens":
        return gate.apply_casts(x)
    rng = np.random.default_rng([c, 37])
    length = removal_change(x[rows], lm, gate.shortcuts.cast_removal)
    shift = torch.zeros(len(x), 3)
    shift[rows] = torch.as_tensor(np.stack([random_shift(n, rng) for n in length]), dtype=torch.float32)
    edited = x.clone()
    edited[rows] = edit_colour(x[rows], lm, shift[rows], [None] * len(rows))
    return edited


def _prompt_locked(model, images, out: Path, method: str, layers, beta: float, motifs, shortcuts, labels,
                   batch_size: int, seed: int, checkpoint, random_init: bool, rank: int, world: int,
                   gate_kind: str = DEFAULT_GATE, margin: int = 0,
                   gate_min_drop: float = GATE_MIN_DROP, grow: int = 0, progress: bool = False,
                   gate_drop: str = DEFAULT_GATE_DROP, together: str = "off", fired_margin: int = 0) -> dict | None:
    gated = shortcuts is not None
    lm = load_model(model, checkpoint=checkpoint, random_init=random_init)
    check_finite_parameters(lm.module, lm.name)
    num_outputs = check_classifier(lm)  # predictions need class outputs, steered or not
    if shortcuts is not None:
        shortcuts.check_model(lm, num_outputs, str(motifs))
    paths = find_images(images)
    y, labels_ignored, label_map = None, None, None
    if labels != "none":
        root = Path(images) if Path(images).is_dir() else None
        try:
            y, class_names = read_labels(paths, labels, root)
        except ValueError:
            if labels is not None:
                raise
        if y is not None:
            try:  # which model output each label is (by name where the model names its outputs)
                label_map = map_labels(lm, class_names, num_outputs,
                                       f"--labels {labels}" if labels is not None else f"--images {images}")
            except UserValueError:
                if labels is not None or len(class_names) <= num_outputs:
                    raise  # a labels CSV the model cannot be scored on, or folders that name only some outputs
                y, labels_ignored = None, (f"{len(class_names)} class folders but {num_outputs} model outputs: "
                                           "folders not used as labels, no accuracy")
    source = PathSource(lm, paths, images)
    gate = (shortcuts.masker(lm, gate_kind, margin, gate_min_drop, grow, gate_drop, together, fired_margin)
            if shortcuts is not None else None)
    holder = RowMask()
    steered = SteeredViT(lm, method, layers=layers, beta=beta, token_mask_fn=holder if gated else None, seed=seed)
    mp = Path(motifs) if gated else None
    parts = RunParts(out, "prompt", settings_fingerprint(
        lm, paths, files=(mp / "shortcuts.json" if mp.is_dir() else mp,) if gated else (), method=method,
        layers=layers, beta=beta, batch_size=batch_size, seed=seed, gate=gate_kind, margin=margin,
        gate_min_drop=gate_min_drop, grow=grow, **({"dense_removal": shortcuts.dense_removal}
                                                  if gated and shortcuts.dense_removal != "found" else {}),
        **({"dense_token_test": shortcuts.dense_token_test}
           if gated and shortcuts.dense_token_test != "always" else {}),  # parts of earlier runs stay valid
        **({"gate_drop": gate_drop} if gate_drop != "absolute" else {}),  # parts of earlier runs stay valid
        **({"fired_margin": fired_margin} if gated and fired_margin else {}),
        # the union test changes steering only where the file measured together gains (files before it: none)
        **({"together": True if together == "spreads" else together}  # "spreads" was the option's True
           if together != "off" and gated and any("together_gain" in u for u in shortcuts.units) else {})),
        rank, world, progress)

    def chunk(c: int) -> Part:
        kept, x, skipped = source.read_chunk(c, batch_size)
        meta = {"kept": kept.tolist(), "skipped": skipped}
        if x is None:
            return Part(meta)
        # random_mask's draws restart per chunk, so a resumed run or another rank draws what one run draws
        steered.reset_rng(int(np.random.SeedSequence([seed, c]).generate_state(1)[0]))
        p0 = lm.forward(x).float().softmax(-1)
        if gated:
            p1, rows, n_masked = gated_steering(lm, gate, steered, holder, x, p0, method, c)
        else:
            p1 = steered(x).float().softmax(-1)
            rows = torch.ones(len(x), dtype=torch.bool)
            n_masked = (steered.last_mask.sum(1) if steered.last_mask is not None
                        else torch.zeros(len(x), dtype=torch.long))
        for p in (p0, p1):
            check_finite_output(p, lm.name)
        pb, pa = p0.numpy(), p1.numpy()
        return Part(meta, pd.DataFrame({"path": [str(source.all_paths[int(i)]) for i in kept],
                                        "pred_base": pb.argmax(1), "conf_base": pb.max(1),
                                        "pred_steered": pa.argmax(1), "conf_steered": pa.max(1),
                                        "steered": rows.numpy(), "n_masked": n_masked.numpy()}))

    frames, kept, skipped = [], [], []
    with torch.no_grad():
        for part in parts.run("prompt", source.n_chunks(batch_size), chunk):  # in file order
            if part.table is not None:
                frames.append(part.table)
            kept += part.meta["kept"]
            skipped += part.meta["skipped"]
    steered.remove()
    source.set_readable(kept, skipped)
    parts.release()
    if rank != 0:
        return None
    df = pd.concat(frames, ignore_index=True)
    summary = {"model": lm.name, "method": method, "layers": layers, "beta": beta, "n_images": len(df),
               "skipped": source.skipped, "changed_predictions": float((df.pred_base != df.pred_steered).mean()),
               "steered_share": float(df.steered.mean())}
    if gated:
        where = ("is present" if gate_kind == "presence" else
                 "changes the prediction when removed (counterfactual gate"
                 + (f", lowering its probability by >= {gate_min_drop:g}"
                    + {"relative": " of it", "relative_where_found": " of it where SIFT finds the unit's words, "
                       f"by >= {gate_min_drop:g} in probability elsewhere",
                       "relative_in_place": " of it where SIFT finds the unit's words in its place, "
                       f"by >= {gate_min_drop:g} in probability elsewhere"}.get(gate_drop, "")
                    if gate_min_drop else "") + ")")
        if margin:
            where += (f"; a unit of <= {margin} tokens is removed with its 8 neighbours where discovery measured a "
                      "margin gain")
        if fired_margin:  # counterfactual only (run_prompt refuses it under presence)
            where += (f"; a removal it fired on, of <= {fired_margin} tokens, is masked with its 8 neighbouring "
                      "tokens")
        if gated and shortcuts.dense_token_test == "where_found":
            where += "; a fixed-token dense unit is tested only where its words fill its tokens"
        if shortcuts.dense_removal == "with_discovery_tokens":
            where += ("; a dense words unit is removed at the tokens where its words are and at those that held its "
                      "evidence in discovery")
        if together != "off" and gate_kind == "counterfactual" and any("together_gain" in u for u in shortcuts.units):
            spread = sorted({u["class_name"] for u in shortcuts.units
                             if u.get("together_gain", -np.inf) >= TOGETHER_MIN_GAIN})
            where += ("; where no removal alone did, every shortcut at once in images predicted as a class whose cue "
                      f"spreads over the other shortcuts' places ({', '.join(spread) or 'none'})"
                      + (", where SIFT finds a unit of that class" if together == "where_found" else ""))
        if grow and gate_kind == "counterfactual":
            where += (f"; where no removal did, the best unit with a margin gain grown by up to {grow} neighbouring "
                      f"tokens, one at a time while each lowers the prediction >= {GROW_MIN_GAIN:g} more")
        # a claimed colour cast is removed (levels or grey world) where the counterfactual gate fires on it (cast.py)
        named = [u["class_name"] + " " + u["unit"] for u in shortcuts.units]
        if gate_kind == "counterfactual":
            named += [f"{c['class_name']} colour cast ({shortcuts.cast_removal.replace('_', ' ')})"
                      for c in shortcuts.casts]
        summary["gate"] = (f"token masks applied only to images where a shortcut of --motifs {where} "
                           f"({', '.join(named) or 'none'})")
    if labels_ignored:
        summary["note"] = labels_ignored
    if y is not None:
        summary["label_map"] = label_map.to_json()
        if label_map.note:
            summary["note"] = label_map.note
        elif not label_map.by_name and lm.label_names is None:
            summary["note"] = "model has no label names: accuracy assumes label index order = class folder order"
        # the label's model output: a prediction (argmax over all outputs) is right where it is that output
        df["label"] = label_map.columns[np.asarray(y)[source.kept]]
        summary["accuracy_before"] = float((df.pred_base == df.label).mean())
        summary["accuracy_after"] = float((df.pred_steered == df.label).mean())
    summary["command"], summary["outputs"] = "prompt", list(COMMAND_OUTPUTS["prompt"])
    retire_outputs(out, "prompt")
    atomic_write_parquet(df, out / "predictions.parquet")
    atomic_write_json(out / "summary.json", summary)
    parts.finish()
    return summary
