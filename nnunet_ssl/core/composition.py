"""Label composition of sampled locations and PDCR's continuous affinity (Liu et al., TMI 2022)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_positions(spatial: Sequence[int], grid_stride: Sequence[int]) -> Tensor:
    """(P, dim) long positions g * G + G // 2 of a regular grid inside ``spatial``."""
    axes = [torch.arange(g // 2, s, g) for s, g in zip(spatial, grid_stride)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))


def label_composition(onehot: Tensor, positions: Tensor, window: Sequence[int]) -> Tensor:
    """Fraction of each class (channel of ``onehot`` (B,C,*S)) inside a window centred at every position.

    Windows are clipped at the volume border (fractions over the voxels inside). Returns (B, P, C)."""
    dim = onehot.ndim - 2
    w = [int(k) | 1 for k in window]  # odd: centred on the voxel
    pool = F.avg_pool3d if dim == 3 else F.avg_pool2d
    comp = pool(onehot.float(), kernel_size=w, stride=1, padding=[k // 2 for k in w], count_include_pad=False)
    idx = positions.to(onehot.device)
    flat = comp.flatten(2)  # (B,C,prod S)
    strides = torch.tensor([int(torch.tensor(onehot.shape[3 + d:]).prod()) if d < dim - 1 else 1
                            for d in range(dim)], device=onehot.device)
    lin = (idx * strides).sum(1)
    return flat[:, :, lin].transpose(1, 2)


def composition_affinity(r_a: Tensor, r_b: Optional[Tensor] = None) -> Tensor:
    """a_ij = 1 - 1/2 sum_c |r_ic - r_jc| (1 for identical compositions, 0 for disjoint ones), clamped to [0,1]
    (region channels need not sum to one). r_a (N,C), r_b (M,C) -> (N,M)."""
    r_b = r_a if r_b is None else r_b
    return (1 - 0.5 * torch.cdist(r_a.float(), r_b.float(), p=1)).clamp(0, 1)
