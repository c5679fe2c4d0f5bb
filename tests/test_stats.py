"""Statistics of METHOD.md §2 against hand-computed cases and scipy references."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from siftlens.dataset_stats import bootstrap_mean_ci, lift_matrices
from siftlens.semantic_maps import concentration_groups
from siftlens.stats import RolloutState, average_ranks, layer_statistics, prepare_maps

NAMES = ("sift", "random_kp", "edges", "edges_sparse", "orb", "center", "uniform")
GRID, PATCH = (3, 4), 16
N = GRID[0] * GRID[1]


def make_maps(B=2, seed=0, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(B, len(NAMES), N, generator=g)
    C[:, 0] *= (torch.rand(B, N, generator=g) > zero_frac)  # SIFT maps have empty patches
    C[:, -1] = 1.0
    C = C / C.sum(-1, keepdim=True)
    groups = torch.from_numpy(np.stack([concentration_groups(C[b, 0].numpy(), 4) for b in range(B)]))
    return prepare_maps(C, groups, NAMES, 4, GRID, PATCH), C, groups


def attn_from_blocks(B, H, P, patch_block, prefix_share=0.0, cls_row=None):
    """Full [B, H, P+n, P+n] attention from a patch block; patch queries give prefix_share to prefix."""
    T = P + N
    A = torch.zeros(B, H, T, T)
    A[..., P:, P:] = patch_block * (1 - prefix_share)
    if P:
        A[..., P:, :P] = prefix_share / P
        A[..., :P, :] = 1.0 / T
        if cls_row is not None:
            A[..., 0, :] = 0
            A[..., 0, P:] = cls_row
    return A


def test_uniform_attention_gives_one():
    maps, C, _ = make_maps()
    A = attn_from_blocks(2, 3, 1, torch.full((N, N), 1.0 / N), prefix_share=0.2, cls_row=torch.full((N,), 1 / N))
    st = layer_statistics(A, 1, 0, maps)
    for key in ("s_cls", "s_pp", "s_ppw"):
        torch.testing.assert_close(st[key], torch.ones_like(st[key]))
    torch.testing.assert_close(st["prefix_mass"], torch.full((2, 3), 0.2))
    torch.testing.assert_close(st["entropy_pp"], torch.full((2, 3), math.log(N)))
    lift = st["lift"][torch.isfinite(st["lift"])]
    torch.testing.assert_close(lift, torch.ones_like(lift))
    assert torch.isfinite(st["lift"]).any()


def test_one_hot_cls_on_densest_patch():
    maps, C, _ = make_maps()
    B, H = 2, 2
    densest = C[:, 0].argmax(-1)
    cls_rows = torch.nn.functional.one_hot(densest, N).float()  # [B, n]
    A = torch.zeros(B, H, 1 + N, 1 + N)
    A[..., 1:, 1:] = 1.0 / N
    A[:, :, 0, 1:] = cls_rows[:, None]
    st = layer_statistics(A, 1, 0, maps)
    expect = N * C[torch.arange(B), :, densest]  # [B, M]
    torch.testing.assert_close(st["s_cls"], expect[:, None].expand(B, H, -1))
    assert (st["s_cls"][..., 0] > 1).all()
    assert st["entropy_cls"].abs().max() < 1e-5


def test_identity_patch_attention():
    maps, C, groups = make_maps(B=1)
    A = attn_from_blocks(1, 1, 0, torch.eye(N))
    st = layer_statistics(A, 0, None, maps)
    assert "s_cls" not in st  # no CLS token: CLS statistics are absent, not invented
    torch.testing.assert_close(st["s_pp"], torch.ones(1, 1, len(NAMES)))
    torch.testing.assert_close(st["s_ppw"][0, 0], N * (C[0] ** 2).sum(-1))
    assert st["mean_dist_px"].abs().max() < 1e-6
    sizes = torch.bincount(groups[0], minlength=4).float()
    lift = st["lift"][0, 0]
    for g in range(4):
        for f in range(4):
            if sizes[g] == 0 or sizes[f] == 0:
                assert torch.isnan(lift[g, f])
            elif g == f:
                assert lift[g, f].item() == pytest.approx(N / sizes[g].item(), rel=1e-5)
            else:
                assert lift[g, f].item() == pytest.approx(0.0, abs=1e-6)


def test_mean_distance_in_pixels():
    maps, _, _ = make_maps(B=1)
    block = torch.zeros(N, N)
    block[torch.arange(N), (torch.arange(N) + 1) % N] = 1.0  # attend to the next patch in raster order
    st = layer_statistics(attn_from_blocks(1, 1, 0, block), 0, None, maps)
    h, w = GRID
    d = []
    for i in range(N):
        j = (i + 1) % N
        d.append(PATCH * math.hypot(i // w - j // w, i % w - j % w))
    assert st["mean_dist_px"].item() == pytest.approx(np.mean(d), rel=1e-5)


def test_spearman_and_partial_match_scipy():
    maps, C, _ = make_maps(B=2, seed=3)
    g = torch.Generator().manual_seed(1)
    A = torch.rand(2, 3, 1 + N, 1 + N, generator=g).softmax(-1)
    st = layer_statistics(A, 1, 0, maps)
    for b in range(2):
        for h in range(3):
            a = A[b, h, 0, 1:].numpy()
            for m, name in enumerate(NAMES[:-1]):  # uniform: undefined
                ref = spearmanr(a, C[b, m].numpy()).statistic
                assert st["spearman"][b, h, m].item() == pytest.approx(ref, abs=1e-5), name
            # partial rank correlation: residualise ranks on (1, rank edges, rank centre)
            Z = np.column_stack([np.ones(N), rankdata(C[b, 2]), rankdata(C[b, 5])])
            res = lambda v, Z=Z: v - Z @ np.linalg.lstsq(Z, v, rcond=None)[0]
            ra, rc = res(rankdata(a)), res(rankdata(C[b, 0]))
            ref = ra @ rc / np.linalg.norm(ra) / np.linalg.norm(rc)
            assert st["partial_spearman_sift"][b, h].item() == pytest.approx(ref, abs=1e-4)
    assert torch.isnan(st["spearman"][..., -1]).all()


def test_undefined_sift_map_gives_nan_not_error():
    maps, C, groups = make_maps(B=2)
    C2 = C.clone()
    C2[1, 0] = float("nan")
    groups[1] = 0
    maps2 = prepare_maps(C2, groups, NAMES, 4, GRID, PATCH)
    A = torch.rand(2, 2, 1 + N, 1 + N).softmax(-1)
    st = layer_statistics(A, 1, 0, maps2)
    assert torch.isnan(st["s_cls"][1, :, 0]).all() and torch.isfinite(st["s_cls"][1, :, 1:]).all()
    assert torch.isfinite(st["s_cls"][0]).all()
    assert torch.isnan(st["lift"][1]).all() and (st["lift_exp"][1] == 0).all()


def test_average_ranks_matches_scipy():
    x = torch.tensor([[3.0, 1, 1, 2, 0, 0, 0, 5], [1, 1, 1, 1, 1, 1, 1, 1]])
    for row, r in zip(x, average_ranks(x)):
        np.testing.assert_allclose(r.numpy(), rankdata(row.numpy()))


def test_rollout_single_layer_and_identity():
    A = torch.rand(1, 2, 5, 5).softmax(-1)
    ro = RolloutState()
    ro.update(A)
    M = 0.5 * A.mean(1) + 0.5 * torch.eye(5)
    M = M / M.sum(-1, keepdim=True)
    torch.testing.assert_close(ro.R, M)
    r = ro.cls_map(1, 0)
    torch.testing.assert_close(r, M[:, 0, 1:] / M[:, 0, 1:].sum(-1, keepdim=True))
    A2 = torch.rand(1, 2, 5, 5).pow(3).softmax(-1)  # a second, different layer: the order of the product matters
    ro.update(A2)
    M2 = 0.5 * A2.mean(1) + 0.5 * torch.eye(5)
    M2 = M2 / M2.sum(-1, keepdim=True)
    torch.testing.assert_close(ro.R, M2 @ M)
    assert not torch.allclose(M2 @ M, M @ M2, atol=1e-4)


def test_rollout_cls_row_equals_the_row_of_the_full_product():
    g = torch.Generator().manual_seed(3)
    ro = RolloutState()
    Ms = []
    for _ in range(4):
        A = (3 * torch.randn(2, 3, 6, 6, generator=g)).softmax(-1)
        ro.update(A)
        M = 0.5 * A.mean(1) + 0.5 * torch.eye(6)
        Ms.append(M / M.sum(-1, keepdim=True))
    R = Ms[0]
    for M in Ms[1:]:
        R = M @ R
    for cls, P in ((0, 1), (1, 2)):  # the CLS row at another index too (e.g. after a register token)
        want = R[:, cls, P:] / R[:, cls, P:].sum(-1, keepdim=True)
        torch.testing.assert_close(ro.cls_map(P, cls), want, rtol=1e-5, atol=1e-6)


def test_bootstrap_ci():
    mean, lo, hi = bootstrap_mean_ci(np.full((50, 2), 3.0))
    np.testing.assert_allclose([mean, lo, hi], 3.0)
    v = np.random.default_rng(0).normal(1.0, 1.0, size=(400, 1))
    v[:10] = np.nan
    mean, lo, hi = bootstrap_mean_ci(v, seed=1)
    assert lo[0] < np.nanmean(v) < hi[0]
    assert mean[0] == pytest.approx(np.nanmean(v))
    assert hi[0] - lo[0] == pytest.approx(2 * 1.96 / np.sqrt(390), rel=0.2)
    again = bootstrap_mean_ci(v, seed=1)
    np.testing.assert_array_equal(lo, again[1])


def test_lift_matrices_ratio_of_sums():
    obs = np.array([[[[2.0, 0.0], [1.0, 1.0]]]])
    exp = np.array([[[[1.0, 0.0], [1.0, 2.0]]]])
    L = lift_matrices(obs, exp)
    assert L[0, 0, 0, 0] == 2.0 and np.isnan(L[0, 0, 0, 1]) and L[0, 0, 1, 1] == 0.5


def test_permutation_null_detects_map_equal_to_attention():
    B, H = 4, 2
    g = torch.Generator().manual_seed(5)
    cls = torch.rand(B, N, generator=g) ** 4
    cls = cls / cls.sum(-1, keepdim=True)
    C = torch.full((B, len(NAMES), N), 1.0 / N)
    C[:, 0] = cls  # the SIFT map is exactly where CLS attends
    groups = torch.from_numpy(np.stack([concentration_groups(c.numpy()) for c in cls]))
    maps = prepare_maps(C, groups, NAMES, 4, GRID, PATCH, null_seeds=list(range(B)), n_perm=200)
    A = torch.full((B, H, 1 + N, 1 + N), 1.0 / (1 + N))
    A[:, :, 0, 1:] = cls[:, None]
    A[:, :, 0, 0] = 0
    st = layer_statistics(A, 1, 0, maps)
    assert (st["s_cls_p"] <= 0.02).all() and (st["s_cls_z"] > 2).all()
    # uniform patch attention is blind to the map: S_pp = 1 = every permutation -> p = 1
    assert (st["s_pp_p"] == 1.0).all()


def test_permutation_p_values_are_uniform_under_the_null():
    from scipy.stats import kstest

    B, H = 100, 4
    g = torch.Generator().manual_seed(11)
    C = torch.rand(B, len(NAMES), N, generator=g)
    C = C / C.sum(-1, keepdim=True)
    groups = torch.from_numpy(np.stack([concentration_groups(c.numpy()) for c in C[:, 0]]))
    maps = prepare_maps(C, groups, NAMES, 4, GRID, PATCH, null_seeds=list(range(B)), n_perm=200)
    A = (3 * torch.randn(B, H, 1 + N, 1 + N, generator=g)).softmax(-1)  # independent of the map
    p = layer_statistics(A, 1, 0, maps, min_effect=0.0)["s_cls_p"].flatten().numpy()
    assert kstest(p, "uniform").pvalue > 0.01
    assert 0.02 < (p < 0.05).mean() < 0.09
    # the minimum-effect test (the default) is conservative under the null: fewer small p-values
    p_min = layer_statistics(A, 1, 0, maps)["s_cls_p"].flatten().numpy()
    assert (p_min >= p).all() and (p_min < 0.05).mean() < (p < 0.05).mean()


def test_chunked_statistics_equal_unchunked(monkeypatch):
    from siftlens import stats

    maps, _, _ = make_maps(B=5, seed=4)
    A = torch.rand(5, 2, 1 + N, 1 + N, generator=torch.Generator().manual_seed(0)).softmax(-1)
    whole = layer_statistics(A, 1, 0, maps)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 2 * (1 + N) ** 2 * 2)  # 2 images per chunk
    chunked = layer_statistics(A, 1, 0, maps)
    for k in whole:
        torch.testing.assert_close(whole[k], chunked[k], equal_nan=True)


def test_shift_null_is_a_set_of_grid_rearrangements_and_stricter_for_smooth_maps():
    from siftlens.stats import null_indices

    idx = null_indices(50, (3, 4), seed=0, mode="shift")
    assert idx.shape == (50, 12) and (idx.sort(-1).values == torch.arange(12)).all()  # each is a permutation
    # neighbours stay neighbours (cyclically): the shift keeps the map's spatial structure
    grid = idx.view(50, 3, 4)
    dx = (grid[:, :, 1:] % 4 - grid[:, :, :-1] % 4).abs()
    assert ((dx == 1) | (dx == 3)).all()
    # a smooth map and smooth attention that do not match: the shift null is less impressed than shuffling
    h, w = 8, 8
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    c = torch.exp(-((yy - 2.0) ** 2 + (xx - 2.0) ** 2) / 8).reshape(1, -1)
    a = torch.exp(-((yy - 4.0) ** 2 + (xx - 4.0) ** 2) / 8).reshape(1, 1, -1)
    c, a = c / c.sum(), a / a.sum()
    from siftlens.stats import permutation_test, permuted_maps

    s = 64 * (a * c[:, None]).sum(-1)
    z_perm, _, _ = permutation_test(s, 64 * torch.einsum("bhj,bkj->bhk", a, permuted_maps(c, [0], 400, (h, w))))
    z_shift, _, _ = permutation_test(s, 64 * torch.einsum("bhj,bkj->bhk", a,
                                                       permuted_maps(c, [0], 400, (h, w), "shift")))
    assert z_shift.item() < z_perm.item()


def test_workspace_and_zero_attention_give_the_reference_values():
    from siftlens.stats import Workspace

    maps, _, _ = make_maps(B=3, seed=7)
    g = torch.Generator().manual_seed(2)
    A = (4 * torch.randn(3, 2, 1 + N, 1 + N, generator=g)).softmax(-1)
    A[..., 1:, 1:] *= torch.rand(3, 2, N, N, generator=g) > 0.3  # exact zeros: 0 log 0 = 0
    plain = layer_statistics(A, 1, 0, maps)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the buffers
        reused = layer_statistics(A, 1, 0, maps, ws)
        for k in plain:
            torch.testing.assert_close(plain[k], reused[k], equal_nan=True, rtol=0, atol=0)
    pp = A[..., 1:, 1:]
    At = pp / pp.sum(-1, keepdim=True)
    torch.testing.assert_close(plain["entropy_pp"], torch.special.entr(At).sum(-1).mean(-1))


# --- asymmetric cases: each fails if a statistic is computed along the wrong axis or transposed ---

def _naive_stats(A: torch.Tensor, P: int, cls_index: int, c: torch.Tensor, groups: torch.Tensor, G: int):
    """METHOD.md §2 written as loops over one image and head: A [T, T], c [n], groups [n]."""
    T = A.shape[0]
    n = T - P
    At = A[P:, P:] / A[P:, P:].sum(-1, keepdim=True)
    s_pp = n * np.mean([sum(At[i, j].item() * c[j].item() for j in range(n)) for i in range(n)])
    s_ppw = n * sum(c[i].item() * sum(At[i, j].item() * c[j].item() for j in range(n)) for i in range(n))
    a = A[cls_index, P:] / A[cls_index, P:].sum()
    s_cls = n * sum(a[j].item() * c[j].item() for j in range(n))
    lift = np.full((G, G), np.nan)
    for g in range(G):
        qs = [i for i in range(n) if groups[i] == g]
        for f in range(G):
            ks = [j for j in range(n) if groups[j] == f]
            if qs and ks:
                lift[g, f] = np.mean([sum(At[i, j].item() for j in ks) for i in qs]) / (len(ks) / n)
    return s_pp, s_ppw, s_cls, lift


def test_asymmetric_attention_matches_naive_loops_with_three_prefix_tokens_and_cls_not_first():
    P, cls_index, G = 3, 1, 4
    maps, C, groups = make_maps(B=2, seed=9, zero_frac=0.4)
    g = torch.Generator().manual_seed(3)
    # strongly asymmetric: each query prefers keys to its right, with a query-dependent sharpness
    T = P + N
    logits = 3 * torch.randn(2, 2, T, T, generator=g) + torch.linspace(0, 4, T)[None, None, None, :] \
        * torch.linspace(-1, 2, T)[None, None, :, None]
    # queries differ in how much they seek SIFT-dense keys (so S_pp != 1 and S_ppw weighs queries unevenly)
    logits[..., P:, P:] += torch.linspace(0, 3, N)[:, None] * torch.log(C[:, None, None, 0] + 0.01)
    A = logits.softmax(-1)
    assert not torch.allclose(A[0, 0, P:, P:], A[0, 0, P:, P:].T, atol=1e-2)
    st = layer_statistics(A, P, cls_index, maps)
    for b in range(2):
        for h in range(2):
            s_pp, s_ppw, s_cls, lift = _naive_stats(A[b, h], P, cls_index, C[b, 0], groups[b], G)
            assert st["s_pp"][b, h, 0].item() == pytest.approx(s_pp, rel=1e-4)
            assert st["s_ppw"][b, h, 0].item() == pytest.approx(s_ppw, rel=1e-4)
            assert st["s_cls"][b, h, 0].item() == pytest.approx(s_cls, rel=1e-4)
            np.testing.assert_allclose(st["lift"][b, h].numpy(), lift, rtol=1e-4)
            assert abs(s_pp - 1) > 0.05  # the case is not one where every statistic is 1
            assert not np.allclose(lift, lift.T, equal_nan=True)  # a transposed lift would fail


def test_swapped_maps_exclude_the_own_map_and_keep_k_fixed():
    from siftlens.stats import swapped_maps

    bank = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)  # map i is recognisable by its values
    bank_ids = torch.tensor([10, 11, 12, 13, 14])
    out = swapped_maps(bank, bank_ids, torch.tensor([12, 99, 10]))
    assert out.shape == (3, 4, 3)
    rows = lambda t: {int(r[0]) // 3 for r in t}  # noqa: E731
    assert rows(out[0]) == {0, 1, 3, 4}  # image 12 is bank row 2: excluded
    assert rows(out[1]) == {0, 1, 2, 3}  # not in the bank: the last map is dropped, K stays 4
    assert rows(out[2]) == {1, 2, 3, 4}


@pytest.mark.parametrize("chunked", [False, True])
def test_swap_null_from_the_shared_bank_equals_the_gathered_copy(monkeypatch, chunked):
    """analyze tests each image against the bank's maps through one matmul on the shared bank (null_bank /
    null_keep); it must give the statistics of the [B, K, n] copy (swapped_maps), image by image, including an
    image that is itself in the bank, one that is not, and one without a SIFT map (no test: NaN)."""
    import siftlens.stats as stats
    from siftlens.stats import swap_columns, swapped_maps

    if chunked:  # layer_statistics then reduces the batch in pieces (BatchMaps.narrow)
        monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 2 * 3 * 17 * 17)
    g = torch.Generator().manual_seed(5)
    B, H, h, w, K = 6, 3, 4, 4, 9
    n, P = h * w, 1
    C = torch.rand(B, len(NAMES), n, generator=g)
    C = C / C.sum(-1, keepdim=True)
    C[4, 0] = torch.nan  # image 4 has no SIFT map
    groups = torch.randint(0, 4, (B, n), generator=g)
    A = torch.rand(B, H, P + n, P + n, generator=g).pow(3)
    A = A / A.sum(-1, keepdim=True)
    bank = torch.rand(K + 1, n, generator=g)
    bank = bank / bank.sum(-1, keepdim=True)
    bank_ids = torch.tensor([20, 1, 21, 3, 22, 23, 24, 25, 26, 27])  # images 1 and 3 of the batch are in it
    index = torch.arange(B)
    copy = prepare_maps(C, groups, NAMES, 4, (h, w), PATCH, C_null=swapped_maps(bank, bank_ids, index))
    shared = prepare_maps(C, groups, NAMES, 4, (h, w), PATCH, null_bank=bank, null_keep=swap_columns(bank_ids, index))
    a, b = layer_statistics(A, P, 0, copy, min_effect=0.0), layer_statistics(A, P, 0, shared, min_effect=0.0)
    for key in ("s_cls_null", "s_cls_z", "s_pp_null", "s_pp_z"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    for key in ("s_cls_p", "s_pp_p"):  # the same counts, but a null value within float rounding of the
        # threshold may tip one way or the other: at most one step of 1 / (K + 1), rarely
        assert torch.equal(torch.isnan(a[key]), torch.isnan(b[key]))
        step = (torch.nan_to_num(a[key]) - torch.nan_to_num(b[key])).abs() * (K + 1)
        assert step.max() <= 1 + 1e-4 and (step > 0.5).float().mean() <= 0.05
    assert torch.isnan(b["s_cls_p"][4]).all() and not torch.isnan(b["s_cls_p"][[0, 1, 2, 3, 5]]).any()
    # image 1 is bank column 1: its own map is not among its null maps, the bank's last one is for image 0
    keep = swap_columns(bank_ids, index)
    assert 1 not in keep[1].tolist() and 9 in keep[1].tolist() and 9 not in keep[0].tolist()
    # and the p-values vary between images (not a case where every null ties)
    assert len(set(b["s_cls_p"][[0, 1, 2, 3, 5]].flatten().tolist())) > 3


def test_swap_null_is_calibrated_where_within_image_shuffles_are_not():
    """Smooth attention and smooth maps from independent images: shuffling the own map over patches calls
    far more than 5% significant; the image-swap null stays near 5%."""
    from siftlens.stats import swapped_maps

    B, h, w = 150, 8, 8
    n = h * w
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    def blobs(k):
        cy, cx = torch.rand(B, k, 1, 1, generator=g) * h, torch.rand(B, k, 1, 1, generator=g) * w
        f = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6).sum(1).reshape(B, n)
        return f / f.sum(-1, keepdim=True)

    c, a = blobs(2), blobs(2)  # independent
    C = torch.full((B, len(NAMES), n), 1.0 / n)
    C[:, 0] = c
    groups = torch.from_numpy(np.stack([concentration_groups(x.numpy()) for x in c]))
    A = torch.full((B, 1, 1 + n, 1 + n), 1.0 / (1 + n))
    A[:, 0, 0, 1:], A[:, 0, 0, 0] = a, 0
    rates = {}
    for mode in ("permute", "swap"):
        kw = dict(C_null=swapped_maps(c[:101], torch.arange(101), torch.arange(B))) if mode == "swap" else \
            dict(null_seeds=list(range(B)), n_perm=100, null_mode=mode)
        maps = prepare_maps(C, groups, NAMES, 4, (h, w), PATCH, **kw)
        rates[mode] = (layer_statistics(A, 1, 0, maps, min_effect=0.0)["s_cls_p"] < 0.05).float().mean().item()
    assert rates["permute"] > 0.15
    assert rates["swap"] < 0.1


def test_nan_attention_gives_nan_p_values_not_significance():
    from siftlens.stats import permutation_test

    z, p, m = permutation_test(torch.tensor([float("nan"), 2.0]), torch.ones(2, 10))
    assert torch.isnan(p[0]) and torch.isnan(z[0]) and torch.isnan(m[0])
    assert p[1].item() == pytest.approx(1 / 11)
