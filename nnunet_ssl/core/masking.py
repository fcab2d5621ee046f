"""Input masking for masked-region reconstruction for CNNs (MAE-style masked image modelling; He et al. 2022, and for 3D CNN U-Nets
Wald et al. 2025, "An OpenMind for 3D medical vision self-supervised learning"; Models Genesis, Zhou et al. 2019,
restores transformed regions in the same spirit).

Random cubic blocks of the input are set to zero (the mean of nnU-Net's z-scored intensities); the network
reconstructs the original intensities, and the loss is the mean squared error over the *masked* voxels only, so
the task cannot be solved by copying the visible input through the skip connections."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def block_mask(batch: int, shape: Sequence[int], block: Sequence[int] | int, ratio: float,
               generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """(batch, *shape) bool, True = masked: the volume is tiled by blocks of ``block`` voxels (the last block of an
    axis may be partial) and ``round(ratio * number of blocks)`` blocks per sample are masked, chosen uniformly."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    block = [int(block)] * len(shape) if isinstance(block, int) else [int(b) for b in block]
    if len(block) != len(shape) or min(block) < 1:
        raise ValueError(f"block {block} does not fit a volume of shape {tuple(shape)}")
    grid = [math.ceil(s / b) for s, b in zip(shape, block)]
    n = math.prod(grid)
    k = int(round(ratio * n))
    scores = torch.rand(batch, n, generator=generator, device=generator.device if generator else device)
    masked = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
    if k > 0:
        masked.scatter_(1, scores.topk(k, dim=1).indices, True)
    m = masked.view(batch, *grid)
    for d, b in enumerate(block):
        m = m.repeat_interleave(b, dim=1 + d)
    return m[(slice(None), *[slice(0, s) for s in shape])].to(device) if device is not None else \
        m[(slice(None), *[slice(0, s) for s in shape])]
