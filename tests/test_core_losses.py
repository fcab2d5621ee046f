import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.core.loss.info_nce import info_nce


def _reference_value(anchors, candidates, pos, neg, temperature):
    """Float64 loops with math.exp/log; pos wins where both masks are set."""
    a = F.normalize(anchors.double(), dim=-1).tolist()
    c = a if candidates is None else F.normalize(candidates.double(), dim=-1).tolist()
    losses = []
    for i in range(len(a)):
        p_idx = [j for j in range(len(c)) if pos[i, j]]
        n_idx = [j for j in range(len(c)) if neg[i, j] and not pos[i, j]]
        if not p_idx:
            continue
        s = {j: sum(x * y for x, y in zip(a[i], c[j])) / temperature for j in p_idx + n_idx}
        m = max(s.values())
        lse = m + math.log(sum(math.exp(v - m) for v in s.values()))
        losses.append(-sum(s[p] - lse for p in p_idx) / len(p_idx))
    return sum(losses) / len(losses) if losses else 0.0


def _reference_torch(anchors, candidates, pos, neg, temperature):
    """Same formula with torch ops in loops (float64), for autograd."""
    a = F.normalize(anchors, dim=-1)
    c = a if candidates is None else F.normalize(candidates, dim=-1)
    terms = []
    for i in range(a.shape[0]):
        p_idx = [j for j in range(c.shape[0]) if pos[i, j]]
        n_idx = [j for j in range(c.shape[0]) if neg[i, j] and not pos[i, j]]
        if not p_idx:
            continue
        sims = torch.stack([(a[i] * c[j]).sum() / temperature for j in p_idx + n_idx])
        lse = torch.logsumexp(sims, dim=0)
        terms.append(-(sims[: len(p_idx)] - lse).mean())
    return torch.stack(terms).mean()


def _random_case(seed, na, nc, d=8, shared=False):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(na, d, generator=g), dim=-1)
    c = None if shared else F.normalize(torch.randn(nc, d, generator=g), dim=-1)
    pos = torch.rand(na, nc, generator=g) < 0.25
    neg = (torch.rand(na, nc, generator=g) < 0.5) & ~pos
    if shared:
        eye = torch.eye(na, dtype=torch.bool)
        pos &= ~eye
        neg &= ~eye
    # Force some rows with no positives and some with no negatives.
    pos[0] = False
    neg[1] = False
    pos[1, 0] = True
    neg[2] = False
    pos[2] = False
    return a, c, pos, neg


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shared", [False, True])
def test_matches_reference(seed, shared):
    na, nc = 9, (9 if shared else 13)
    a, c, pos, neg = _random_case(seed, na, nc, shared=shared)
    for t in (0.1, 0.5):
        loss, stats = info_nce(a, c, pos, neg, t)
        ref = _reference_value(a, c, pos, neg, t)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
        assert stats["mean_pos"].item() == pytest.approx(pos.sum().item() / na)
        assert stats["mean_neg"].item() == pytest.approx((neg & ~pos).sum().item() / na)
        assert stats["num_anchors"].item() == (pos.sum(1) > 0).sum().item()


def test_unnormalised_inputs_are_normalised():
    a, c, pos, neg = _random_case(7, 6, 6)
    l1, _ = info_nce(a, c, pos, neg, 0.2)
    l2, _ = info_nce(a * 3.0, c * 0.5, pos, neg, 0.2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)


