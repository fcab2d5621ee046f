"""The C voxel matching (nnunet_ssl.core.native) against brute force and the torch matching, and its fallback."""
import math
import warnings

import pytest
import torch

from conftest import voxel_grid

from nnunet_ssl.core import native
from nnunet_ssl.core.correspondence import sample_correspondences

needs_c = pytest.mark.skipif(native.library() is None, reason="no C compiler: the C kernel is not built")


def _brute(q, p, ok):
    """Nearest ok point per query by the full float32 distance matrix, ((dx^2 + dy^2) + dz^2) as the kernel sums;
    ties: the lowest index (the first minimum)."""
    d = p[:, None, :, :] - q[:, :, None, :]
    sq = d.square()
    d2 = (sq[..., 0] + sq[..., 1]) + sq[..., 2]
    d2 = torch.where(ok[:, None, :], d2, float("inf"))
    best, idx = d2.min(dim=-1)
    return idx, best


@needs_c
@pytest.mark.parametrize("seed", range(4))
def test_nearest_within_equals_brute_force_with_ties_invalid_points_and_empty_views(seed):
    g = torch.Generator().manual_seed(seed)
    bsz, n, m = 3, 400, 300
    # integer coordinates on a small lattice: many points at equal distances (ties), some coincident
    p = torch.randint(0, 9, (bsz, n, 3), generator=g).float()
    ok = torch.rand(bsz, n, generator=g) < 0.7
    p[~ok] = torch.tensor([float("nan"), float("inf"), -1e30])  # invalid points: any value, never found
    ok[2] = False  # a view without any valid point
    q = torch.randint(-3, 12, (bsz, m, 3), generator=g).float() + torch.rand(bsz, m, 3, generator=g).round() * 0.5
    q[0, :5] = float("nan")  # queries without a position find nothing
    tol = (1.0, 1.5, 2.0, 0.0)[seed]
    idx, d2 = native.nearest_within(q, p, ok, tol)
    ref_idx, ref_d2 = _brute(q, p, ok)
    within = ref_d2.sqrt() <= tol
    assert within.sum() > (5 if tol == 0 else 100) and (~within).sum() > 10  # tol 0: exact hits only
    assert torch.equal(idx[within], ref_idx[within]) and torch.equal(d2[within], ref_d2[within])
    # nothing within tol: no point (inf) or one of the searched cells, never nearer than the true nearest
    farther = ~within & ~ref_d2.isnan()
    assert (d2[farther] >= ref_d2[farther]).all()
    assert torch.isinf(d2[2]).all() and (idx[2] == 0).all() and torch.isinf(d2[0, :5]).all()


@needs_c
def test_nearest_within_is_exact_when_the_grid_is_coarsened():
    """Points spread over 1e5 units with a tolerance of 0.5: far more cells than points, so the cells are widened;
    a clustered and a scattered part, both exact."""
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(1, 300, 3, generator=g) * 1e5
    cluster = torch.rand(1, 300, 3, generator=g) * 4 + 500.0
    p = torch.cat((spread, cluster), 1)
    ok = torch.ones(1, 600, dtype=torch.bool)
    q = torch.cat((p[:, ::7] + 0.2 * torch.rand(1, 86, 3, generator=g), torch.rand(1, 100, 3, generator=g) * 4 + 500),
                  1)
    idx, d2 = native.nearest_within(q, p, ok, 0.5)
    ref_idx, ref_d2 = _brute(q, p, ok)
    within = ref_d2.sqrt() <= 0.5
    assert within.sum() > 100
    assert torch.equal(idx[within], ref_idx[within]) and torch.equal(d2[within], ref_d2[within])


