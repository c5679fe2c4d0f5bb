"""Discovery finds a planted cue that a tiny model learned; steering moves predictions off it."""

import numpy as np
import pytest
import torch
from planted.build import (
    PlantedModelConfig,
    SourceImages,
    build_planted_dataset,
    planted_preprocess,
    train_planted_model,
)
from planted.evaluate import auroc, planted_cue_rank

from siftlens.models import LoadedModel
from siftlens.prompting import SteeredViT
from siftlens.spurious.discover import DiscoveryConfig, discover_shortcuts, score_images
from siftlens.train import TrainConfig, normalize
from tests.test_planted import CLASSES, smooth_images


@pytest.fixture(scope="module")
def shortcut_model():
    torch.set_num_threads(1)
    src = SourceImages(smooth_images(90, 32, 3), torch.arange(3).repeat_interleave(30), list(CLASSES))
    ds = build_planted_dataset(src, "patch", p_aligned=0.95, seed=0)
    cfg = PlantedModelConfig(depth=2, embed_dim=64, num_heads=2)
    tc = TrainConfig(batch_size=16, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.0, augment="none")
    model, meta = train_planted_model(ds, epochs=20, seed=0, model_cfg=cfg, train_cfg=tc, log=None)
    pre = planted_preprocess(meta)
    lm = LoadedModel(model, "timm", "tiny-planted", pre, list(CLASSES))
    return ds, lm, meta


def test_discovery_ranks_the_planted_cue_first(shortcut_model):
    ds, lm, meta = shortcut_model
    assert meta["group_accuracy"]["conflict"] < meta["group_accuracy"]["aligned"] - 0.4  # it learned the cue
    x = normalize(ds.train.images, lm.preprocess.mean, lm.preprocess.std)
    res = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, DiscoveryConfig(n_words=16, layers="all"))
    ranks = planted_cue_rank(res, ds.train, 3)
    assert sum(r == 1 for r in ranks) >= 2, (ranks, res.motifs.head(9))
    top = res.motifs[res.motifs["rank"] == 1]
    assert (top["stability"] > 0.5).sum() >= 2  # a fixed-position cue is stable
    assert set(res.per_image.columns) >= {"reliance", "shortcut_mass", "semantic_mass", "pred", "label"}


def test_masking_shortcut_tokens_moves_conflict_predictions(shortcut_model):
    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images, lm.preprocess.mean, lm.preprocess.std)
    res = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, DiscoveryConfig(n_words=16, layers="all"))
    conflict = ds.test.groups == "conflict"
    xt = normalize(ds.test.images[conflict], lm.preprocess.mean, lm.preprocess.std)
    cue = ds.test.cue_ids[conflict]
    with torch.no_grad():
        p0 = lm.forward(xt).softmax(-1)
        with SteeredViT(lm, "mask_tokens", layers="all", token_mask_fn=res.masker(lm)) as st:
            p1 = st(xt).softmax(-1)
    idx = torch.arange(len(cue))
    # the planted cue's class loses probability once the motif's tokens cannot be attended
    assert p1[idx, cue].mean() < p0[idx, cue].mean() - 0.1
    scored = score_images(lm, xt, res)
    assert len(scored) == len(xt) and scored["reliance"].between(0, 1).all()


def test_auroc_hand_cases():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


