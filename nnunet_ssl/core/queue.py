"""Negative-key memory organised by location (DrasCLR): each anchor only meets keys from its own region."""
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor


class LocationBinnedQueue(nn.Module):
    """Per-bin FIFO queues of detached keys, with the subject each key came from.

    Locations in [0, 1]^location_dim are split into ``bins_per_axis`` bins per axis
    (row-major flat index). Each bin holds ``max(1, size // num_bins)`` keys. State lives in
    buffers, so it follows ``.to()`` and is saved in ``state_dict``. Subject ids must be >= 0;
    -1 marks an empty slot.
    """

    def __init__(self, dim: int, size: int, bins_per_axis: int = 4, location_dim: int = 3):
        super().__init__()
        if bins_per_axis < 1 or location_dim < 1 or dim < 1:
            raise ValueError("dim, bins_per_axis and location_dim must be >= 1")
        self.dim = dim
        self.bins_per_axis = bins_per_axis
        self.location_dim = location_dim
        self.num_bins = bins_per_axis**location_dim
        self.capacity = max(1, size // self.num_bins)
        self.register_buffer("keys", torch.zeros(self.num_bins, self.capacity, dim))
        self.register_buffer("subject", torch.full((self.num_bins, self.capacity), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(self.num_bins, dtype=torch.long))
        self.register_buffer(
            "_strides",
            bins_per_axis ** torch.arange(location_dim - 1, -1, -1, dtype=torch.long),
            persistent=False,
        )

    def bin_index(self, locations: Tensor) -> Tensor:
        """(N, location_dim) locations in [0, 1] (clamped) -> (N,) long flat bin index."""
        if locations.dim() != 2 or locations.shape[1] != self.location_dim:
            raise ValueError(f"expected locations (N, {self.location_dim}), got {tuple(locations.shape)}")
        loc = locations.to(self.keys.device)
        loc = (loc if loc.dtype == torch.float64 else loc.float()).clamp(0.0, 1.0)
        # loc == 1 would land one past the last bin.
        idx = (loc * self.bins_per_axis).floor().long().clamp_max(self.bins_per_axis - 1)
        return (idx * self._strides).sum(1)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, locations: Tensor, subjects: Tensor) -> None:
        """Append keys to their bins' FIFOs; within a bin, later rows are newer.

        Equivalent to enqueuing the rows one by one: if more than ``capacity`` rows land in
        one bin, only the last ``capacity`` of them survive.
        """
        n = keys.shape[0]
        if keys.shape != (n, self.dim) or subjects.shape != (n,) or locations.shape[0] != n:
            raise ValueError(
                f"expected keys (N, {self.dim}), locations (N, {self.location_dim}) and subjects (N,), got "
                f"{tuple(keys.shape)}, {tuple(locations.shape)} and {tuple(subjects.shape)}"
            )
        if n == 0:
            return
        dev = self.keys.device
        subj = subjects.to(device=dev, dtype=torch.long)
        if bool((subj < 0).any()):
            raise ValueError("subject ids must be >= 0 (-1 marks an empty slot)")
        b = self.bin_index(locations)
        counts = torch.bincount(b, minlength=self.num_bins)
        # Rank of each row among the rows of its bin, in input order (stable sort keeps it).
        order = torch.argsort(b, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(b)
        rank[order] = torch.arange(n, device=dev) - starts[b[order]]
        # Rows overwritten later in this same call are dropped, so the kept slots are distinct.
        keep = rank >= counts[b] - self.capacity
        bk = b[keep]
        slot = (self.ptr[bk] + rank[keep]) % self.capacity
        self.keys[bk, slot] = keys.detach()[keep].to(device=dev, dtype=self.keys.dtype)
        self.subject[bk, slot] = subj[keep]
        self.ptr.copy_((self.ptr + counts) % self.capacity)

    @torch.no_grad()
    def negatives(self, locations: Tensor, subjects: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys in each anchor's bin that are filled and come from another subject.

        Returns:
            neg_keys (N, capacity, dim) and mask (N, capacity) bool.
        """
        b = self.bin_index(locations)
        subj = self.subject[b]
        mask = (subj >= 0) & (subj != subjects.to(device=subj.device, dtype=torch.long)[:, None])
        return self.keys[b], mask


class PositionedQueue(nn.Module):
    """A FIFO of detached keys with the position each key's crop was taken at (Spade's global negatives).

    A batch of a few crops per step has few crops far enough apart to be negatives; the queue keeps the last
    ``size`` keys of earlier steps, and the loss takes those farther than ``r_neg`` from an anchor as extra
    negatives. State lives in buffers (follows ``.to()``, saved in ``state_dict``); ``filled`` marks written slots.
    """

    def __init__(self, dim: int, size: int, position_dim: int = 3):
        super().__init__()
        if dim < 1 or size < 1 or position_dim < 1:
            raise ValueError(f"dim, size and position_dim must be >= 1, got {dim}, {size}, {position_dim}")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("positions", torch.zeros(size, position_dim))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, positions: Tensor) -> None:
        """Write the rows in order, overwriting the oldest slots; equivalent to enqueuing them one by one (with more
        rows than slots, only the last ``size`` survive). The write position stays on the device: no sync."""
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1] or positions.shape != (n, self.positions.shape[1]):
            raise ValueError(f"expected keys (N, {self.keys.shape[1]}) and positions (N, {self.positions.shape[1]}), "
                             f"got {tuple(keys.shape)} and {tuple(positions.shape)}")
        if n == 0:
            return
        keep = min(n, self.size)
        slot = (self.ptr + (n - keep) + torch.arange(keep, device=self.ptr.device)) % self.size
        self.keys[slot] = keys[n - keep:].detach().to(self.keys)
        self.positions[slot] = positions[n - keep:].detach().to(self.positions)
        self.filled[slot] = True
        self.ptr.copy_((self.ptr + n) % self.size)