@needs_c
@pytest.mark.parametrize("num_samples,valid_b", [(64, 0.9), (500, 0.9), (64, 0.0), (16, 0.05)])
def test_c_matching_equals_the_torch_matching(num_samples, valid_b):
    """The same generator, the same pairs as the torch search (brute force), also where fewer voxels are eligible
    than the candidates (a view b of few valid voxels), fewer match than the slots (500 of 384 voxels: padding), or
    view b has no valid voxel."""
    g = torch.Generator().manual_seed(num_samples)
    shape = (6, 8, 8)
    grid = voxel_grid(shape)
    ca = torch.stack([grid + torch.randn(3, 1, 1, 1, generator=g) for _ in range(3)])
    cb = torch.stack([grid.flip(1) * 1.1 + torch.randn(3, 1, 1, 1, generator=g) for _ in range(3)])
    va = torch.rand(3, *shape, generator=g) < 0.8
    vb = torch.rand(3, *shape, generator=g) < valid_b
    outs = {s: sample_correspondences(ca, va, cb, vb, num_samples, 1.0, generator=torch.Generator().manual_seed(1),
                                      search=s) for s in ("native", "brute")}
    c, b = outs["native"], outs["brute"]
    assert all(torch.equal(c[k], b[k]) for k in ("mask", "index_a", "index_b")), (c["mask"].sum(), b["mask"].sum())
    torch.testing.assert_close(c["distance"], b["distance"], rtol=2e-7, atol=0)
    assert c["mask"].shape == (3, num_samples)
    if valid_b == 0.0:
        assert not c["mask"].any()
    elif num_samples == 64:
        assert c["mask"].sum() > (20 if valid_b < 0.5 else 100)


