"""`siftlens spurious`: discovery + reliance on a user's model and labelled images, with an HTML report."""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..html_page import html_page, png_data_uri, skipped_html, table_html  # noqa: E402
from ..image_source import find_images, read_labels  # noqa: E402
from ..io import atomic_write_json, atomic_write_parquet, atomic_write_text, ensure_writable_dir  # noqa: E402
from ..label_map import LabelMap, map_labels  # noqa: E402
from ..models import TWIN_SEED_OFFSET, LoadedModel, load_model, random_init_twin  # noqa: E402
from ..resume import RunParts, distributed, rank_device, settings_fingerprint  # noqa: E402
from ..runguard import COMMAND_OUTPUTS, OutputLock, retire_outputs  # noqa: E402
from ..validation import UserValueError, check_finite_parameters  # noqa: E402
from .cast import MIN_FLIP, REMOVAL_WORDS  # noqa: E402
from .causal import claimed_units, effect_floor, shortcut_candidates, shortcut_verdict  # noqa: E402
from .discover import (  # noqa: E402
    DiscoveryConfig,
    DiscoveryResult,
    counterfactual_scores,
    discover_shortcuts,
)
from .flag import check_classifier  # noqa: E402
from .source import PathSource  # noqa: E402


def run_spurious(model: str | LoadedModel, images: str | Path, out: str | Path, labels: str | None = None,
                 min_per_class: int = 5, cfg: DiscoveryConfig | None = None, checkpoint: str | None = None,
                 random_init: bool = False, device: str = "cpu", progress: bool = False,
                 twin: str = "none") -> DiscoveryResult | None:
    """Discovery, counterfactual scores and the report in ``out``; the result (None on torchrun ranks > 0).

    The costly passes (attention and keypoints of every image, the causal and control forwards, the
    counterfactual scores) keep each finished batch in ``out/.parts/spurious`` (``siftlens.resume.RunParts``):
    a killed run started again with the same arguments continues from there and gives the same numbers; other
    arguments are refused while finished batches are kept. Under torchrun every rank takes its share of each
    pass's batches and rank 0 writes the outputs.

    ``twin="random-init"``: the same discovery also runs on the model's architecture with fresh weights, on the
    same images (``random_twin_check``); what it could claim is every claim's null, in the report and manifest."""
    cfg = cfg or DiscoveryConfig()
    if twin not in ("none", "random-init"):
        raise UserValueError(f"--twin {twin!r} is not one of random-init, none")
    rank, world = distributed(device)
    device = rank_device(device)
    out = ensure_writable_dir(out)
    with OutputLock(out, "spurious", enabled=rank == 0):  # one run per --out (runguard.py)
        lm = model if isinstance(model, LoadedModel) else load_model(model, checkpoint=checkpoint,
                                                                     random_init=random_init, device=device,
                                                                     seed=cfg.seed)
        check_finite_parameters(lm.module, lm.name)
        num_outputs = check_classifier(lm)  # class probabilities are what discovery measures
        paths = find_images(images)
        root = Path(images) if Path(images).is_dir() else None
        y, class_names = read_labels(paths, labels, root)
        if len(class_names) < 2:  # a motif is specific to a class only against other classes' images
            raise UserValueError(f"{f'--labels {labels}' if labels else f'--images {images}'}: one class "
                                 f"({class_names[0]}); spurious compares classes, it needs at least two")
        # which model output each label is: by name where the model names its outputs (siftlens.label_map)
        label_map = map_labels(lm, class_names, num_outputs, f"--labels {labels}" if labels else f"--images {images}")
        if label_map.note and rank == 0:
            print(f"note: {label_map.note}")
        elif label_map.by_name and rank == 0:
            pairs = [f"{c} = output {j}" for c, j in zip(class_names, label_map.output_index)]
            print(f"labels matched to --model outputs by name: {', '.join(pairs[:5])}"
                  + (f" (and {len(pairs) - 5} more)" if len(pairs) > 5 else ""))
        counts = np.bincount(y, minlength=len(class_names))  # before reading any image: fail fast
        small = [f"{class_names[k]} ({c})" for k, c in enumerate(counts) if c < min_per_class]
        if small:
            raise UserValueError(f"classes with fewer than {min_per_class} images: {', '.join(small)}")
        parts = RunParts(out, "spurious", spurious_settings(lm, paths, y, class_names, cfg, label_map), rank, world,
                          progress)
        source = PathSource(lm, paths, images)  # images are read batch by batch, in every pass
        res = discover_shortcuts(lm, source, y, class_names, cfg, min_per_class=min_per_class, parts=parts,
                                 label_map=label_map)
        masker = (res.shortcuts.masker(lm, "presence") if res.shortcuts is not None and res.shortcuts.units
                  else res.masker(lm))
        try:
            cf = counterfactual_scores(lm, source, masker, cfg.batch_size, layers=res.layers, seed=cfg.seed,
                                       parts=parts)
            res.per_image = pd.concat([res.per_image, cf.drop(columns=["p_pred"])], axis=1)
        except NotImplementedError as e:  # attention modules that take no mask: discovery stands, no counterfactual
            if rank == 0:
                print(f"warning: no counterfactual scores for {lm.name}: {e}")
        parts.release()
        twin_parts = None
        if twin == "random-init" and res.causal is not None:
            seed = cfg.seed + TWIN_SEED_OFFSET
            try:
                twin_lm = random_init_twin(lm, seed=seed)
            except ValueError as e:  # a model whose weights cannot all be redrawn: the run stands, without its twin
                res.twin = {"seed": seed, "not_run": str(e)}
            else:
                twin_lm.name = f"{lm.name} (random-init twin)"
                twin_parts = RunParts(out, "spurious_twin", spurious_settings(twin_lm, paths, y, class_names, cfg,
                                                                              label_map), rank, world, progress)
                twin_res = discover_shortcuts(twin_lm, source, y, class_names, cfg, min_per_class=min_per_class,
                                              parts=twin_parts, label_map=label_map)
                twin_parts.release()
                res.twin = random_twin_check(twin_res, seed)
        if rank != 0:
            return None
        res.per_image.insert(0, "path", [str(p) for p in source.paths])
        _write_outputs(out, res, lm, source.skipped)
        parts.finish()  # everything is in the outputs now
        if twin_parts is not None:
            twin_parts.finish()
    return res


