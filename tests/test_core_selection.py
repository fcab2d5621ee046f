import math

import pytest
import torch

from nnunet_ssl.core.selection import contrastive_masks


def _line(xs):
    return torch.tensor([[float(x), 0.0, 0.0] for x in xs])


def _reference(coords, groups, r_pos, r_neg, valid=None):
    n = coords.shape[0]
    pos = torch.zeros(n, n, dtype=torch.bool)
    neg = torch.zeros(n, n, dtype=torch.bool)
    c = coords.double().tolist()
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if valid is not None and not (valid[i] and valid[j]):
                continue
            d = math.dist(c[i], c[j])
            p = bool(groups[i] == groups[j]) or d < r_pos
            pos[i, j] = p
            neg[i, j] = (not p) and d > r_neg
    return pos, neg


def test_line_geometry_exact_sets():
    # Points at x = 0, 1, 3, 6, 10; points 0 and 4 form one group (far apart).
    coords = _line([0, 1, 3, 6, 10])
    groups = torch.tensor([0, 1, 2, 3, 0])
    pos, neg = contrastive_masks(coords, groups, r_pos=1.5, r_neg=4.0)
    exp_pos = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 1), (0, 4)]:  # d=1 < 1.5, and same group at d=10
        exp_pos[i, j] = exp_pos[j, i] = True
    exp_neg = torch.zeros(5, 5, dtype=torch.bool)
    # d > 4: (0,3)=6, (1,3)=5, (1,4)=9, (2,4)=7, (0,4) is positive via group.
    for i, j in [(0, 3), (1, 3), (1, 4), (2, 4)]:
        exp_neg[i, j] = exp_neg[j, i] = True
    assert torch.equal(pos, exp_pos)
    assert torch.equal(neg, exp_neg)
    # Band pairs (r_pos <= d <= r_neg) are excluded: (0,2)=3, (1,2)=2, (2,3)=3, (3,4)=4.
    excluded = ~pos & ~neg & ~torch.eye(5, dtype=torch.bool)
    for i, j in [(0, 2), (1, 2), (2, 3), (3, 4)]:
        assert excluded[i, j] and excluded[j, i]
    assert excluded.sum() == 8


def test_band_boundaries_are_excluded():
    # d exactly r_pos is not positive (strict <); d exactly r_neg is not negative (strict >).
    coords = _line([0, 2, 5])
    groups = torch.arange(3)
    pos, neg = contrastive_masks(coords, groups, r_pos=2.0, r_neg=5.0)
    assert not pos.any()
    assert not neg.any()
    pos, neg = contrastive_masks(coords, groups, r_pos=2.0001, r_neg=4.9999)
    assert pos[0, 1] and pos[1, 0] and neg[0, 2] and neg[2, 0]
    assert not pos[0, 2] and not neg[0, 1] and not pos[1, 2] and not neg[1, 2]


def test_two_groups_r_pos_zero_local_branch():
    # Two "views": voxel i of view a corresponds to voxel i of view b (same group).
    a = _line([0, 1, 2, 3])
    b = a + torch.tensor([0.0, 0.0, 0.0])  # identical positions
    coords = torch.cat([a, b])
    groups = torch.cat([torch.arange(4), torch.arange(4)])
    pos, neg = contrastive_masks(coords, groups, r_pos=0.0, r_neg=1.5)
    exp_pos = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(4):
        exp_pos[i, i + 4] = exp_pos[i + 4, i] = True
    assert torch.equal(pos, exp_pos)
    # Negatives: |xi - xj| >= 2 (> 1.5), regardless of view.
    x = coords[:, 0]
    d = (x[:, None] - x[None, :]).abs()
    assert torch.equal(neg, d > 1.5)
    assert not (pos & neg).any()
    assert not pos.diagonal().any() and not neg.diagonal().any()


def test_r_neg_smaller_than_r_pos_raises():
    with pytest.raises(ValueError, match="r_neg"):
        contrastive_masks(_line([0, 1]), torch.arange(2), r_pos=2.0, r_neg=1.0)


def test_valid_masking():
    coords = _line([0, 10, 20, 30])
    groups = torch.tensor([0, 0, 1, 2])
    valid = torch.tensor([True, False, True, True])
    pos, neg = contrastive_masks(coords, groups, r_pos=1.0, r_neg=5.0, valid=valid)
    assert not pos[1].any() and not pos[:, 1].any()
    assert not neg[1].any() and not neg[:, 1].any()
    # Remaining valid entries are all mutually far apart -> negatives.
    keep = torch.tensor([0, 2, 3])
    sub_neg = neg[keep][:, keep]
    assert torch.equal(sub_neg, ~torch.eye(3, dtype=torch.bool))
    assert not pos.any()  # the only group partner (index 1) is invalid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    coords = torch.rand(n, 3, generator=g) * 20
    groups = torch.randint(0, 12, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    for r_pos, r_neg in [(0.0, 5.0), (3.0, 8.0), (4.0, 4.0)]:
        for v in (None, valid):
            pos, neg = contrastive_masks(coords, groups, r_pos, r_neg, valid=v)
            rpos, rneg = _reference(coords, groups, r_pos, r_neg, v)
            assert torch.equal(pos, rpos)
            assert torch.equal(neg, rneg)
            assert torch.equal(pos, pos.t()) and torch.equal(neg, neg.t())


