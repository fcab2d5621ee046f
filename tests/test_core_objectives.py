"""Spade's objectives against slow references on hand-built geometry."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.core.loss import dense_correspondence_loss, spade_global_loss
from nnunet_ssl.core.selection import view_pairs


def _slow_info_nce(z, pos, neg, tau):
    return _slow_info_nce_rect(z, z, pos, neg, tau)


def test_global_selection_on_a_line():
    # crops 0,1 = two views of crop A at x=0 / 0.05; crop B views at 0.12 / 0.5; crop C views at 0.9 / 0.95
    centers = torch.tensor([[0, 0, 0], [0.05, 0, 0], [0.12, 0, 0], [0.5, 0, 0], [0.9, 0, 0], [0.95, 0, 0.]])
    sample = torch.tensor([0, 0, 1, 1, 2, 2])
    z = torch.randn(6, 8)
    loss, stats = spade_global_loss(z, centers, sample, r_pos=0.1, r_neg=0.3, temperature=0.2)
    d = torch.cdist(centers, centers)
    pos = [[i != j and (sample[i] == sample[j] or d[i, j] < 0.1) for j in range(6)] for i in range(6)]
    neg = [[i != j and not pos[i][j] and d[i, j] > 0.3 for j in range(6)] for i in range(6)]
    # anchor 0: positive 1 (same crop); 2 at 0.12 is in the band -> excluded; 3,4,5 negatives
    assert pos[0] == [False, True, False, False, False, False]
    assert neg[0] == [False, False, False, True, True, True]
    # anchor 2 (crop B): positive 3 (other view, although 0.38 away) and 1 (0.07 < r_pos)
    assert pos[2] == [False, True, False, True, False, False]
    assert loss.item() == pytest.approx(_slow_info_nce(z, pos, neg, 0.2), rel=1e-5)
    assert stats["mean_pos"].item() == pytest.approx(sum(map(sum, pos)) / 6)


def test_global_loss_with_a_queue_matches_reference():
    # queued keys farther than r_neg from the anchor are extra negatives, nearer ones and empty slots are left out,
    # none is a positive; the batch rows keep their own selection
    torch.manual_seed(5)
    centers = torch.rand(6, 3)
    sample = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.randn(6, 8, requires_grad=True)
    qk, qc = torch.randn(5, 8), torch.rand(5, 3)
    filled = torch.tensor([True, True, True, True, False])
    r_pos, r_neg, tau = 0.2, 0.4, 0.3
    loss, stats = spade_global_loss(z, centers, sample, r_pos, r_neg, tau, qk, qc, filled)
    allz = torch.cat((z.detach(), qk))
    allc = torch.cat((centers, qc))
    n, m = 6, 11
    d = torch.cdist(allc, allc)
    pos = [[j < n and i != j and (sample[i] == sample[j] or d[i, j] < r_pos) for j in range(m)] for i in range(n)]
    neg = [[i != j and not pos[i][j] and d[i, j] > r_neg and (j < n or bool(filled[j - n])) for j in range(m)]
           for i in range(n)]
    assert any(neg[i][j] for i in range(n) for j in range(n, m))  # the queue adds negatives
    assert any(not neg[i][j] for i in range(n) for j in range(n, m - 1))  # ... and leaves near ones out
    ref = _slow_info_nce_rect(z.detach(), allz, pos, neg, tau)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["mean_neg"].item() == pytest.approx(sum(map(sum, neg)) / n)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # an empty queue changes nothing
    empty, _ = spade_global_loss(z, centers, sample, r_pos, r_neg, tau, qk, qc, torch.zeros(5, dtype=torch.bool))
    plain, _ = spade_global_loss(z, centers, sample, r_pos, r_neg, tau)
    assert empty.item() == pytest.approx(plain.item(), rel=1e-6)


def _slow_info_nce_rect(anchors, candidates, pos, neg, tau):
    a, c = F.normalize(anchors.double(), dim=1), F.normalize(candidates.double(), dim=1)
    losses = []
    for i in range(len(a)):
        p = [j for j in range(len(c)) if pos[i][j]]
        if not p:
            continue
        den = [j for j in range(len(c)) if pos[i][j] or neg[i][j]]
        lse = math.log(sum(math.exp(float(a[i] @ c[j]) / tau) for j in den))
        losses.append(-sum(float(a[i] @ c[j]) / tau - lse for j in p) / len(p))
    return sum(losses) / len(losses)


def test_view_pairs_any_order_and_error():
    for _ in range(2):  # computed, then the kept pairs of the same layout
        a, b = view_pairs(torch.tensor([2, 0, 1, 0, 2, 1]))
        assert torch.equal(a, torch.tensor([1, 2, 0])) and torch.equal(b, torch.tensor([3, 5, 4]))
        with pytest.raises(ValueError, match="exactly twice"):
            view_pairs(torch.tensor([0, 0, 1, 2]))
    with torch.inference_mode():  # kept in inference mode, still usable by a training step's autograd afterwards
        view_pairs(torch.tensor([5, 6, 5, 6]))
    a, _ = view_pairs(torch.tensor([5, 6, 5, 6]))
    w = torch.ones(4, 2, requires_grad=True)
    w.index_select(0, a).sum().backward()
    assert w.grad.sum() == 4


def test_dense_loss_matches_reference_with_flipped_views():
    torch.manual_seed(0)
    b, c, s, stride = 2, 5, 4, 1  # stride 1: mirrored views have exact partners (stride 2: test_core_correspondence)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32)] * 3, indexing="ij"))
    coords_a = grid.expand(b, -1, -1, -1, -1) + torch.tensor([0.0, 3.0])[:, None, None, None, None]  # per-case shift
    coords_b = coords_a.flip(2)  # view b = view a mirrored along the first axis
    coords = torch.cat([coords_a, coords_b])
    valid = torch.ones(2 * b, s, s, s, dtype=torch.bool)
    scale = torch.full((2 * b, 3), 0.05)
    offset = torch.zeros(2 * b, 3)
    fs = s // stride
    dense = F.normalize(torch.randn(2 * b, c, fs, fs, fs), dim=1)
    sample = torch.arange(b).repeat(2)
    r_neg, tau = 0.12, 0.3
    loss, stats = dense_correspondence_loss(dense, coords, valid, scale, offset, sample, (stride,) * 3,
                                            num_samples=fs ** 3, tolerance=0.5, r_neg=r_neg, temperature=tau)
    assert stats["num_pairs"].item() == b * fs ** 3  # every voxel finds its mirrored partner
    # reference: all feature voxels of view a paired with the mirrored voxel of view b
    z, x, g = [], [], []
    centre = lambda i: i * stride  # noqa: E731 receptive-field centre in input voxels
    for case in range(b):
        for i in range(fs):
            for j in range(fs):
                for k in range(fs):
                    pa = torch.tensor([centre(i), centre(j), centre(k)]) + torch.tensor([0.0, 3.0])[case]
                    z.append(dense[case, :, i, j, k]); x.append(pa * 0.05); g.append(len(g))
    for case in range(b):
        for i in range(fs):
            for j in range(fs):
                for k in range(fs):
                    z.append(dense[b + case, :, fs - 1 - i, j, k]); x.append(x[len(z) - 1 - b * fs ** 3])
                    g.append(g[len(z) - 1 - b * fs ** 3])
    n = len(z)
    z = torch.stack(z)
    pos = [[i != j and g[i] == g[j] for j in range(n)] for i in range(n)]
    neg = [[i != j and not pos[i][j] and float(torch.dist(x[i], x[j])) > r_neg for j in range(n)] for i in range(n)]
    assert loss.item() == pytest.approx(_slow_info_nce(z, pos, neg, tau), rel=1e-5)


def test_dense_loss_degenerate_batches_are_finite():
    torch.manual_seed(1)
    coords = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"))[None].repeat(2, 1, 1, 1, 1)
    valid = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    dense = F.normalize(torch.randn(2, 3, 4, 4, 4), dim=1).requires_grad_()
    args = (torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 0]), (1, 1, 1))
    # single case, every other voxel within r_neg: no negatives at all
    loss, _ = dense_correspondence_loss(dense, coords, valid, *args, num_samples=8, tolerance=0.5, r_neg=100.0,
                                        temperature=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dense.grad).all()
    # no overlap at all between the views: zero loss, still differentiable
    valid_b = valid.clone(); valid_b[1] = False
    loss, stats = dense_correspondence_loss(dense, coords, valid_b, *args, num_samples=8, tolerance=0.5,
                                            r_neg=1.0, temperature=0.1)
    assert loss.item() == 0 and stats["num_pairs"].item() == 0
    loss.backward()


def _partial_overlap_batch(b=2, s=6, shift=2.0, c=4):
    torch.manual_seed(3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32)] * 3, indexing="ij"))
    coords_a = grid.expand(b, -1, -1, -1, -1).clone()
    coords_b = coords_a + torch.tensor([shift, 0.0, 0.0])[None, :, None, None, None]  # view b: shifted window
    coords = torch.cat([coords_a, coords_b])
    valid = torch.ones(2 * b, s, s, s, dtype=torch.bool)
    dense = F.normalize(torch.randn(2 * b, c, s, s, s), dim=1)
    return coords, valid, dense, torch.arange(b).repeat(2)


def test_dense_loss_on_an_unnormalised_head_equals_the_normalised_one():
    """Spade's dense head leaves normalisation to the loss (DenseProjectionHead(normalize=False)): the loss and the
    gradients of the head's input and weights equal those through the normalising head (rel 1e-5 / 1e-4)."""
    from nnunet_ssl.core.heads import DenseProjectionHead
    b, s = 2, 6
    coords, valid, _, sample = _partial_overlap_batch(b, s)
    scale, offset = torch.full((2 * b, 3), 0.1), torch.zeros(2 * b, 3)
    features = torch.randn(2 * b, 5, s, s, s)
    results = []
    for normalize in (True, False):
        torch.manual_seed(1)
        head = DenseProjectionHead(5, out_dim=8, hidden_dim=6, normalize=normalize)
        x = features.clone().requires_grad_()
        out = head(x)
        assert torch.allclose(out.norm(dim=1), torch.ones(())) == normalize
        loss, _ = dense_correspondence_loss(out, coords, valid, scale, offset, sample, (1, 1, 1), 40, 0.5, 0.25,
                                            0.2, generator=torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), x.grad, [p.grad for p in head.parameters()]))
    (l1, gx1, gp1), (l2, gx2, gp2) = results
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5) and l1.item() > 0
    torch.testing.assert_close(gx2, gx1, rtol=1e-4, atol=1e-6)
    for a, c in zip(gp2, gp1):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_dense_loss_with_padding_slots_matches_compacted_reference():
    # a shifted view: only (s - shift)/s of the voxels of view a have a partner, so with num_samples = all voxels
    # most slots are padding; they must not enter any pair, the count statistics or the mean
    from nnunet_ssl.core.correspondence import sample_correspondences
    b, s, k = 2, 6, 6 ** 3
    coords, valid, dense, sample = _partial_overlap_batch(b, s)
    scale, offset = torch.full((2 * b, 3), 0.1), torch.zeros(2 * b, 3)
    r_neg, tau = 0.25, 0.2
    loss, stats = dense_correspondence_loss(dense, coords, valid, scale, offset, sample, (1, 1, 1), k, 0.5, r_neg,
                                            tau, generator=torch.Generator().manual_seed(0))
    corr = sample_correspondences(coords[:b], valid[:b], coords[b:], valid[b:], k, 0.5,
                                  generator=torch.Generator().manual_seed(0))
    m = corr["mask"]
    assert 0 < m.sum() < m.numel()  # padding present
    z, x = [], []
    for view, key in ((0, "index_a"), (1, "index_b")):
        for case in range(b):
            for slot in range(k):
                if m[case, slot]:
                    idx = corr[key][case, slot]
                    z.append(dense[view * b + case].flatten(1)[:, idx])
                    x.append(coords[view * b + case].flatten(1)[:, idx] * 0.1)
    n, half = len(z), len(z) // 2
    g = list(range(half)) * 2
    pos = [[i != j and g[i] == g[j] for j in range(n)] for i in range(n)]
    neg = [[i != j and not pos[i][j] and float(torch.dist(x[i], x[j])) > r_neg for j in range(n)] for i in range(n)]
    assert loss.item() == pytest.approx(_slow_info_nce(torch.stack(z), pos, neg, tau), rel=1e-5)
    assert stats["num_pairs"].item() == half
    assert stats["mean_pos"].item() == pytest.approx(1.0)
    assert stats["mean_neg"].item() == pytest.approx(sum(map(sum, neg)) / n, rel=1e-6)