def test_without_the_c_kernel_the_torch_search_gives_the_same_pairs(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(0)
    shape = (6, 8, 8)
    grid = voxel_grid(shape)
    ca = grid.expand(2, -1, -1, -1, -1) + 0.3
    cb = grid.flip(2).expand(2, -1, -1, -1, -1).contiguous()
    va = torch.rand(2, *shape, generator=g) < 0.9
    vb = torch.rand(2, *shape, generator=g) < 0.9
    run = lambda s: sample_correspondences(ca, va, cb, vb, 32, 1.0, generator=torch.Generator().manual_seed(2),
                                           search=s)
    window = run("window")
    native.library.cache_clear()
    try:
        monkeypatch.setenv("NNUNET_SSL_NATIVE", "0")  # switched off: the window, silently
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None
            off = run("native")
        native.library.cache_clear()
        monkeypatch.setenv("NNUNET_SSL_NATIVE", "1")  # a compiler that fails: one warning naming the fix, the window
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("NNUNET_SSL_CACHE", str(tmp_path / "cache"))
        with pytest.warns(UserWarning, match="building the C kernel .* failed.*NNUNET_SSL_NATIVE=0"):
            assert native.library() is None
        broken = run("auto")
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left to load
    finally:
        native.library.cache_clear()
    assert window["mask"].sum() > 40
    for out in (off, broken):
        assert all(torch.equal(out[k], window[k]) for k in window)


@needs_c
def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NNUNET_SSL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.glob("nearest_*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native.library.cache_clear()


@needs_c
def test_c_far_pair_mask_is_the_exact_distance_rule_with_partners_and_count():
    """The dense loss's negatives in C against float64 distances: pairs farther than the radius between ok rows
    (coincident points never, also at radius 0; not-ok rows hold any value), the partner entries set, and the
    returned count the number of far pairs off them; the same mask as the torch path (far_pairs and the two
    diagonals) away from the radius."""
    from nnunet_ssl.core.loss.dense_correspondence import far_pairs
    g = torch.Generator().manual_seed(0)
    n, p = 300, 150
    x = torch.rand(n, 3, generator=g) * 0.8 + 0.1
    x[10] = x[20]  # two slots on one voxel
    ok = torch.rand(n, generator=g) > 0.1
    ok[[10, 20]] = True
    d2 = (x.double()[:, None] - x.double()[None]).square().sum(-1)
    partner = (torch.arange(n) + p) % n
    for shift in (0.0, 100.0):
        garbage = torch.where(ok[:, None], x + shift, torch.tensor(float("nan")))
        for radius in (0.0, 0.001, 0.05, 0.3):
            keep, count = native.far_pairs(garbage, ok, radius, partner=p)
            expected = (d2 > max(radius ** 2, 1e-12)) & ok[:, None] & ok[None, :]
            settled = (d2 - radius ** 2).abs() > 1e-6 * max(radius ** 2, 1e-4)
            off = torch.ones(n, n, dtype=torch.bool)
            off[torch.arange(n), partner] = False
            assert torch.equal(keep.bool()[settled & off], expected[settled & off]), (shift, radius)
            assert (keep[torch.arange(n), partner] == 1).all() and keep[10, 20] == 0 and keep.diagonal().eq(0).all()
            assert count == int(keep[off].sum()) and set(keep.unique().tolist()) <= {0.0, 1.0}
            ref = far_pairs(garbage, ok, radius)
            ref.diagonal(p).fill_(1.0)
            ref.diagonal(-p).fill_(1.0)
            assert torch.equal(keep[settled | ~off], ref[settled | ~off])
            plain, plain_count = native.far_pairs(garbage, ok, radius)
            assert torch.equal(plain.bool(), keep.bool() & off | plain.bool() & ~off)
            assert plain_count == int(plain.sum())


def _slow_match(pa, va, pb, vb, scores, m, k, tol):
    """The matching rule, one voxel at a time: eligible a voxels (valid, inside view b's valid box grown by tol) in
    (score descending, index ascending) order, the first m of them searched (nearest valid b voxel by brute force,
    lowest index among equal distances), the first k within tol kept."""
    out = []
    for i in range(pa.shape[0]):
        b_ok = vb[i].nonzero().flatten().tolist()
        lo = pb[i, b_ok].amin(0) - tol if b_ok else None
        hi = pb[i, b_ok].amax(0) + tol if b_ok else None
        eligible = [j for j in range(pa.shape[1]) if va[i, j] and b_ok
                    and bool(((pa[i, j] >= lo) & (pa[i, j] <= hi)).all())]
        eligible.sort(key=lambda j: (-float(scores[i, j]), j))
        picked = []
        for j in eligible[:m]:
            sq = (pb[i, b_ok] - pa[i, j]).square()
            d2 = (sq[:, 0] + sq[:, 1]) + sq[:, 2]
            best = int(d2.argmin())  # first minimum: the lowest index
            if float(d2[best].sqrt()) <= tol:
                picked.append((j, b_ok[best]))
            if len(picked) == k:
                break
        out.append(picked)
    return out


@needs_c
@pytest.mark.parametrize("scores_kind", ["uniform", "ties", "constant", "wide"])
def test_c_matching_follows_the_rule_for_any_scores(scores_kind):
    """Against a one-voxel-at-a-time reference of the rule, for scores the C kernel's buckets must not assume:
    many ties (broken by the lower index), all equal, and far outside [0, 1)."""
    g = torch.Generator().manual_seed(7)
    bsz, n = 3, 150
    pa = torch.randint(0, 6, (bsz, n, 3), generator=g).float() + 0.25
    pb = torch.randint(0, 6, (bsz, n, 3), generator=g).float()
    va, vb = torch.rand(bsz, n, generator=g) < 0.8, torch.rand(bsz, n, generator=g) < 0.6
    vb[2] = False
    scores = {"uniform": torch.rand(bsz, n, generator=g),
              "ties": torch.randint(0, 4, (bsz, n), generator=g).float() / 4,
              "constant": torch.full((bsz, n), 0.5),
              "wide": torch.randn(bsz, n, generator=g) * 1e6}[scores_kind]
    m, k, tol = 40, 12, 0.5
    out = native.match_voxels(pa, va, pb, vb, scores, m, k, tol)
    ref = _slow_match(pa, va, pb, vb, scores, m, k, tol)
    for i in range(bsz):
        got = [(int(a), int(b)) for a, b, ok in zip(out["index_a"][i], out["index_b"][i], out["mask"][i]) if ok]
        assert got == ref[i], (i, got, ref[i])
        assert not out["mask"][i, len(ref[i]):].any() and (out["index_a"][i, len(ref[i]):] == 0).all()
    assert sum(map(len, ref[:2])) >= 12  # matches were made


@needs_c
def test_c_crop_masks_equal_the_torch_masks(monkeypatch):
    """selection.contrastive_masks through the C kernel and through torch (cdist, comparisons): the same masks, also
    for 2-D positions, group-mates farther than r_neg, coincident crops, far-off coordinates and NaN positions."""
    from nnunet_ssl.core.selection import contrastive_masks
    g = torch.Generator().manual_seed(3)
    cases = []
    for n, d in ((8, 3), (40, 3), (30, 2)):
        c = torch.rand(n, d, generator=g)
        c[1] = c[0]
        cases.append((c, torch.randint(0, n // 2, (n,), generator=g)))
    far = torch.rand(20, 3, generator=g) * 0.3 + 1e4
    far[3] = float("nan")
    cases.append((far, torch.arange(20) % 10))
    for coords, groups in cases:
        for r_pos, r_neg in ((0.1, 0.3), (0.0, 0.0), (0.2, 0.2)):
            fast = contrastive_masks(coords, groups, r_pos, r_neg)
            with monkeypatch.context() as mp:
                mp.setattr(native, "library", lambda: None)
                slow = contrastive_masks(coords, groups, r_pos, r_neg)
            assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]), (coords.shape, r_pos, r_neg)
            assert fast[0].any()  # group-mates at least


def test_dense_loss_selects_the_same_rows_with_and_without_the_c_kernels(monkeypatch):
    """Spade's dense loss at the CPU budget's size (4 crops x 2 views of 24 x 32 x 24 voxels, stride 2, 64 slots;
    view b rotated in-plane, mirrored and partly outside the volume) with the whole selection in C and with the
    torch path a GPU runs, from the same generator: the same loss, counts and gradients (float32 rounding)."""
    from nnunet_ssl.core.loss import dense_correspondence_loss
    g = torch.Generator().manual_seed(5)
    crops, shape = 4, (24, 32, 24)
    grid = voxel_grid(shape)
    theta = 0.3
    rot = torch.tensor([[1.0, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]])
    view_a = grid[None] + torch.rand(crops, 3, 1, 1, 1, generator=g) * 4
    view_b = torch.einsum("ij,bj...->bi...", rot, view_a.flip(2)) + 0.5
    coords = torch.cat((view_a, view_b))
    valid = torch.ones(2 * crops, *shape, dtype=torch.bool)
    valid[crops:, :, :6] = False
    dense = torch.randn(2 * crops, 16, 12, 16, 12, generator=g)
    scale, offset = torch.full((2 * crops, 3), 0.02), torch.rand(crops, 3, generator=g).repeat(2, 1)
    sample = torch.arange(crops).repeat(2)
    results = []
    for c_kernels in (True, False):
        d = dense.clone().requires_grad_()
        with monkeypatch.context() as mp:
            if not c_kernels:
                mp.setattr(native, "library", lambda: None)
            loss, stats = dense_correspondence_loss(d, coords, valid, scale, offset, sample, (2, 2, 2), 64, 1.0, 0.1,
                                                    0.1, generator=torch.Generator().manual_seed(9))
        loss.backward()
        results.append((loss.detach(), {k: float(v) for k, v in stats.items()}, d.grad))
    (l1, s1, g1), (l2, s2, g2) = results
    if native.library() is None:
        pytest.skip("no C compiler: only the torch path ran")
    assert s1 == s2 and 300 < s1["num_anchors"] <= 512 and s1["mean_neg"] > 100
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


@needs_c
def test_c_kernels_stay_in_bounds_with_unusual_scores_and_tolerances():
    """Non-finite scores (the buckets must not index outside their arrays: every output is a real match of distinct
    voxels) and a tolerance near the float range (one cell: the nearest point of all, as brute force finds it)."""
    g = torch.Generator().manual_seed(1)
    pa, pb = torch.rand(2, 200, 3, generator=g) * 5, torch.rand(2, 200, 3, generator=g) * 5
    va, vb = torch.ones(2, 200, dtype=torch.bool), torch.rand(2, 200, generator=g) < 0.7
    for fill in (float("nan"), float("inf"), -float("inf")):
        scores = torch.rand(2, 200, generator=g)
        scores[:, ::3] = fill
        out = native.match_voxels(pa, va, pb, vb, scores, 80, 20, 0.6)
        for i in range(2):
            ia, ib = out["index_a"][i][out["mask"][i]], out["index_b"][i][out["mask"][i]]
            assert len(ia) == 20 and len(set(ia.tolist())) == 20 and vb[i, ib].all()
            assert ((pa[i, ia] - pb[i, ib]).norm(dim=-1) <= 0.6 + 1e-6).all()
    idx, d2 = native.nearest_within(pa, pb, vb, 1e307)
    ref_idx, ref_d2 = _brute(pa, pb, vb)
    assert torch.equal(idx, ref_idx) and torch.equal(d2, ref_d2)
