"""LocationBinnedQueue against a one-by-one reference."""
import pytest
import torch

from nnunet_ssl.core.queue import LocationBinnedQueue


class _SlowQueue:
    """Plain-Python per-bin ring buffers, filled one key at a time."""

    def __init__(self, num_bins, cap):
        self.keys = [[None] * cap for _ in range(num_bins)]
        self.subject = [[-1] * cap for _ in range(num_bins)]
        self.ptr = [0] * num_bins
        self.cap = cap

    def enqueue(self, keys, bins, subjects):
        for k, b, s in zip(keys, bins, subjects):
            p = self.ptr[b]
            self.keys[b][p] = k.clone()
            self.subject[b][p] = int(s)
            self.ptr[b] = (p + 1) % self.cap


def _assert_same(q, ref):
    assert q.ptr.tolist() == ref.ptr
    assert q.subject.tolist() == ref.subject
    for b in range(q.num_bins):
        for s in range(q.capacity):
            if ref.keys[b][s] is not None:
                assert torch.equal(q.keys[b, s], ref.keys[b][s])


def test_sizes_and_buffers():
    q = LocationBinnedQueue(dim=5, size=130, bins_per_axis=4)
    assert q.num_bins == 64 and q.capacity == 2
    assert q.keys.shape == (64, 2, 5) and q.subject.shape == (64, 2) and q.ptr.shape == (64,)
    assert (q.subject == -1).all()
    assert LocationBinnedQueue(dim=2, size=3, bins_per_axis=2).capacity == 1  # at least one slot
    assert set(q.state_dict()) == {"keys", "subject", "ptr"}


def test_bin_index_known_points():
    q = LocationBinnedQueue(dim=2, size=64, bins_per_axis=4)
    loc = torch.tensor([
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],  # upper edge -> last bin
        [0.3, 0.0, 0.0],  # axis 0 bin 1 -> 16
        [0.0, 0.3, 0.0],  # axis 1 bin 1 -> 4
        [0.0, 0.0, 0.3],  # axis 2 bin 1 -> 1
        [0.5, 0.74, 0.99],  # 2*16 + 2*4 + 3
        [-0.5, 2.0, 0.25],  # clamped: 0*16 + 3*4 + 1
    ])
    assert q.bin_index(loc).tolist() == [0, 63, 16, 4, 1, 32 + 8 + 3, 12 + 1]
    q2 = LocationBinnedQueue(dim=2, size=9, bins_per_axis=3, location_dim=2)
    assert q2.bin_index(torch.tensor([[0.5, 0.9], [0.9, 0.1]])).tolist() == [1 * 3 + 2, 2 * 3 + 0]


def test_fifo_wraparound_and_overflow_match_one_by_one():
    g = torch.Generator().manual_seed(0)
    q = LocationBinnedQueue(dim=3, size=24, bins_per_axis=2)  # 8 bins, capacity 3
    ref = _SlowQueue(8, 3)
    # Several calls (one empty) that wrap around; the fifth sends 7 keys to bin 0 at once (over capacity).
    for call, n in enumerate([4, 5, 0, 6, 7, 9]):
        keys = torch.randn(n, 3, generator=g)
        loc = torch.rand(n, 3, generator=g) * (0.4 if call == 4 else 1.0)
        subj = torch.randint(0, 4, (n,), generator=g)
        q.enqueue(keys, loc, subj)
        ref.enqueue(keys, q.bin_index(loc).tolist(), subj)
        _assert_same(q, ref)


def test_overflow_keeps_last_capacity_in_order():
    q = LocationBinnedQueue(dim=1, size=3, bins_per_axis=1)  # one bin, capacity 3
    q.enqueue(torch.tensor([[10.0]]), torch.zeros(1, 3), torch.tensor([0]))  # ptr -> 1
    keys = torch.arange(5, dtype=torch.float32)[:, None]
    q.enqueue(keys, torch.zeros(5, 3), torch.arange(5))
    # Slots 1, 2, 0, 1, 2 were targeted in order: 3 and 4 overwrite 0 and 1.
    assert q.keys[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert q.subject[0].tolist() == [2, 3, 4]
    assert q.ptr.tolist() == [(1 + 5) % 3]


def test_enqueue_detaches_and_rejects_negative_subjects():
    q = LocationBinnedQueue(dim=2, size=8, bins_per_axis=2, location_dim=1)
    k = torch.randn(3, 2, requires_grad=True)
    q.enqueue(k * 2, torch.tensor([[0.1], [0.6], [0.7]]), torch.tensor([0, 1, 2]))
    assert not q.keys.requires_grad
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(1, 2), torch.zeros(1, 1), torch.tensor([-1]))
    q.enqueue(torch.randn(0, 2), torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))  # no-op


