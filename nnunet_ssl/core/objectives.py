"""Spade's two objectives as pure tensor functions (selection rule + loss), shared by the trainers.

Batch layout (from the two-view loader): N = 2B rows, rows 0..B-1 are view 0 and rows B..2B-1 view 1 of the
same B sampled crops; ``sample_index`` (N,) says which crop a row belongs to.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .correspondence import downsample_coords, gather_at, sample_correspondences
from .frames import apply_axis_affine
from .losses import info_nce
from .selection import contrastive_masks


def spade_global_loss(embeddings: Tensor, centers: Tensor, sample_index: Tensor, r_pos: float, r_neg: float,
                      temperature: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Crop-level contrast with spatial-prior selection.

    Positives of anchor i: its other view and every crop (any case) whose canonical centre is closer than
    ``r_pos``; negatives: crops farther than ``r_neg``; the band in between is left out of the denominator
    (likely false negatives are not pushed away). embeddings (N,D) unit vectors, centers (N,3) canonical."""
    pos, neg = contrastive_masks(centers, sample_index, r_pos, r_neg)
    return info_nce(embeddings, None, pos, neg, temperature)


def view_pairs(sample_index: Tensor) -> Tuple[Tensor, Tensor]:
    """Row indices (a, b) of the two views of each crop, ordered by crop; works for any row order."""
    order = torch.argsort(sample_index, stable=True)
    pairs = order.view(-1, 2)
    if not torch.equal(sample_index[pairs[:, 0]], sample_index[pairs[:, 1]]):
        raise ValueError("every crop must appear exactly twice in the batch (two views)")
    return pairs[:, 0], pairs[:, 1]


def dense_correspondence_loss(dense: Tensor, coords: Tensor, valid: Tensor, canonical_scale: Tensor,
                              canonical_offset: Tensor, sample_index: Tensor, stride: Sequence[int],
                              num_samples: int, tolerance: float, r_neg: float, temperature: float,
                              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Voxel-level contrast between the two views of each crop (Spade's local, equivariant branch).

    dense (N,C,*S') unit-norm features at stride ``stride`` of the input; coords (N,3,*S) preprocessed voxel
    coordinates of every input voxel and valid (N,*S) from the loader. Up to ``num_samples`` voxels of view a
    per crop are matched to the exactly corresponding feature voxel of view b (nearest in coordinates, within
    ``tolerance`` feature voxels). Positive: that voxel. Negatives: all other sampled voxels (both views, all
    crops) whose canonical distance exceeds ``r_neg``; nearer ones are excluded."""
    c_feat, v_feat = downsample_coords(coords.to(dense.device), valid.to(dense.device), tuple(stride))
    if tuple(c_feat.shape[2:]) != tuple(dense.shape[2:]):
        raise ValueError(f"feature map {tuple(dense.shape[2:])} does not match the input downsampled by "
                         f"{tuple(stride)} ({tuple(c_feat.shape[2:])})")
    a, b = view_pairs(sample_index.to(dense.device))
    corr = sample_correspondences(c_feat[a], v_feat[a], c_feat[b], v_feat[b], num_samples,
                                  tolerance * float(max(stride)), generator=generator)
    canon = apply_axis_affine(c_feat, canonical_scale.to(dense.device), canonical_offset.to(dense.device))
    fa = gather_at(dense[a], corr["index_a"])  # (B,K,C)
    fb = gather_at(dense[b], corr["index_b"])
    xa = gather_at(canon[a], corr["index_a"])  # (B,K,3)
    xb = gather_at(canon[b], corr["index_b"])
    m = corr["mask"]
    pair_id = torch.arange(m.numel(), device=m.device).view(m.shape)[m]
    z = torch.cat((fa[m], fb[m]), 0)
    x = torch.cat((xa[m], xb[m]), 0)
    group = torch.cat((pair_id, pair_id), 0)
    pos, neg = contrastive_masks(x, group, 0.0, r_neg)
    loss, stats = info_nce(z, None, pos, neg, temperature)
    stats["num_pairs"] = m.sum().float().detach()
    return loss, stats