def random_twin_check(twin: DiscoveryResult, seed: int) -> dict:
    """What a random-weights twin (same architecture and images, fresh weights) could claim: per run, its largest
    effect among units that pass every part of a claim but the effect floor, and the claims it gets at the floor.
    Every one of those claims is false (the weights learned nothing), so the largest effect is the null that the
    trained model's claims are read against (RESULTS.md "Calibration by output count")."""
    units, cfg = twin.causal.units, twin.causal.config
    no_floor = replace(cfg, shortcut_min_effect=0.0)
    best, claims = None, []
    for k, name in enumerate(twin.class_names):
        if not len(units):
            break
        cand = shortcut_candidates(units, k, no_floor)
        if len(cand):
            top = cand.sort_values("causal_effect").iloc[-1]
            if best is None or top["causal_effect"] > best["effect"]:
                best = {"class": name, "unit": str(top["unit"]), "effect": float(top["causal_effect"])}
        claims += [f"{name} {u}" for u in claimed_units(units, k, cfg)["unit"]]
    return {"seed": seed, "floor": float(cfg.shortcut_min_effect), "largest_claimable": best, "claims": claims}


def twin_section_html(t: dict) -> str:
    """The random-weights twin's check in words: its largest claimable effect beside the floor, and its claims."""
    if "not_run" in t:
        return f"<h2>Random-weights twin (the claims' null)</h2><p>Not run: {html.escape(t['not_run'])}</p>"
    best = t["largest_claimable"]
    size = (f"its largest effect among units that pass every part of a claim but the floor is {best['effect']:.4f} "
            f"({html.escape(best['class'])}, {html.escape(best['unit'])})" if best else
            "no unit of it passes the other parts of a claim")
    verdict = ("<p><b>Warning: the twin gets claims</b> (" + html.escape(", ".join(t["claims"])) + "): on this "
               "architecture and these images the floor does not separate a trained model's effects from random "
               "weights'; read this run's claims with effects near the twin's as unproven (raise --min-effect)."
               if t["claims"] else "<p>It gets no claim.")
    return ("<h2>Random-weights twin (the claims' null)</h2><p class=note>The same architecture with fresh weights "
            f"(seed {t['seed']}) through the same discovery on the same images: every claim it gets is false. "
            f"Effect floor {t['floor']:.3g}; {size}.</p>" + verdict + "</p>")