def test_spurious_cli_bad_inputs(tmp_path, capsys):
    from PIL import Image

    from siftlens.cli import main

    root = tmp_path / "imgs"
    for c, n in (("a", 6), ("b", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(smooth_images(1, 64, i)[0].permute(1, 2, 0).numpy()).save(root / c / f"{i}.png")
    base = ["spurious", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--images", str(root),
            "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "fewer than 5 images: b (2)" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("path,label\nnot_there.png,a\n")
    assert main(base + ["--labels", str(tmp_path / "labels.csv")]) == 2
    assert "no label for 8 of 8 images" in capsys.readouterr().err


def test_spurious_then_prompt_cli(tmp_path, capsys):
    import json

    from PIL import Image

    from siftlens.cli import main

    root = tmp_path / "imgs"
    for k, c in enumerate(("a", "b", "c")):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(smooth_images(1, 64, 10 * k + i)[0].permute(1, 2, 0).numpy()).save(root / c / f"{i}.png")
    model = ["--model", "timm:vit_tiny_patch16_224", "--random-init"]
    # few causal images: a 224 px, 12-block random model makes every counterfactual forward costly
    assert main(["spurious", *model, "--images", str(root), "--out", str(tmp_path / "sp"), "--words", "8",
                 "--causal-images", "2"]) == 0
    for f in ("spurious.html", "motifs.csv", "reliance.parquet", "shortcut_words.npz", "manifest.json"):
        assert (tmp_path / "sp" / f).is_file(), f
    report = (tmp_path / "sp" / "spurious.html").read_text()
    assert "if attention were uniform" in report and "p_label_null" in report  # every figure with its control
    assert "masking as many random tokens" in report
    assert "label-permutation p=" in capsys.readouterr().out
    assert main(["prompt", *model, "--images", str(root), "--method", "mask_tokens", "--motifs", str(tmp_path / "sp"),
                 "--layers", "all", "--out", str(tmp_path / "pr")]) == 0
    summary = json.loads((tmp_path / "pr" / "summary.json").read_text())
    assert summary["n_images"] == 15 and 0 <= summary["changed_predictions"] <= 1 and "accuracy_after" in summary
    assert main(["prompt", *model, "--images", str(root), "--method", "mask_tokens", "--out", str(tmp_path / "x")]) == 2
    assert "needs --motifs" in capsys.readouterr().err


def _discs_of_stripes(k: int = 1) -> np.ndarray:
    """Grey 64 px image with four discs of class k's coloured stripe texture: uint8 [64, 64, 3]."""
    from planted.build import texture_pattern

    img = np.full((64, 64, 3), 128, np.uint8)
    tex = texture_pattern(k, (64, 64), period=6.0).transpose(1, 2, 0)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in [(16, 16), (16, 46), (46, 20), (44, 44)]:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 100
        img[disc] = tex[disc]
    return img


def test_motif_descriptor_sees_colour_and_orientation_that_grey_sift_does_not():
    import cv2

    from siftlens.spurious.discover import sift_with_descriptors

    rgb = _discs_of_stripes()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    grey_twin = np.repeat(gray[..., None], 3, 2)  # the same grey image, colour removed
    _, d_col = sift_with_descriptors(gray, rgb, 1.0, 0.5)
    _, d_grey = sift_with_descriptors(gray, grey_twin, 1.0, 0.5)
    assert d_col.shape[1] == 133 and len(d_col) >= 4
    assert np.array_equal(d_col[:, :128], d_grey[:, :128])  # RootSIFT cannot tell them apart...
    assert np.abs(d_col[:, 128:130] - d_grey[:, 128:130]).max(1).min() > 0.1  # ...the colour part can
    assert np.abs(d_grey[:, 128:130]).max() < 1e-6  # grey has no chroma
    rot = np.ascontiguousarray(np.rot90(rgb))
    _, d_rot = sift_with_descriptors(cv2.cvtColor(rot, cv2.COLOR_RGB2GRAY), rot, 1.0, 0.5)
    # a quarter turn flips cos 2θ: stripes at 0° and 90° get different words, as a stripe shortcut needs
    assert d_col[:, 131].mean() < -0.3 and d_rot[:, 131].mean() > 0.3
    _, plain = sift_with_descriptors(gray, None, 0.0, 0.0)
    assert plain.shape[1] == 128 and np.allclose(np.linalg.norm(plain, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        sift_with_descriptors(gray, None, 1.0, 0.0)


def test_shortcut_words_file_round_trip_and_bad_files(shortcut_model, tmp_path):
    from siftlens.spurious.discover import ShortcutMasker

    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images[:40], lm.preprocess.mean, lm.preprocess.std)
    res = discover_shortcuts(lm, x, ds.train.labels[:40].numpy(), CLASSES, DiscoveryConfig(n_words=8))
    res.save_words(tmp_path / "w.npz")
    loaded = ShortcutMasker.load(lm, tmp_path / "w.npz")
    assert (loaded.colour_weight, loaded.orientation_weight) == (1.0, 0.5)
    assert torch.equal(loaded(x[:8]), res.masker(lm)(x[:8]))
    np.savez(tmp_path / "old.npz", centroids=np.zeros((4, 128)), words=np.array([1]))  # before colour words
    assert ShortcutMasker.load(lm, tmp_path / "old.npz").colour_weight == 0.0
    np.savez(tmp_path / "mismatch.npz", centroids=np.zeros((4, 131)), words=np.array([1]))
    with pytest.raises(ValueError, match="do not match"):
        ShortcutMasker.load(lm, tmp_path / "mismatch.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a shortcut-words file"):
        ShortcutMasker.load(lm, tmp_path / "other.npz")


def test_motif_label_null_separates_a_class_specific_word_from_noise():
    import pandas as pd

    from siftlens.spurious.discover import motif_table

    rng = np.random.default_rng(0)
    N, K, W, M = 300, 5, 32, 5000
    cls = rng.integers(0, K, N)
    kps = pd.DataFrame({"image": rng.integers(0, N, M), "word": rng.integers(0, W - 1, M),
                        "lift": rng.gamma(2, 1, M), "x": rng.random(M), "y": rng.random(M)})
    noise = motif_table(kps, cls, K, W, 0.05, n_null=200, seed=0)
    top = noise[noise["rank"] == 1]
    assert (top["p_label_null"] > 0.05).all()  # no word is special to any class: the best is not significant
    assert ((top["lift_lo"] < 2.0) & (top["lift_hi"] > 2.0)).mean() >= 0.6  # gamma(2, 1) has mean 2
    # word W-1: in 90% of class-0 images, at a fixed place, under attention (lift 4)
    imgs = np.flatnonzero(cls == 0)[: int(0.9 * (cls == 0).sum())]
    cue = pd.DataFrame({"image": imgs, "word": W - 1, "lift": 4.0, "x": 0.2, "y": 0.2})
    res = motif_table(pd.concat([kps, cue], ignore_index=True), cls, K, W, 0.05, n_null=200, seed=0)
    best = res[(res["cls"] == 0) & (res["rank"] == 1)].iloc[0]
    assert best["word"] == W - 1 and best["p_label_null"] == 1 / 201
    assert best["lift_lo"] == best["lift_hi"] == 4.0
    assert "p_label_null" not in motif_table(kps, cls, K, W, 0.05).columns  # n_null=0: no controls


def test_decisive_attention_mean_and_rollout(shortcut_model):
    from siftlens.spurious.discover import decisive_attention

    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images[:6], lm.preprocess.mean, lm.preprocess.std)
    n = lm.layout(tuple(x.shape[-2:])).num_patches
    mean, logits = decisive_attention(lm, x, [0, 1], "mean")
    roll, logits2 = decisive_attention(lm, x, [0, 1], "rollout")
    last, _ = decisive_attention(lm, x, [1], "mean")
    first_roll, _ = decisive_attention(lm, x, [0], "rollout")
    from siftlens.capture import AttentionCapture

    rows = {}
    with AttentionCapture(lm.module, lm.backend, lambda i, a: rows.setdefault(i, a[:, :, 0, 1:].mean(1))):
        lm.forward(x)
    first = rows[0] / rows[0].sum(-1, keepdim=True)  # head-mean CLS row of layer 0, over patches
    for a in (mean, roll, last):
        assert a.shape == (6, n) and torch.allclose(a.sum(-1), torch.ones(6), atol=1e-5) and (a >= 0).all()
    assert torch.equal(logits, logits2)
    assert not torch.allclose(roll, last, atol=1e-3)  # rollout is not the last layer's row
    # one layer: rollout of (A + I)/2 restricted to patches is the head-mean CLS row renormalised
    assert torch.allclose(first_roll, first, atol=1e-5)
    with pytest.raises(ValueError, match="decisive"):
        decisive_attention(lm, x, [0], "gradcam")


def test_fixed_position_cue_is_masked_even_where_sift_misses_it(shortcut_model, tmp_path):
    from siftlens.spurious.discover import ShortcutMasker

    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images, lm.preprocess.mean, lm.preprocess.std)
    res = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, DiscoveryConfig(n_words=16, layers="all"))
    grid = lm.layout(tuple(x.shape[-2:])).grid
    assert res.fixed_tokens, "no fixed-position motif found for a cue that never moves"
    for fixed in res.fixed_tokens.values():
        assert fixed.shape == grid and fixed[1, 1] and fixed.sum() <= 2  # the cue's token (8 px at (8, 8))
    absent = normalize(ds.test.images[ds.test.groups == "absent"][:5], lm.preprocess.mean, lm.preprocess.std)
    assert res.masker(lm)(absent)[:, grid[1] + 1].all()  # masked even with no cue keypoint in the image
    off = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES,
                             DiscoveryConfig(n_words=16, layers="all", fixed_share=0))
    assert off.fixed_tokens == {}
    res.save_words(tmp_path / "w.npz")
    loaded = ShortcutMasker.load(lm, tmp_path / "w.npz")
    assert torch.equal(loaded(absent), res.masker(lm)(absent))
    coarse = ShortcutMasker(lm, res.centroids, [], *res.descriptor_weights, fixed_tokens=np.eye(2, dtype=bool))
    assert coarse._fixed_on((4, 4)).reshape(4, 4)[:2, :2].all()  # a saved grid maps onto another grid


