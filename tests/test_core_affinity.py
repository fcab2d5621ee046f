"""Affinities from geometry and the affinity-weighted (PDCR-style) loss against slow references."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.core.affinity import box_overlap_affinity
from nnunet_ssl.core.loss import affinity_weighted_loss


def _box(lo, hi):
    return torch.tensor([[float(a), float(b)] for a, b in zip(lo, hi)])


def test_box_overlap_hand_built():
    boxes = torch.stack([
        _box([0, 0, 0], [4, 4, 4]),  # 0
        _box([0, 0, 0], [4, 4, 4]),  # 1 identical to 0
        _box([1, 1, 1], [3, 3, 3]),  # 2 nested in 0
        _box([2, 0, 0], [6, 4, 4]),  # 3 half of 0
        _box([10, 10, 10], [12, 12, 12]),  # 4 disjoint from all
        _box([4, 0, 0], [8, 4, 4]),  # 5 touches 0 at x = 4 (half-open: no overlap)
    ])
    a = box_overlap_affinity(boxes)
    assert a.shape == (6, 6)
    torch.testing.assert_close(a, a.t())
    torch.testing.assert_close(a.diagonal(), torch.ones(6))
    assert a[0, 1] == 1.0
    assert a[0, 2] == 1.0  # nested: the smaller box is fully shared
    assert a[0, 3] == 0.5
    assert a[2, 3] == pytest.approx(1 * 2 * 2 / 8)  # x in [2,3): 1*2*2 of the nested box's 8
    assert (a[4, :4] == 0).all() and a[4, 5] == 0
    assert a[0, 5] == 0.0
    assert a[3, 5] == 0.5  # [4,6) of both 4-wide boxes


def test_box_overlap_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    lo = torch.randint(0, 6, (7, 3), generator=g).float()
    boxes = torch.stack((lo, lo + torch.randint(1, 5, (7, 3), generator=g).float()), dim=2)
    a = box_overlap_affinity(boxes)
    b = boxes.tolist()
    for i in range(7):
        for j in range(7):
            inter = vi = vj = 1.0
            for ax in range(3):
                inter *= max(0.0, min(b[i][ax][1], b[j][ax][1]) - max(b[i][ax][0], b[j][ax][0]))
                vi *= b[i][ax][1] - b[i][ax][0]
                vj *= b[j][ax][1] - b[j][ax][0]
            assert a[i, j].item() == pytest.approx(inter / min(vi, vj), abs=1e-6)


def test_box_overlap_zero_volume_is_finite():
    boxes = torch.stack([_box([0, 0, 0], [4, 4, 4]), _box([1, 1, 1], [1, 3, 3]), _box([2, 2, 2], [1, 3, 3])])
    a = box_overlap_affinity(boxes)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.diagonal(), torch.ones(3))
    assert a[0, 1] == 0 and a[1, 0] == 0 and a[0, 2] == 0 and a[1, 2] == 0
    assert box_overlap_affinity(boxes.long()).dtype == torch.float32


def _slow_awl(z, aff, valid, t, cand=None):
    """Float64 loops over anchors and pairs, torch scalars for autograd."""
    a = F.normalize(z.double(), dim=-1)
    c = a if cand is None else F.normalize(cand.double(), dim=-1)
    terms, aff_sum = [], 0.0
    for i in range(a.shape[0]):
        ks = [k for k in range(c.shape[0]) if valid[i, k] and (cand is not None or k != i)]
        if not ks:
            continue
        s = {k: (a[i] * c[k]).sum() / t for k in ks}
        lse = torch.logsumexp(torch.stack([s[k] * (1 - float(aff[i, k])) for k in ks]), 0)
        for j in ks:
            terms.append(-(s[j] * float(aff[i, j]) - lse))
            aff_sum += float(aff[i, j])
    if not terms:
        return None, 0.0, 0
    return torch.stack(terms).mean(), aff_sum / len(terms), len(terms)


def _case(seed, n, m=None, d=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * 1.5
    cand = None if m is None else torch.randn(m, d, generator=g)
    aff = torch.rand(n, m or n, generator=g)
    valid = torch.rand(n, m or n, generator=g) < 0.6
    valid[0] = False  # an anchor without any valid pair
    if m is None:
        valid[1] = False
        valid[1, 1] = True  # only its self pair: still no valid pair
    return z, cand, aff, valid


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cross", [False, True])
def test_affinity_loss_matches_reference(seed, cross):
    z, cand, aff, valid = _case(seed, 7, 9 if cross else None)
    z.requires_grad_(True)
    if cand is not None:
        cand.requires_grad_(True)
    for t in (0.5, 0.1):
        loss, stats = affinity_weighted_loss(z, aff, valid, t, candidates=cand)
        z64 = z.detach().double().requires_grad_(True)
        c64 = None if cand is None else cand.detach().double().requires_grad_(True)
        ref, mean_aff, n_pairs = _slow_awl(z64, aff, valid, t, c64)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert stats["num_pairs"].item() == n_pairs
        assert stats["mean_affinity"].item() == pytest.approx(mean_aff, rel=1e-5)
        z.grad = None
        if cand is not None:
            cand.grad = None
        loss.backward()
        ref.backward()
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)
        if cand is not None:
            torch.testing.assert_close(cand.grad.double(), c64.grad, rtol=1e-4, atol=1e-5)


def test_affinity_loss_hand_value():
    # Orthogonal anchors, t = 1, a = 0.5: l = -(0 * 0.5 - log e^0) = 0 for both pairs.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aff = torch.full((2, 2), 0.5)
    loss, _ = affinity_weighted_loss(z, aff, torch.ones(2, 2, dtype=torch.bool), 1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # Identical anchors with a = 1: s = 1, the denominator term s * 0 = 0, so l = -(1 - log e^0) = -1.
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    loss, _ = affinity_weighted_loss(z, torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), 1.0)
    assert loss.item() == pytest.approx(-1.0, rel=1e-6)


def _finite_backward(loss, *ts):
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
    loss.backward()
    for t in ts:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_affinity_loss_degenerate():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 4, generator=g).requires_grad_(True)
    cand = torch.randn(3, 4, generator=g).requires_grad_(True)
    # No valid pair at all (also: only self pairs) -> connected zero.
    for valid, c in ((torch.zeros(5, 5, dtype=torch.bool), None), (torch.eye(5, dtype=torch.bool), None),
                     (torch.zeros(5, 3, dtype=torch.bool), cand)):
        loss, stats = affinity_weighted_loss(z, torch.rand(*valid.shape), valid, candidates=c)
        assert loss.item() == 0.0 and stats["num_pairs"].item() == 0 and stats["mean_affinity"].item() == 0
        z.grad = None
        _finite_backward(loss, z, *(() if c is None else (c,)))
    # All affinities 0 or all 1, at a low temperature with identical vectors (large logits).
    v = torch.randn(1, 4, generator=g).repeat(4, 1).requires_grad_(True)
    valid = torch.ones(4, 4, dtype=torch.bool)
    for fill in (0.0, 1.0):
        v.grad = None
        loss, _ = affinity_weighted_loss(v, torch.full((4, 4), fill), valid, temperature=0.01)
        # a = 0: l = lse(s over 3 candidates) = 100 + log 3; a = 1: l = -100 + log 3.
        expected = (100.0 if fill == 0 else -100.0) + math.log(3)
        assert loss.item() == pytest.approx(expected, rel=1e-4)
        _finite_backward(loss, v)
    # Single anchor.
    one = torch.randn(1, 4, requires_grad=True)
    loss, _ = affinity_weighted_loss(one, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    _finite_backward(loss, one)


def test_affinity_loss_autocast_bfloat16():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=g)
    lin = torch.nn.Linear(8, 16)
    p = torch.rand(10, 3, generator=g)
    aff = (1 - torch.cdist(p, p) / 0.8).clamp_min(0.0)  # a distance-decaying affinity
    valid = torch.ones(10, 10, dtype=torch.bool)
    ref, _ = affinity_weighted_loss(lin(x).detach(), aff, valid, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = lin(x)
        assert emb.dtype == torch.bfloat16
        loss, _ = affinity_weighted_loss(emb, aff, valid, 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()