def spurious_settings(lm: LoadedModel, paths: list[Path], y: np.ndarray, class_names: list[str],
                      cfg: DiscoveryConfig, label_map: LabelMap | None = None) -> dict:
    """What decides the numbers of a `spurious` run, by name (a resumed run must match; not the device)."""
    options = {k: v for k, v in asdict(cfg).items() if k != "causal"}
    if options["dense_colour"] == "mean":  # parts written before the option stay valid under its default
        del options["dense_colour"]
    causal = asdict(cfg.causal) if cfg.causal is not None else {"enabled": False}
    if cfg.causal is not None and causal["unit_sufficiency"] in (None, causal["shortcut_sufficiency"]):
        del causal["unit_sufficiency"]  # the default bar: parts written before the option stay valid
    if cfg.causal is not None and causal["dense_set_presence"] == "any":
        del causal["dense_set_presence"]  # likewise
    options.update({f"causal.{k}": v for k, v in causal.items() if k not in ("seed", "batch_size")})  # cfg's own
    options["transplant_draws"] = "per_unit"  # session 28: parts of the shared-stream draws are not resumed
    if cfg.causal is not None and label_map is not None:  # fewer than ten outputs: the floor is scaled (session 29)
        floor = effect_floor(cfg.causal.shortcut_min_effect, label_map.num_outputs)
        if floor != cfg.causal.shortcut_min_effect:
            options["causal.effect_floor"] = floor
    labels = hashlib.sha256(np.asarray(y, np.int64).tobytes() + json.dumps(class_names).encode()).hexdigest()[:16]
    if label_map is not None and label_map.by_name:  # (by position: the fingerprint of earlier versions)
        options["output_index"] = label_map.output_index
    return settings_fingerprint(lm, paths, labels=labels, **options)


def motifs_table(res: DiscoveryResult) -> pd.DataFrame:
    """motifs.csv: the causal units (one row per class and candidate unit) with, for words, the attention
    motif columns of the same (class, word) (``attention_score``, ``attention_motif_rank``, ``attention_p``...);
    words that only the attention view kept appear with empty causal columns."""
    att = res.motifs.rename(columns={"score": "attention_score", "rank": "attention_motif_rank",
                                     "p_label_null": "attention_p", "lift": "attention_motif_lift",
                                     "f_in": "attention_f_in", "f_out": "attention_f_out"})
    if res.causal is None or res.causal.units.empty:
        return att
    units = res.causal.units.drop(columns=["unit_index"])
    att = att.drop(columns=[c for c in ("class_name",) if c in att.columns]).assign(kind="word")
    df = units.merge(att, on=["cls", "word", "kind"], how="outer")
    lone = df["unit"].isna()
    df.loc[lone, "unit"] = "word:" + df.loc[lone, "word"].astype(int).astype(str)
    df.loc[lone, "class"] = [res.class_names[int(k)] for k in df.loc[lone, "cls"]]
    # ranks stay integers where a row has none (nullable Int64), so motifs.csv reads "1", not "1.0"
    ranks = [c for c in df.columns if c.endswith("_rank")]
    df[ranks] = df[ranks].astype("Int64")
    return df.sort_values(["cls", "causal_rank", "attention_motif_rank"], na_position="last").reset_index(drop=True)