def _generic_dense_loss(dense, coords, valid, canonical_scale, canonical_offset, sample_index, stride, num_samples,
                        tolerance, r_neg, temperature, generator):
    """The local branch through the generic selection and loss (contrastive_masks + info_nce over gathered views):
    the path the fused dense_correspondence_loss replaced, kept as its reference."""
    from nnunet_ssl.core.correspondence import gather_at, sample_coords, sample_correspondences
    from nnunet_ssl.core.frames import apply_axis_affine
    from nnunet_ssl.core.loss import info_nce
    from nnunet_ssl.core.selection import contrastive_masks
    shape = tuple(n // st for n, st in zip(coords.shape[2:], stride))
    c_feat, v_feat = sample_coords(coords, valid, stride, (0.0,) * 3, shape)
    a, b = view_pairs(sample_index)
    corr = sample_correspondences(c_feat[a], v_feat[a], c_feat[b], v_feat[b], num_samples,
                                  tolerance * max(stride), generator=generator)
    canon = apply_axis_affine(c_feat, canonical_scale, canonical_offset)
    fa, fb = gather_at(dense[a], corr["index_a"]), gather_at(dense[b], corr["index_b"])
    xa, xb = gather_at(canon[a], corr["index_a"]), gather_at(canon[b], corr["index_b"])
    m = corr["mask"].reshape(-1)
    pair_id = torch.arange(m.numel())
    z = torch.cat((fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])))
    x = torch.cat((xa.reshape(-1, 3), xb.reshape(-1, 3)))
    pos, neg = contrastive_masks(x, torch.cat((pair_id, pair_id)), 0.0, r_neg, valid=torch.cat((m, m)))
    loss, stats = info_nce(z, None, pos, neg, temperature)
    return loss, pos, neg, m


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("seed,r_neg", [(0, 0.1), (1, 0.05), (2, 0.0), (3, 0.3)])
def test_fused_dense_loss_equals_the_generic_path(seed, r_neg, c_kernels, monkeypatch):
    # CPU-budget-like geometry: 4 crops x 2 views, stride 2, rotated + mirrored + shifted views with partial
    # overlap and an invalid border (padding slots), canonical scales per case; loss, gradient and counts must
    # equal the generic path's (float32; tolerances: loss rel 1e-5, gradient abs 1e-6 at |g| ~1e-3), with the C
    # matching and mask (CPU) and with the torch path a GPU runs
    from nnunet_ssl.core import native
    if not c_kernels:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler: the C kernels are not built")
    g = torch.Generator().manual_seed(seed)
    b, s, c, stride = 4, (12, 16, 12), 16, (2, 2, 2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in s], indexing="ij"))
    views = []
    for view in range(2):
        for case in range(b):
            theta = float(torch.rand(1, generator=g)) * 0.6 - 0.3
            rot = torch.tensor([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0],
                                [0, 0, 1.0]])
            coord = torch.einsum("ij,j...->i...", rot, grid) + torch.rand(3, 1, 1, 1, generator=g) * 3
            views.append(coord.flip(1) if view else coord)
    coords = torch.stack(views) + 10.0 * torch.arange(b).repeat(2)[:, None, None, None, None]
    valid = torch.ones(2 * b, *s, dtype=torch.bool)
    valid[:, :2] = False
    valid[b + 1, :, -5:] = False
    valid[b + 2, :, :-2] = False  # a sliver of overlap: fewer matches than k, padding slots
    scale = (0.02 + 0.02 * torch.rand(b, 3, generator=g)).repeat(2, 1)
    offset = (0.1 * torch.rand(b, 3, generator=g)).repeat(2, 1)
    sample = torch.arange(b).repeat(2)
    dense = F.normalize(torch.randn(2 * b, c, *(n // 2 for n in s), generator=g), dim=1)
    d_fused, d_ref = dense.clone().requires_grad_(), dense.clone().requires_grad_()
    k, tol, tau = 64, 1.0, 0.1
    loss, stats = dense_correspondence_loss(d_fused, coords, valid, scale, offset, sample, stride, k, tol, r_neg, tau,
                                            generator=torch.Generator().manual_seed(seed))
    ref, pos, neg, m = _generic_dense_loss(d_ref, coords, valid, scale, offset, sample, stride, k, tol, r_neg, tau,
                                           generator=torch.Generator().manual_seed(seed))
    assert 0 < m.sum() < m.numel()  # both matched and padding slots
    assert neg.sum() > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    assert d_ref.grad.abs().max() > 1e-4
    torch.testing.assert_close(d_fused.grad, d_ref.grad, rtol=1e-4, atol=1e-6)
    n_ok = 2 * m.sum().item()
    assert stats["num_pairs"].item() == m.sum().item()
    assert stats["mean_pos"].item() == pytest.approx(pos.sum().item() / n_ok)
    assert stats["mean_neg"].item() == pytest.approx(neg.sum().item() / n_ok)


def test_dense_loss_rejects_bad_hyperparameters():
    coords, valid, dense, sample = _partial_overlap_batch()
    args = (torch.full((len(sample), 3), 0.1), torch.zeros(len(sample), 3), sample, (1, 1, 1), 8, 0.5)
    with pytest.raises(ValueError, match="r_neg must be >= 0"):
        dense_correspondence_loss(dense, coords, valid, *args, -0.1, 0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dense_correspondence_loss(dense, coords, valid, *args, 0.1, 0.0)


def test_spade_objectives_never_wait_for_the_device(monkeypatch):
    # a value read on the host (bool()/.item(), boolean indexing -> nonzero, torch.equal) makes a GPU step wait for
    # every queued kernel; the objectives must issue none, apart from view_pairs' layout check of host tensors
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from nnunet_ssl.core import native, selection
    from nnunet_ssl.core.loss import affinity_weighted_loss

    monkeypatch.setattr(native, "library", lambda: None)  # the torch ops a device runs (the C kernels: CPU only)
    selection._host_view_pairs.cache_clear()  # the layout check runs (a host batch's pairs are kept per layout)

    syncing = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
               "aten.item"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                name = "aten.nonzero"  # a boolean index is a nonzero (data-dependent shape) under the hood
            if name in syncing and any(f.name == "far_pairs" for f in traceback.extract_stack()):
                name = "far_pairs on CPU"  # its precision is chosen on the host only on CPU (CUDA: float64)
            self.ops.append(name)
            return func(*args, **(kwargs or {}))

    coords, valid, dense, sample = _partial_overlap_batch()
    dense.requires_grad_()
    emb = torch.randn(len(sample), 8, requires_grad=True)
    with Record() as rec:
        lg, _ = spade_global_loss(emb, torch.rand(len(sample), 3), sample, 0.1, 0.3, 0.1)
        ll, _ = dense_correspondence_loss(dense, coords, valid, torch.full((len(sample), 3), 0.1),
                                          torch.zeros(len(sample), 3), sample, (1, 1, 1), 32, 0.5, 0.25, 0.2,
                                          search="brute")  # 'auto' off the CPU (the window sizes its box on the host)
        n = len(sample)  # SpadeSoft's global branch: affinity-weighted contrast
        ls, _ = affinity_weighted_loss(emb, torch.rand(n, n), torch.rand(n, n) > 0.5, 0.5)
        (lg + ll + ls).backward()
    found = [op for op in rec.ops if op in syncing]
    assert found == ["aten.equal"], found  # the host-side two-view check, nothing else
    assert rec.ops.count("far_pairs on CPU") == 1
    assert len(rec.ops) > 50  # the recorder saw the computation


@pytest.mark.parametrize("temperature", [0.1, 0.02])  # 0.02: bound 50 > 40, the rows' maxima are the shift
def test_masked_logsumexp_equals_torch_logsumexp_and_its_gradients(temperature):
    """The dense loss's masked log-sum-exp (one autograd Function: a matmul, exp in place, a 0/1 mask; backward two
    matmuls) against torch.logsumexp over the masked logits. Tolerances: value rel 1e-6, gradients rel 1e-5 /
    abs 1e-6 at |g| up to ~0.1 (float32); the Function's gradient is also checked by finite differences in float64."""
    from nnunet_ssl.core.loss.masked_logsumexp import masked_logsumexp
    g = torch.Generator().manual_seed(0)
    n = 96
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    keep = (torch.rand(n, n, generator=g) > 0.6).float()
    keep[torch.arange(n), (torch.arange(n) + n // 2) % n] = 1.0  # every row keeps an entry (its partner)
    keep[3] = 0.0
    keep[3, 3 + n // 2] = 1.0  # a row keeping one entry
    results = []
    for fused in (True, False):
        zz = z.clone().requires_grad_()
        q = zz * (1.0 / temperature)
        if fused:
            lse = masked_logsumexp(q, zz, keep, 1.0 / temperature)
        else:
            lse = torch.logsumexp((q @ zz.t()).masked_fill(keep == 0, float("-inf")), dim=1)
        weights = torch.linspace(0.5, 1.5, n)
        (lse * weights).sum().backward()
        results.append((lse.detach(), zz.grad))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert g2.abs().max() > 1e-2
    # float64 finite differences through the Function (bound 1 / temperature holds for unit rows)
    from nnunet_ssl.core.loss.masked_logsumexp import _MaskedLogSumExp
    q64 = F.normalize(torch.randn(12, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    k64 = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    keep64 = (torch.rand(12, 10, generator=g) > 0.5).double()
    keep64[:, 0] = 1.0
    assert torch.autograd.gradcheck(lambda a, b: _MaskedLogSumExp.apply(a, b, keep64, 1.0), (q64, k64))


def test_masked_logsumexp_backward_twice_through_a_retained_graph():
    # the Function keeps its exponentials unmodified: a second backward through a retained graph is the same
    from nnunet_ssl.core.loss.masked_logsumexp import masked_logsumexp
    z = F.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    keep = torch.ones(20, 20)
    out = masked_logsumexp(z * 10.0, z, keep, 10.0).sum()
    (first,) = torch.autograd.grad(out, z, retain_graph=True)
    (second,) = torch.autograd.grad(out, z)
    assert torch.equal(first, second)


def test_far_pairs_is_the_exact_distance_rule():
    """far_pairs (one product and a sign) marks exactly the pairs of real slots farther than the radius, against
    float64 differences: float64 exactly (to 1e-12 in d^2 - r^2), the float32 product (CPU, radius >= 1 % of the
    points' extent) to 1e-6 of the squared extent; coincident points are never far (also at radius 0), padding
    slots never pair, rows that are not ok may hold any value, coordinates far from the origin change nothing."""
    from nnunet_ssl.core.loss.dense_correspondence import FLOAT32_MIN_RADIUS2, far_pairs
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, generator=g) * 0.8 + 0.1
    x[10] = x[20]  # two slots on one voxel
    x[30] = x[31] + torch.tensor([0.05, 0.0, 0.0])  # exactly a radius apart, in float32 terms
    ok = torch.rand(300, generator=g) > 0.1
    ok[[10, 20]] = True
    d2 = (x.double()[:, None] - x.double()[None]).square().sum(-1)
    extent2 = float((x[ok].double() - x[ok].double().mean(0)).square().sum(1).max())  # R^2 of the rule
    paths = set()
    for shift in (0.0, 100.0):
        garbage = torch.where(ok[:, None], x + shift, torch.tensor(float("nan")))  # not-ok rows: any value
        for radius in (0.0, 0.001, 0.05, 0.1, 0.3):
            far = far_pairs(garbage, ok, radius)
            assert far.dtype == torch.float32 and set(far.unique().tolist()) <= {0.0, 1.0}
            expected = (d2 > radius ** 2) & ok[:, None] & ok[None, :]
            float32 = radius ** 2 >= FLOAT32_MIN_RADIUS2 * extent2
            paths.add(float32)
            # pairs this close to the radius may go either way (rounding of the squared expansion)
            settled = (d2 - radius ** 2).abs() > (1e-6 * extent2 if float32 else 1e-12)
            assert torch.equal(far.bool()[settled], expected[settled]), (shift, radius)
            assert far[10, 20] == 0 and far[20, 10] == 0 and far.diagonal().eq(0).all()
            assert far[~ok].eq(0).all() and far[:, ~ok].eq(0).all()
    assert paths == {True, False}  # both precisions were checked