def test_negatives_exclude_same_subject_and_empty_slots():
    q = LocationBinnedQueue(dim=2, size=8, bins_per_axis=2, location_dim=1)  # 2 bins, capacity 4
    keys = torch.arange(10, dtype=torch.float32).view(5, 2)
    q.enqueue(keys, torch.tensor([[0.1], [0.2], [0.3], [0.9], [0.8]]), torch.tensor([7, 8, 7, 7, 9]))
    neg, mask = q.negatives(torch.tensor([[0.05], [0.45], [0.95], [0.6]]), torch.tensor([7, 9, 7, 3]))
    assert neg.shape == (4, 4, 2) and mask.shape == (4, 4)
    # Bin 0 holds subjects [7, 8, 7, empty]; bin 1 holds [7, 9, empty, empty].
    assert mask.tolist() == [
        [False, True, False, False],  # subject 7 in bin 0: only subject 8
        [True, True, True, False],  # subject 9 in bin 0: all filled slots
        [False, True, False, False],  # subject 7 in bin 1: only subject 9
        [True, True, False, False],  # subject 3 in bin 1
    ]
    assert torch.equal(neg[0, 1], keys[1]) and torch.equal(neg[2, 1], keys[4])


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(1)
    q = LocationBinnedQueue(dim=4, size=16, bins_per_axis=2)
    for _ in range(3):
        q.enqueue(torch.randn(5, 4, generator=g), torch.rand(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q2 = LocationBinnedQueue(dim=4, size=16, bins_per_axis=2)
    q2.load_state_dict(state)
    for name in ("keys", "subject", "ptr"):
        assert torch.equal(getattr(q2, name), getattr(q, name))
    # Same subsequent behaviour.
    k, loc, s = torch.randn(6, 4, generator=g), torch.rand(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    q.enqueue(k, loc, s)
    q2.enqueue(k, loc, s)
    n1, m1 = q.negatives(loc, s)
    n2, m2 = q2.negatives(loc, s)
    assert torch.equal(n1, n2) and torch.equal(m1, m2)
    moved = LocationBinnedQueue(dim=4, size=16, bins_per_axis=2).to(torch.float64)
    assert moved.keys.dtype == torch.float64 and moved.subject.dtype == torch.long


def test_positioned_queue_is_a_fifo():
    from nnunet_ssl.core.queue import PositionedQueue
    q = PositionedQueue(dim=2, size=4)
    assert not q.filled.any()
    k = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 2)
    p = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)
    q.enqueue(k[:3], p[:3])
    assert q.filled.tolist() == [True, True, True, False] and q.keys[:3, 0].tolist() == [0, 1, 2]
    q.enqueue(k[3:5], p[3:5])  # wraps: 4 overwrites the oldest slot (0)
    assert q.keys[:, 0].tolist() == [4, 1, 2, 3] and q.positions[:, 0].tolist() == [4, 1, 2, 3]
    assert q.ptr.item() == 1
    q.enqueue(k, p)  # more rows than slots: the last 4 survive, as if enqueued one by one
    ref = PositionedQueue(dim=2, size=4)
    for src in (k[:3], k[3:5]) + tuple(k[i:i + 1] for i in range(6)):
        ref.enqueue(src, src[:, :1].repeat(1, 3))
    assert torch.equal(q.keys, ref.keys) and torch.equal(q.positions, ref.positions) and q.ptr == ref.ptr
    assert sorted(q.keys[:, 0].tolist()) == [2, 3, 4, 5]
    state = q.state_dict()
    assert set(state) == {"keys", "positions", "filled", "ptr"}
    with pytest.raises(ValueError, match="expected keys"):
        q.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))