def reliance_summary_html(per_image: pd.DataFrame, seed: int = 0) -> str:
    """Mean reliance with its 95% bootstrap CI next to its uniform-attention baseline and their paired
    difference; the flagged share (reliance > 0.5) with its Wilson CI next to the share that uniform
    attention would flag."""
    from scipy.stats import binomtest

    from ..dataset_stats import bootstrap_mean_ci

    r, u = per_image["reliance"].to_numpy(), per_image["reliance_uniform"].to_numpy()
    (m_r, m_u, m_d), (lo_r, lo_u, lo_d), (hi_r, hi_u, hi_d) = bootstrap_mean_ci(np.stack([r, u, r - u], 1), seed=seed)
    n, flagged, flagged_u = len(r), int((r > 0.5).sum()), int((u > 0.5).sum())
    ci = binomtest(flagged, n).proportion_ci(method="wilson") if n else None
    verdict = ("more than" if lo_d > 0 else "less than" if hi_d < 0 else "no different from (CI includes 0)")
    return ("<h2>Reliance</h2><p>Share of decisive attention on shortcut-motif or background patches (vs the "
            f"image's semantic patches): mean {m_r:.3f} [{lo_r:.3f}, {hi_r:.3f}] over {n} images; if attention "
            f"were uniform: {m_u:.3f} [{lo_u:.3f}, {hi_u:.3f}]; difference {m_d:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}]: "
            f"the model puts {verdict} the uniform share there. Flagged (reliance &gt; 0.5): {flagged / max(n, 1):.1%}"
            + (f" [{ci.low:.1%}, {ci.high:.1%}]" if ci else "") +
            f" (uniform attention would flag {flagged_u / max(n, 1):.1%}).</p>")


def counterfactual_summary_html(per_image: pd.DataFrame, seed: int = 0) -> str:
    """Shortcut KL (belief shift when the shortcut tokens are masked) with its CI next to the same shift
    when as many random tokens are masked, and the share of images whose prediction flips."""
    from ..dataset_stats import bootstrap_mean_ci

    sk, rk = per_image["shortcut_kl"].to_numpy(), per_image["random_kl"].to_numpy()
    (m_s, m_r, m_d), (lo_s, lo_r, lo_d), (hi_s, hi_r, hi_d) = bootstrap_mean_ci(np.stack([sk, rk, sk - rk], 1),
                                                                               seed=seed)
    flips = (per_image["pred_masked"] != per_image["pred"]).mean()
    return ("<h2>Which predictions rest on the shortcuts</h2><p>Masking the keys of the shortcut-motif tokens "
            f"(all layers; {per_image['n_masked'].mean():.1f} tokens per image on average) moves the model's belief "
            f"by KL {m_s:.3f} [{lo_s:.3f}, {hi_s:.3f}] per image; masking as many random tokens: {m_r:.3f} "
            f"[{lo_r:.3f}, {hi_r:.3f}]; difference {m_d:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}]. {flips:.1%} of predictions "
            "change. The table lists the images with the largest shift (<code>shortcut_kl</code>): right or wrong, "
            "their prediction depends on the shortcut.</p>")