def test_counterfactual_scores_flag_conflicts_beyond_the_random_control(shortcut_model):
    from siftlens.spurious.discover import counterfactual_scores

    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images, lm.preprocess.mean, lm.preprocess.std)
    res = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, DiscoveryConfig(n_words=16, layers="all"))
    xt = normalize(ds.test.images, lm.preprocess.mean, lm.preprocess.std)
    cf = counterfactual_scores(lm, xt, res.masker(lm), seed=0)
    assert len(cf) == len(xt) and (cf["shortcut_kl"] >= 0).all() and (cf["n_masked"] >= 1).all()
    g = ds.test.groups
    # removing the cue shifts beliefs on cue-carrying images far more than removing as many random tokens
    assert cf["shortcut_kl"][g != "absent"].mean() > 3 * cf["random_kl"][g != "absent"].mean()
    assert auroc(cf["shortcut_kl"].to_numpy(), g == "conflict") > auroc(cf["random_kl"].to_numpy(), g == "conflict")
    again = counterfactual_scores(lm, xt, res.masker(lm), seed=0)
    assert np.array_equal(again.to_numpy(), cf.to_numpy())  # deterministic for a seed


def _all_descriptors(parts):
    """Every keypoint's descriptor, read from the extract pass's parts in order (the old in-memory array)."""
    i, out = 0, []
    while parts.done("extract", i):
        part = parts.read("extract", i)
        if part.table is not None:
            out.append(part.arrays["desc"])
        i += 1
    return np.concatenate(out)