def test_excluded_entries_do_not_enter_denominator():
    # Anchor 0: positive c0, negative c1; c2 is excluded and very similar (would change the loss).
    a = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    pos = torch.tensor([[True, False, False]])
    neg = torch.tensor([[False, True, False]])
    loss, _ = info_nce(a, c, pos, neg, 1.0)
    expected = -(1.0 - math.log(math.exp(1.0) + math.exp(0.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_match_reference(seed, shared):
    na, nc = 7, (7 if shared else 10)
    a, c, pos, neg = _random_case(100 + seed, na, nc, shared=shared)
    a = (a * 1.7).requires_grad_(True)  # not unit norm, so the normalisation's gradient matters
    c = None if c is None else c.clone().requires_grad_(True)
    loss, _ = info_nce(a, c, pos, neg, 0.3)
    loss.backward()

    a64 = a.detach().double().requires_grad_(True)
    c64 = None if c is None else c.detach().double().requires_grad_(True)
    ref = _reference_torch(a64, c64, pos, neg, 0.3)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-5)
    if c is not None:
        torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-4, atol=1e-5)


def _assert_finite(loss, *tensors):
    assert torch.isfinite(loss).all()
    loss.backward()
    for t in tensors:
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()


def test_single_anchor():
    a = torch.randn(1, 4, requires_grad=True)
    pos = torch.zeros(1, 1, dtype=torch.bool)
    loss, stats = info_nce(a, None, pos, pos.clone(), 0.1)
    assert loss.item() == 0.0
    assert stats["num_anchors"].item() == 0
    _assert_finite(loss, a)


def test_two_anchors_only_positives():
    a = torch.randn(2, 4, requires_grad=True)
    pos = torch.tensor([[False, True], [True, False]])
    neg = torch.zeros(2, 2, dtype=torch.bool)
    loss, _ = info_nce(a, None, pos, neg, 0.1)
    # Only the positive in the denominator: log-softmax over one entry is 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    _assert_finite(loss, a)


def test_no_negatives_anywhere():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 5, generator=g).requires_grad_(True)
    pos = torch.zeros(6, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = pos[0, 2] = pos[2, 0] = True
    neg = torch.zeros(6, 6, dtype=torch.bool)
    loss, _ = info_nce(a, None, pos, neg, 0.2)
    ref = _reference_value(a.detach(), None, pos, neg, 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    _assert_finite(loss, a)


def test_all_false_masks():
    a = torch.randn(5, 4, requires_grad=True)
    c = torch.randn(3, 4, requires_grad=True)
    m = torch.zeros(5, 3, dtype=torch.bool)
    loss, stats = info_nce(a, c, m, m, 0.1)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert stats["mean_pos"].item() == 0.0 and stats["mean_neg"].item() == 0.0
    _assert_finite(loss, a, c)


def test_huge_similarities():
    # Identical vectors at temperature 0.01: logits of 100 everywhere.
    v = torch.randn(1, 16).repeat(6, 1).requires_grad_(True)
    pos = torch.zeros(6, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    neg = ~torch.eye(6, dtype=torch.bool) & ~pos
    loss, _ = info_nce(v, None, pos, neg, 0.01)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-4)
    _assert_finite(loss, v)

    # Positive far apart, negative identical: the loss is ~ (1 - (-1)) / 0.01 = 200.
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    pos = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    neg = torch.tensor([[False, False, True], [False, False, False], [True, False, False]])
    loss, _ = info_nce(a, None, pos, neg, 0.01)
    assert loss.item() == pytest.approx((200.0 + 0.0) / 2, rel=1e-4)
    _assert_finite(loss, a)


def test_autocast_bfloat16_computes_in_float32():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 16, generator=g)
    lin = torch.nn.Linear(16, 32)
    pos = torch.zeros(12, 12, dtype=torch.bool)
    for i in range(0, 12, 2):
        pos[i, i + 1] = pos[i + 1, i] = True
    neg = ~torch.eye(12, dtype=torch.bool) & ~pos

    a32 = F.normalize(lin(x), dim=-1).detach()
    ref, _ = info_nce(a32, None, pos, neg, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 inputs: the result must be bitwise the float32 one (no bf16 matmul).
        same, _ = info_nce(a32, None, pos, neg, 0.07)
        # bf16 activations from an autocast region: float32 result, close to the float32 one.
        emb = lin(x)
        assert emb.dtype == torch.bfloat16
        loss, _ = info_nce(emb, None, pos, neg, 0.07)
    assert same.dtype == torch.float32 and loss.dtype == torch.float32
    assert same.item() == ref.item()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_overlapping_masks_count_as_positive():
    a, c, pos, neg = _random_case(21, 6, 8)
    l_disjoint, s1 = info_nce(a, c, pos, neg, 0.2)
    l_overlap, s2 = info_nce(a, c, pos, neg | pos, 0.2)
    assert l_overlap.item() == pytest.approx(l_disjoint.item(), rel=1e-6)
    assert s2["mean_neg"].item() == pytest.approx(s1["mean_neg"].item())