def _write_outputs(out: Path, res: DiscoveryResult, lm: LoadedModel, skipped: list) -> None:
    retire_outputs(out, "spurious")  # the previous run's files go first (docs/CHOICES.md, runs and outputs)
    atomic_write_parquet(res.per_image, out / "reliance.parquet")
    atomic_write_text(out / "motifs.csv", motifs_table(res).to_csv(index=False))
    res.save_words(out / "shortcut_words.npz")  # the attention motifs' words (older `prompt --motifs` input)
    if res.causal is not None:
        atomic_write_text(out / "occlusion_control.csv", res.causal.control.to_csv(index=False))
    if res.shortcuts is not None:
        res.shortcuts.save(out / "shortcuts.json")  # what `flag` and gated `prompt --motifs` apply
    if res.casts is not None:
        atomic_write_text(out / "casts.csv", res.casts.to_csv(index=False))
    parts = [f"<h1>siftlens spurious: {html.escape(lm.name)}</h1>"]
    if note := unsearched_note(res):
        parts.append(f"<p class=note>{html.escape(note)}.</p>")
    if res.causal is not None:
        parts += causal_sections_html(res, lm)
    if res.casts is not None:
        parts.append(casts_section_html(res.casts, res.causal.config))
    if res.twin is not None:
        parts.append(twin_section_html(res.twin))
    parts.append("<h2>Attention view: keypoint motifs under the decisive attention</h2>"
                 f"<p class=note>CLS attention of layers {res.layers} (mean over them and heads). Per class, motifs "
                 "ranked by attention lift × class specificity × (0.5 + 0.5·position stability). "
                 "Lift 1 = uniform attention (lift_lo–lift_hi: 95% bootstrap CI over the class's images); "
                 "specificity = f_in²/(f_in+f_out), f_out = the same word's frequency in other classes (its baseline); "
                 "p_label_null: share of class-label permutations whose best motif for this class scores as high "
                 "(small = the motif is tied to the class beyond chance). Attention is a second view, not proof: "
                 "a model can use a cue the CLS row barely visits.</p>")
    for k, name in enumerate(res.class_names):
        top = res.motifs[res.motifs["cls"] == k].head(3) if len(res.motifs) else res.motifs
        if top.empty:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        cols = [c for c in ("rank", "word", "score", "p_label_null", "lift", "lift_lo", "lift_hi", "f_in", "f_out",
                            "stability", "mean_x", "mean_y", "n_keypoints") if c in top.columns]
        parts.append(table_html(top[cols]))
    parts.append(reliance_summary_html(res.per_image))
    has_cf = "shortcut_kl" in res.per_image
    if has_cf:
        parts.append(counterfactual_summary_html(res.per_image))
    top = res.per_image.sort_values("shortcut_kl" if has_cf else "reliance", ascending=False).head(20)
    parts.append(table_html(top))
    parts.append(skipped_html(skipped))
    atomic_write_text(out / "spurious.html", html_page(f"siftlens spurious: {lm.name}", parts))
    atomic_write_json(out / "manifest.json", {
        "model": lm.name, "classes": res.class_names, "n_images": len(res.per_image), "skipped": skipped,
        "layers": res.layers, "shortcut_words": res.shortcut_words,
        "shortcuts": ([u["class_name"] + " " + u["unit"] for u in res.shortcuts.units]
                      + [c["class_name"] + " colour cast" for c in res.shortcuts.casts]) if res.shortcuts else [],
        "budget": {res.class_names[k]: v for k, v in res.causal.budget.items()} if res.causal else {},
        "label_map": res.label_map.to_json() if res.label_map is not None else None,
        **({"random_twin": res.twin} if res.twin is not None else {}),
        "command": "spurious", "outputs": list(COMMAND_OUTPUTS["spurious"])})


def unsearched_note(res: DiscoveryResult) -> str:
    """What a run without dense words cannot find, in one sentence ('' where it used them): a user whose model rests
    on such a cue would otherwise read "no shortcut claimed" as a clean bill."""
    if res.dense_centroids is not None:
        return ""
    return ("Not looked for: a cue SIFT puts no keypoint on and whose mean colour claims no cast (a thin border "
            "frame, a background tint) is found only with colour-only dense words (--dense-words 64 "
            "--dense-gradient-weight 0, the defaults; this run turned them off). Held-out round 51 (RESULTS.md): a "
            "background tint got no claim in any class without them, ten classes' with them")


