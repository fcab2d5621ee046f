"""Spade's local (equivariant, dense) loss: Zhang et al. 2022 (Spade); voxel-level contrast between the exactly
corresponding feature voxels of two augmented views of a crop."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..correspondence import gather_at, sample_coords, sample_correspondences
from ..frames import apply_axis_affine
from ..selection import contrastive_masks, view_pairs
from .info_nce import info_nce


def dense_correspondence_loss(dense: Tensor, coords: Tensor, valid: Tensor, canonical_scale: Tensor,
                              canonical_offset: Tensor, sample_index: Tensor, grid: Sequence,
                              num_samples: int, tolerance: float, r_neg: float, temperature: float,
                              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Voxel-level contrast between the two views of each crop (Spade's local, equivariant branch).

    dense (N,C,*S') unit-norm features whose voxel i sits at input position ``scale * i + offset`` (``grid`` =
    (scale, offset) from ``feature_grid`` of the network's convolutions; a plain stride tuple means offset 0, the
    centre of nnU-Net's odd-kernel, same-padded convolutions); coords (N,3,*S) preprocessed voxel coordinates of
    every input voxel and valid (N,*S) from the loader. Up to ``num_samples`` voxels of view a
    per crop are matched to the exactly corresponding feature voxel of view b (nearest in coordinates, within
    ``tolerance`` feature voxels). Positive: that voxel. Negatives: all other sampled voxels (both views, all
    crops) whose canonical distance exceeds ``r_neg``; nearer ones are excluded.

    Padding slots (crops with fewer matches than ``num_samples``) stay in the fixed-size (2*B*K) layout and are
    masked out of every pair, rather than removed by boolean indexing: the shapes never depend on the data, so
    nothing waits for the device."""
    scale, offset = (grid if isinstance(grid[0], (tuple, list)) else (grid, (0.0,) * len(grid)))
    expect = tuple(-(-n // int(round(f))) for n, f in zip(coords.shape[2:], scale))
    if tuple(dense.shape[2:]) != expect:
        raise ValueError(f"feature map {tuple(dense.shape[2:])} does not match the input {tuple(coords.shape[2:])} "
                         f"at stride {tuple(scale)} ({expect})")
    c_feat, v_feat = sample_coords(coords.to(dense.device), valid.to(dense.device), scale, offset, expect)
    a, b = view_pairs(sample_index)
    a, b = a.to(dense.device, non_blocking=True), b.to(dense.device, non_blocking=True)
    corr = sample_correspondences(c_feat[a], v_feat[a], c_feat[b], v_feat[b], num_samples,
                                  tolerance * float(max(scale)), generator=generator)
    canon = apply_axis_affine(c_feat, canonical_scale.to(dense.device), canonical_offset.to(dense.device))
    fa = gather_at(dense[a], corr["index_a"])  # (B,K,C)
    fb = gather_at(dense[b], corr["index_b"])
    xa = gather_at(canon[a], corr["index_a"])  # (B,K,3)
    xb = gather_at(canon[b], corr["index_b"])
    m = corr["mask"].reshape(-1)
    pair_id = torch.arange(m.numel(), device=m.device)
    z = torch.cat((fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])), 0)
    x = torch.cat((xa.reshape(-1, 3), xb.reshape(-1, 3)), 0)
    group = torch.cat((pair_id, pair_id), 0)
    slot_ok = torch.cat((m, m), 0)
    pos, neg = contrastive_masks(x, group, 0.0, r_neg, valid=slot_ok)
    loss, stats = info_nce(z, None, pos, neg, temperature)
    # per-anchor counts over the sampled voxels only (info_nce averages over all rows; padding rows count none)
    per_voxel = z.shape[0] / slot_ok.sum().clamp_min(1).float()
    stats["mean_pos"] = stats["mean_pos"] * per_voxel
    stats["mean_neg"] = stats["mean_neg"] * per_voxel
    stats["num_pairs"] = m.sum().float().detach()
    return loss, stats
