"""Label composition of sampled locations and PDCR's continuous affinity (Liu et al., TMI 2022)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_positions(spatial: Sequence[int], grid_stride: Sequence[int]) -> Tensor:
    """(P, dim) long positions g * G + G // 2 of a regular grid inside ``spatial``."""
    axes = [torch.arange(g // 2, s, g) for s, g in zip(spatial, grid_stride)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))


def flat_index(positions: Tensor, spatial: Sequence[int]) -> Tensor:
    """Flat (row-major) index of (P, dim) positions in an array of shape ``spatial``."""
    strides = [math.prod(spatial[d + 1:]) for d in range(len(spatial))]
    return (positions * torch.tensor(strides, device=positions.device)).sum(1)


def label_composition(onehot: Tensor, positions: Tensor, window: Sequence[int]) -> Tensor:
    """Fraction of each class (channel of ``onehot`` (B,C,*S)) inside a window centred at every position.

    Windows are clipped at the volume border (fractions over the voxels inside). Returns (B, P, C).

    Separable box sums, one axis at a time, each from a cumulative sum along that axis read at the windows' ends,
    and only at the coordinates the positions use along that axis: the volume is summed once, then ever smaller
    slabs (an average pool at every voxel, of which only the positions were read, took 4-14 ms per call on one core
    at the CPU budget's patch, this ~1 ms). Sums of 0/1 labels are counts, exact in float32 up to 2^24 voxels per
    window; windows larger than the volume are clipped like any other."""
    dim = onehot.ndim - 2
    dev = onehot.device
    idx = positions.to(dev).long()
    sums = onehot.float()
    inverse, count = [], torch.ones(len(idx), device=dev)
    for d in range(dim):
        axis, size, half = 2 + d, onehot.shape[2 + d], (int(window[d]) | 1) // 2  # odd: centred on the voxel
        coords, inv = torch.unique(idx[:, d], return_inverse=True)
        lo = (coords - half).clamp(min=0)
        hi = (coords + half + 1).clamp(max=size)  # exclusive
        csum = F.pad(sums.cumsum(axis), [0, 0] * (dim - 1 - d) + [1, 0])  # csum[i] = sum of the first i along d
        sums = csum.index_select(axis, hi) - csum.index_select(axis, lo)
        inverse.append(inv)
        count = count * (hi - lo)[inv]
    # (B, C, U_0, ..., U_dim-1) window sums on the positions' coordinate grid -> each position's own
    flat_at = flat_index(torch.stack(inverse, 1), sums.shape[2:])
    return (sums.flatten(2)[:, :, flat_at] / count).transpose(1, 2)


def composition_affinity(r_a: Tensor, r_b: Optional[Tensor] = None) -> Tensor:
    """a_ij = 1 - 1/2 sum_c |r_ic - r_jc| (1 for identical compositions, 0 for disjoint ones), clamped to [0,1]
    (region channels need not sum to one). r_a (N,C), r_b (M,C) -> (N,M)."""
    r_b = r_a if r_b is None else r_b
    return (1 - 0.5 * torch.cdist(r_a.float(), r_b.float(), p=1)).clamp(0, 1)