def casts_section_html(casts: pd.DataFrame, cfg) -> str:
    """The colour-cast units (cast.py): per class its cast, the removal's effect beside random colour shifts of the
    same length, and the cast's sufficiency; which are claimed."""
    cols = ["class", "cast_norm", "cast_effect", "cast_effect_random", "cast_specific_lo", "cast_specific_hi",
            "cast_rise", "cast_rise_random", "cast_sufficiency", "cast_sufficiency_lo", "cast_flip", "cast_claimed"]
    claimed = casts.loc[casts["cast_claimed"], "class"].tolist()
    return ("<h2>Colour casts: a class's overall colour as a global shortcut</h2>"
            "<p class=note>A cast unit is no place in the image: class k's cast is the mean colour of its images minus "
            "the classes' mean colour (normalised input space; cast_norm its length); removing a cast = "
            f"{html.escape(REMOVAL_WORDS[cfg.cast_removal])}. cast_effect: mean drop of p_k over the class's sample "
            "images with their cast removed; cast_effect_random: the same for random colour shifts as far; "
            "cast_specific_lo–hi: the CI of the difference (Bonferroni over classes). cast_rise: p_k's rise when "
            "other classes' images are grey-worlded (whatever the removal) and given class k's cast, cast_rise_random "
            "with a random shift "
            "as long instead, cast_sufficiency the difference (lower bound cast_sufficiency_lo), cast_flip: the share "
            f"of those images then predicted as k. Claimed where cast_sufficiency_lo &ge; {cfg.shortcut_sufficiency:g} "
            f"and cast_flip &ge; {MIN_FLIP:g} (the colour alone takes most other images to the class); flag and "
            "gated prompt then test the removal in images predicted as the class. A colour measurement: "
            "SIFT-free.</p>"
            + table_html(casts[[c for c in cols if c in casts]])
            + f"<p><b>Colour casts claimed: {html.escape(', '.join(claimed)) if claimed else 'none'}.</b></p>"
            + (placed_section_html(casts, cfg) if "place_claimed" in casts else ""))


def placed_section_html(casts: pd.DataFrame, cfg) -> str:
    """The colour casts with a place (placed_cast.py), where the run tested them (--placed-casts)."""
    cols = ["class", "map_norm", "place_n", "place_tested", "place_rise", "place_rise_random", "place_sufficiency",
            "place_sufficiency_lo", "place_flip", "place_claimed"]
    claimed = casts.loc[casts["place_claimed"], "class"].tolist()
    return ("<h3>Colour casts with a place (--placed-casts)</h3>"
            "<p class=note>For classes without a claimed cast: class k's cast map is its images' mean colour per "
            "cell of a 4 x 4 grid minus the classes' mean there (map_norm: its mean length per cell); place_n: the "
            "tokens where it is strong (its place). place_rise: p_k's rise when other classes' images have their own "
            "class's map swapped for class k's, place_rise_random with each cell of class k's map turned to a random "
            "direction as long; place_sufficiency the difference (lower bound place_sufficiency_lo), place_flip the "
            f"share then predicted as k. Claimed where place_sufficiency_lo &ge; {cfg.shortcut_sufficiency:g} and "
            f"place_flip &ge; {MIN_FLIP:g}; flag and gated prompt then mask its place in images predicted as the "
            "class. A colour measurement: SIFT-free.</p>"
            + table_html(casts[[c for c in cols if c in casts]])
            + f"<p><b>Placed casts claimed: {html.escape(', '.join(claimed)) if claimed else 'none'}.</b></p>")


def _same_place(box: tuple[float, float, float, float], token_box: tuple[float, float, float, float],
                cell: tuple[float, float]) -> bool:
    """The control's token cell lies within ``box`` grown by one token (``cell``: its height and width, in shares
    of the input) on every side."""
    ch, cw = cell
    x0, y0, x1, y1 = box
    cx, cy = (token_box[0] + token_box[2]) / 2, (token_box[1] + token_box[3]) / 2
    return x0 - cw <= cx <= x1 + cw and y0 - ch <= cy <= y1 + ch