@pytest.mark.parametrize("word_keypoints", ["all", "attended"])
def test_descriptors_are_read_chunk_by_chunk_and_the_kmeans_sample_is_capped(shortcut_model, tmp_path,
                                                                             monkeypatch, word_keypoints):
    """The motif descriptors of all images are never held together: word assignment sees one chunk at a time
    and k-means at most max_fit_descriptors rows; the words are those of the whole array (seeded sample by row,
    the same draw as before streaming), with the parts on disk or in memory."""
    import pandas as pd
    from scipy.cluster.vq import kmeans2, vq

    import siftlens.spurious.discover as discover
    from siftlens.resume import RunParts

    ds, lm, _ = shortcut_model
    x = normalize(ds.train.images, lm.preprocess.mean, lm.preprocess.std)
    cap, batch = 150, 16
    cfg = DiscoveryConfig(n_words=8, layers="all", causal=None, n_null=0, batch_size=batch, max_fit_descriptors=cap,
                          word_keypoints=word_keypoints, dense_words=0)  # the keypoint descriptors' path
    fit_rows, vq_rows = [], []
    monkeypatch.setattr(discover, "kmeans2", lambda d, *a, **k: (fit_rows.append(len(d)), kmeans2(d, *a, **k))[1])
    monkeypatch.setattr(discover, "vq", lambda d, c: (vq_rows.append(len(d)), vq(d, c))[1])
    parts = RunParts(tmp_path, "spurious", {"test": 1})
    res = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, cfg, parts=parts)
    monkeypatch.undo()

    n_kp = len(res.keypoints)
    per_image = res.keypoints.groupby("image").size().reindex(range(len(x)), fill_value=0).to_numpy()
    largest_chunk = max(per_image[s:s + batch].sum() for s in range(0, len(x), batch))
    eligible = n_kp if word_keypoints == "all" else int(res.keypoints["attended"].sum())
    assert eligible > cap  # the sampled path
    assert fit_rows == [cap]
    assert sum(vq_rows) == n_kp and max(vq_rows) <= largest_chunk < n_kp

    # the words of the old path: every descriptor in one array, the same seeded draw over the eligible rows
    D = _all_descriptors(parts)
    assert len(D) == n_kp
    Dfit = D if word_keypoints == "all" else D[res.keypoints["attended"].to_numpy()]
    fit = Dfit[np.random.default_rng(cfg.seed).choice(len(Dfit), cap, replace=False)]
    centroids, _ = kmeans2(fit.astype(np.float64), cfg.n_words, minit="++", seed=cfg.seed)
    np.testing.assert_array_equal(res.centroids, centroids)
    np.testing.assert_array_equal(res.keypoints["word"].to_numpy(), vq(D.astype(np.float64), centroids)[0])

    in_memory = discover_shortcuts(lm, x, ds.train.labels.numpy(), CLASSES, cfg)  # library API: parts in memory
    np.testing.assert_array_equal(in_memory.centroids, res.centroids)
    pd.testing.assert_frame_equal(in_memory.motifs, res.motifs, check_exact=True)
    pd.testing.assert_frame_equal(in_memory.per_image, res.per_image, check_exact=True)


def test_descriptor_parts_take_gathers_rows_in_the_order_asked():
    from siftlens.resume import Part, RunParts
    from siftlens.spurious.discover import DescriptorParts

    parts = RunParts.memory()
    rng = np.random.default_rng(0)
    chunks = [rng.random((n, 5)).astype(np.float32) for n in (3, 0, 4, 2)]
    for i, d in enumerate(chunks):
        parts.write("extract", i, Part(arrays={"desc": d}))
    desc = DescriptorParts(parts, [0, 2, 3], [3, 4, 2], 5)  # chunk 1 held no keypoint
    everything = np.concatenate(chunks)
    rows = np.array([8, 0, 4, 3, 7, 1])
    np.testing.assert_array_equal(desc.take(rows), everything[rows])
    assert len(desc) == 9 and desc.max_rows_read == 4
    centroids = everything[[0, 5]].astype(np.float64)
    from scipy.cluster.vq import vq

    np.testing.assert_array_equal(desc.words(centroids), vq(everything.astype(np.float64), centroids)[0])
