"""Selection rules, location-conditioned head, DrasCLR objective and momentum update."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.core.heads import LocationConditionedHead
from nnunet_ssl.core.loss import drasclr_loss
from nnunet_ssl.core.momentum import momentum_update
from nnunet_ssl.core.selection import instance_masks, positional_masks


def test_instance_masks():
    pos, neg = instance_masks(torch.tensor([0, 1, 0, 2, 1]))
    exp_pos = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 2), (1, 4)]:
        exp_pos[i, j] = exp_pos[j, i] = True
    assert torch.equal(pos, exp_pos)
    exp_neg = ~(exp_pos | torch.eye(5, dtype=torch.bool))
    assert torch.equal(neg, exp_neg)


def test_positional_masks_hand_built():
    # Slice positions 0, 0.1, 0.25, 0.6, 0.65 with delta 0.2.
    p = torch.tensor([0.0, 0.1, 0.25, 0.6, 0.65])
    pos, neg = positional_masks(p, 0.2)
    close = [(0, 1), (1, 2), (3, 4)]  # |dp| = 0.1, 0.15, 0.05; (0, 2) = 0.25 is not
    exp_pos = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in close:
        exp_pos[i, j] = exp_pos[j, i] = True
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.equal(pos, exp_pos)
    assert torch.equal(neg, off & ~exp_pos)  # no excluded band
    # Groups add positives regardless of position: rows 0 and 4 are views of one slice.
    pos_g, neg_g = positional_masks(p, 0.2, group_ids=torch.tensor([0, 1, 2, 3, 0]))
    exp_pos[0, 4] = exp_pos[4, 0] = True
    assert torch.equal(pos_g, exp_pos) and torch.equal(neg_g, off & ~exp_pos)


def test_positional_masks_loop_reference():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(12, generator=g)
    groups = torch.randint(0, 5, (12,), generator=g)
    pos, neg = positional_masks(p, 0.15, groups)
    pl = p.tolist()
    for i in range(12):
        for j in range(12):
            exp = i != j and (abs(pl[i] - pl[j]) < 0.15 or bool(groups[i] == groups[j]))
            assert bool(pos[i, j]) == exp
            assert bool(neg[i, j]) == (i != j and not exp)


def test_location_head_shapes_norm_grads():
    torch.manual_seed(0)
    head = LocationConditionedHead(6, hidden_dim=16, out_dim=8, num_experts=3)
    x = torch.randn(4, 6, 3, 4, 5, requires_grad=True)
    loc = torch.rand(4, 3)
    y = head(x, loc)
    assert y.shape == (4, 8)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(4))
    (y * torch.randn(4, 8)).sum().backward()
    for p in (x, head.expert_weight, head.expert_bias, head.gate[0].weight, head.gate[2].weight,
              head.trunk[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # 2-D feature maps work too.
    assert head(torch.randn(2, 6, 5, 5), torch.rand(2, 3)).shape == (2, 8)
    with pytest.raises(ValueError):
        head(torch.randn(2, 6, 5, 5), torch.rand(2, 2))


def test_location_head_matches_loop_and_depends_on_location():
    torch.manual_seed(1)
    head = LocationConditionedHead(5, hidden_dim=7, out_dim=4, num_experts=4)
    x = torch.randn(3, 5, 2, 2, 2)
    loc = torch.rand(3, 3)
    h = torch.stack([head.trunk(x[b].flatten(1).T).mean(0) for b in range(3)])  # per voxel, then mean
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + head.norm.eps)  # BatchNorm, training mode
    gate = torch.softmax(head.gate(loc), dim=1)
    ref = []
    for b in range(3):
        out = sum(gate[b, e] * (h[b] @ head.expert_weight[e] + head.expert_bias[e]) for e in range(4))
        ref.append(F.normalize(out, dim=0))
    torch.testing.assert_close(head(x, loc), torch.stack(ref))
    # Same features, different location -> different embedding.
    x1 = x[:1].expand(2, -1, -1, -1, -1)
    y = head(x1, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert (y[0] - y[1]).abs().max() > 1e-4


def test_location_head_autocast_bfloat16():
    torch.manual_seed(2)
    head = LocationConditionedHead(6, hidden_dim=16, out_dim=8, num_experts=3)
    x, loc = torch.randn(2, 6, 3, 3, 3), torch.rand(2, 3, dtype=torch.float64)
    ref = head(x, loc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x, loc)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=3e-2)


def _slow_drasclr(q, k, qn, neg, mask, t, beta):
    q, k, neg = (F.normalize(v.double(), dim=-1) for v in (q, k, neg))
    qn = None if qn is None else F.normalize(qn.double(), dim=-1)

    def nce(qv, b):
        pos = math.exp(float(qv @ k[b]) / t)
        den = pos + sum(math.exp(float(qv @ neg[b, c]) / t) for c in range(neg.shape[1]) if mask[b, c])
        return -math.log(pos / den)

    local = [nce(q[b], b) for b in range(q.shape[0])]
    nb = [] if qn is None else [nce(qn[b, j], b) for b in range(q.shape[0]) for j in range(qn.shape[1])]
    local_m = sum(local) / len(local)
    nb_m = sum(nb) / len(nb) if nb else 0.0
    return local_m + beta * nb_m, local_m, nb_m


def _drasclr_case(seed, b=4, k=3, c=5, d=6):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    kp = F.normalize(q + 0.5 * torch.randn(b, d, generator=g), dim=-1)
    qn = torch.randn(b, k, d, generator=g)
    neg = torch.randn(b, c, d, generator=g)
    mask = torch.rand(b, c, generator=g) < 0.6
    mask[0] = False  # an anchor with no valid negatives
    return q, kp, qn, neg, mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_neighbours", [True, False])
def test_drasclr_matches_reference(seed, with_neighbours):
    q, kp, qn, neg, mask = _drasclr_case(seed)
    qn = qn if with_neighbours else None
    loss, stats = drasclr_loss(q, kp, qn, neg, mask, temperature=0.2, beta=0.7)
    ref, local, nb = _slow_drasclr(q, kp, qn, neg, mask, 0.2, 0.7)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["local"].item() == pytest.approx(local, rel=1e-5)
    assert stats["neighbour"].item() == pytest.approx(nb, rel=1e-5, abs=1e-7)
    assert stats["mean_neg"].item() == pytest.approx(mask.sum().item() / 4)


def test_drasclr_keys_are_constants():
    q, kp, qn, neg, mask = _drasclr_case(7)
    q.requires_grad_(True)
    qn.requires_grad_(True)
    kp.requires_grad_(True)
    neg.requires_grad_(True)
    loss, _ = drasclr_loss(q, kp, qn, neg, mask)
    loss.backward()
    assert q.grad.abs().sum() > 0 and qn.grad.abs().sum() > 0
    assert kp.grad is None and neg.grad is None


def test_drasclr_no_negatives_is_zero_and_connected():
    q, kp, qn, neg, _ = _drasclr_case(3)
    q.requires_grad_(True)
    qn.requires_grad_(True)
    loss, stats = drasclr_loss(q, kp, qn, neg, torch.zeros(4, 5, dtype=torch.bool), temperature=0.01)
    assert loss.item() == 0.0 and stats["mean_neg"].item() == 0.0
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(qn.grad, torch.zeros_like(qn))


def test_drasclr_extreme_logits_and_empty_neighbours():
    # Negative identical to the query at t = 0.01, positive opposite: loss ~ 200, finite.
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss, _ = drasclr_loss(q, torch.tensor([[-1.0, 0.0]]), torch.zeros(1, 0, 2), torch.tensor([[[1.0, 0.0]]]),
                           torch.ones(1, 1, dtype=torch.bool), temperature=0.01)
    assert loss.item() == pytest.approx(200.0, rel=1e-4)
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_drasclr_autocast_bfloat16():
    q, kp, qn, neg, mask = _drasclr_case(4)
    lin = torch.nn.Linear(6, 6)
    ref, _ = drasclr_loss(lin(q).detach(), kp, lin(qn).detach(), neg, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qa, qna = lin(q), lin(qn)
        assert qa.dtype == torch.bfloat16
        loss, _ = drasclr_loss(qa, kp.bfloat16(), qna, neg.bfloat16(), mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=3e-2)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_momentum_update_exact():
    torch.manual_seed(0)
    online, target = _tiny(), _tiny()
    online.train()(torch.randn(5, 3))  # moves the BatchNorm running stats away from their init
    # Dyadic values and m = 0.75: every product and sum is exact in float32, so equality is bitwise.
    with torch.no_grad():
        for m in (online, target):
            for p in m.parameters():
                p.copy_(torch.randint(-8, 9, p.shape) / 4)
    before = copy.deepcopy(target)
    momentum_update(online, target, 0.75)
    for po, pb, pt in zip(online.parameters(), before.parameters(), target.parameters()):
        assert torch.equal(pt, 0.75 * pb + 0.25 * po)
    for bo, bt in zip(online.buffers(), target.buffers()):
        assert torch.equal(bo, bt)

    target = copy.deepcopy(before)
    momentum_update(online, target, 0.0)  # copies
    for po, pt in zip(online.parameters(), target.parameters()):
        assert torch.equal(po, pt)
    target = copy.deepcopy(before)
    momentum_update(online, target, 1.0)  # keeps parameters (buffers still copied)
    for pb, pt in zip(before.parameters(), target.parameters()):
        assert torch.equal(pb, pt)
    for bo, bt in zip(online.buffers(), target.buffers()):
        assert torch.equal(bo, bt)

    with pytest.raises(ValueError):
        momentum_update(online, torch.nn.Linear(3, 4), 0.5)


def test_momentum_update_random_values():
    torch.manual_seed(1)
    online, target = _tiny(), _tiny()
    before = copy.deepcopy(target)
    momentum_update(online, target, 0.99)
    for po, pb, pt in zip(online.parameters(), before.parameters(), target.parameters()):
        ref = 0.99 * pb.detach().double() + 0.01 * po.detach().double()
        torch.testing.assert_close(pt.detach().double(), ref, rtol=1e-6, atol=1e-7)