def causal_sections_html(res: DiscoveryResult, lm: LoadedModel) -> list[str]:
    """Per class: the causal ranking, the SIFT-free occlusion control side by side, a plain verdict on what
    SIFT added, and exemplar crops of the top units' regions."""
    c = res.causal
    cell = lm.layout(res.source.input_hw).cell(res.source.input_hw)
    parts = ["<h2>Causal view: what removing a unit does to the class evidence</h2>"
             "<p class=note>Candidate units: SIFT visual words, the fixed tokens they occupy, and per class one "
             "region (where masking a window of tokens that holds a SIFT keypoint lowered the class probability "
             "most, image by image, on class images outside the sample; for cues that move or that no single word "
             "covers; it is ranked, never applied by flag or prompt)"
             + ("; with --dense-words also dense words (a descriptor at every token centre, own vocabulary, "
                "numbered after the detected words; candidates only where class-specific) and per class its "
                "specific dense words together (words:W+W'…, removed wherever any of them sits)"
                if res.dense_centroids is not None else "")
             + ". causal_effect = mean "
             f"drop of the class probability on the class's images (sample of up to {c.units['n_images'].max()}) "
             f"when the unit's tokens are masked as keys in layers {res.layers}; causal_lo–causal_hi: 95% bootstrap "
             "CI over images; causal_p: label-permutation null (max over the class's word and token units; for a "
             "region, over all its units). It treats images as exchangeable across labels, so it is small for any unit "
             "that carries some of the class's evidence wherever the class probability differs between classes' "
             "images: measured on clean Imagenette, the top unit had p &le; 0.05 in 9/10 classes for the bundled "
             "model, 6/30 across three random-weights models and 1/20 with permuted labels. It ranks; it is not a "
             "claim. causal_rank orders the class's units by effect, except that a unit inside a larger one's "
             "tokens that removes as much (within its CI, at least half its effect, p &le; 0.05) takes its place; "
             "removed_tokens: the tokens a unit's removal masks on average, and evidence_per_token = "
             "causal_effect / removed_tokens (a unit can remove much by being "
             "large: an object or a scene colour). "
             "A shortcut is claimed only for a unit whose effect exceeds the floor "
             f"{c.config.shortcut_min_effect:.3g} (fixed over the largest unit effect of ten-output random-weights "
             "models, 0.014 on clean images, 0.024 on images with planted class-coloured frames, and scaled up for a "
             "model with fewer outputs, whose random probabilities move further; a cue the class's own "
             "images do not need, with p_k near 1 without it, is missed) and that is also class-specific (&ge; "
             f"{c.config.shortcut_specificity:g}x as frequent in the class's images as in the others') or enough "
             "on its own (sufficiency, below, with its lower bound &ge; "
             f"{c.config.claim_sufficiency:g}: a frame's colours are in every class's images, yet the model "
             "follows them into any image) — the line under each class; "
             "box: the unit's main place (its 8-connected group of tokens with the most "
             "evidence), box_share: the share of its evidence there; positive_share: "
             "images where removal lowers the class probability by &gt; 0.01; attention_lift: CLS attention on the "
             "unit's tokens (1 = uniform) and attention_rank, the second view; for the tested units (class-specific "
             "claimable ones and each family's top 3 significant ones), sufficiency: "
             "the unit pasted from class images where it matters into other classes' images raises the class "
             "probability by this much more than as many random tokens of the same images, and transplant_flip: "
             "the share of those images then predicted as the class (a planted cue is followed into other images; "
             "an object part or scene colour rarely is). Control (right): every token "
             "masked alone, no SIFT, on as many images as the SIFT units' forwards allow (budget per class "
             "below).</p>"]
    agree = 0
    ranked = 0
    for k, name in enumerate(res.class_names):
        u = c.units[c.units["cls"] == k].head(5) if len(c.units) else c.units
        ctrl = c.control[c.control["cls"] == k].head(3) if len(c.control) else c.control
        if u.empty and ctrl.empty:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        cols = ["causal_rank", "unit", "causal_effect", "causal_lo", "causal_hi", "causal_p", "removed_tokens",
                "evidence_per_token", "positive_share",
                "present_share", "f_in", "f_out", "attention_lift", "attention_rank", "box_x0", "box_y0", "box_x1",
                "box_y1", "box_share"]
        cols += [col for col in ("sufficiency", "transplant_flip") if col in u and u[col].notna().any()]
        left = table_html(u[cols]) if len(u) else "none"
        ctrl_cols = ["rank", "unit", "effect", "effect_lo", "effect_hi", "n_images"]
        right = table_html(ctrl[ctrl_cols]) if len(ctrl) else "none"
        b = c.budget.get(k, {})
        parts.append("<table><tr><td style='vertical-align:top'><b>SIFT units (causal)</b>" + left +
                     "</td><td style='vertical-align:top'><b>SIFT-free control: single tokens</b>" + right +
                     "</td></tr></table>")
        if len(u) and len(ctrl):
            ranked += 1
            t = u.iloc[0]
            ct = ctrl.iloc[0]
            same = _same_place((t.box_x0, t.box_y0, t.box_x1, t.box_y1),
                               (ct.box_x0, ct.box_y0, ct.box_x1, ct.box_y1), cell)
            agree += same
            name = (f"a name ({t['unit']}, in {t['f_in']:.0%} of the class's images, {t['f_out']:.0%} of the "
                    "others) that can be looked for in new images" if t["kind"] != "region" else
                    f"nothing (its top unit, {t['unit']}, is a region found by occluding SIFT windows)")
            verdict = (f"The control's top token ({ct['unit']}) lies in the top SIFT unit's region: for locating "
                       f"this class's strongest unit SIFT adds nothing over occlusion alone; what it adds is {name}."
                       if same else
                       f"They disagree: the top SIFT unit {t['unit']} (effect {t['causal_effect']:.3f}) and the "
                       f"control's top token {ct['unit']} (effect {ct['effect']:.3f}) are in different places.")
            parts.append(f"<p>Forward passes on this class: SIFT units {b.get('sift_forwards', 0)}, control "
                         f"{b.get('control_forwards', 0)}. {html.escape(verdict)}</p>")
        if len(u):
            parts.append(f"<p><b>{html.escape(shortcut_verdict(c.units, k, c.config))}.</b></p>")
            spread = res.shortcuts.spread_note(k) if res.shortcuts is not None else ""
            if spread:
                parts.append(f"<p>{html.escape(spread[0].upper() + spread[1:])}.</p>")
            # a class may have a keypoint claim and a dense one (one per family): name the colour-only ones
            colour = [s["unit"] for s in (res.shortcuts.units if res.shortcuts is not None else [])
                      if s["cls"] == k and res.shortcuts.colour_only(s)]
            if colour:
                parts.append(f"<p>The claim on {html.escape(', '.join(colour))} rests on dense colour words "
                             "(--dense-gradient-weight 0): a token's colour with no SIFT part, so it is a SIFT-free "
                             "finding.</p>")
        crops = [_unit_crops(res, lm, k, int(r.unit_index), (r.box_x0, r.box_y0, r.box_x1, r.box_y1))
                 for r in c.units[c.units["cls"] == k].head(3).itertuples()]
        if any(crops):
            fig, axes = plt.subplots(len(crops), 6, figsize=(6, 1.1 * len(crops)), squeeze=False)
            for r, row in enumerate(crops):
                for col in range(6):
                    axes[r, col].axis("off")
                    if col < len(row):
                        axes[r, col].imshow(row[col])
                axes[r, 0].set_title(f"causal #{r + 1}", fontsize=7, loc="left")
            parts.append(f"<img src='{png_data_uri(fig, dpi=100)}'>")
    if ranked:
        parts.insert(1, f"<p><b>SIFT vs the SIFT-free control:</b> the top causal SIFT unit and the top occluded "
                        f"token are in the same place for {agree} of {ranked} classes"
                        + (" — there SIFT adds nothing to localisation, only a name for the cue." if agree else ".")
                        + "</p>")
    return parts


def _unit_crops(res: DiscoveryResult, lm: LoadedModel, k: int, j: int, box, m: int = 6) -> list[np.ndarray]:
    """The unit's region (its box grown by half a token) in the class images where removing it mattered most."""
    ev = sorted(res.causal.evidence.get((k, j), []), key=lambda t: -t[1])[:m]
    if not ev:
        return []
    x = res.source.get([i for i, _ in ev])
    H, W = res.source.input_hw
    p = lm.patch_size
    x0, y0 = max(0, int(box[0] * W) - p // 2), max(0, int(box[1] * H) - p // 2)
    x1, y1 = min(W, int(round(box[2] * W)) + p // 2), min(H, int(round(box[3] * H)) + p // 2)
    return [lm.preprocess.to_uint8_rgb(xi)[y0:y1, x0:x1] for xi in x]
