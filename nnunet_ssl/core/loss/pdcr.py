"""PDCR, patch-dragsaw contrastive regularisation: Liu et al. 2022, "Contrastive and Selective Hidden Embeddings
for Medical Image Segmentation", IEEE TMI. A supervised regulariser of segmentation training: features sampled on a
grid are pulled together or pushed apart by the similarity of the ground-truth label composition around them."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..composition import composition_affinity, flat_index, grid_positions, label_composition
from .affinity_weighted import affinity_weighted_loss


def pdcr_loss(features: Sequence[Tensor], stage_strides: Sequence[Sequence[int]], onehot: Tensor,
              ignore: Optional[Tensor], grid_stride: int, window_scale: int, temperature: float, weight: float,
              cross_weight: float, max_samples: int,
              generator: Optional[torch.Generator] = None,
              projections: Optional[Sequence[Callable[[Tensor], Tensor]]] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PDCR over one or two feature stages, plus the cross-layer term for two.

    features: per stage (B, D, *S_k) projected features at input stride ``stage_strides[k]``; onehot (B, C, *S) the
    ground truth per class (background included; region channels for region-based labels); ignore (B, *S) bool or
    None. Samples sit on a grid of ``grid_stride`` input voxels (rounded up to a common multiple of the stages'
    strides, so every sample is a feature voxel of every stage); at most ``max_samples`` of them (a random subset)
    bound the N x N affinity. Sample i gets r_i, the class fractions inside a window of ``window_scale`` x stride + 1
    voxels around it; a_ij = 1 - 1/2 sum_c |r_ic - r_jc|, d_ij = 1 - a_ij; with s_ij = cos(f_i, f_j) / temperature,

        l_ij = -log( exp(s_ij a_ij) / sum_k exp(s_ik d_ik) ),   averaged over the pairs i != j,

    per stage, and for two stages a cross-layer term (stage-0 samples against stage-1 samples, affinities between
    their compositions). ``projections``: per stage, a map of sampled feature rows (N, C_k) -> (N, D), applied after
    the sampling (a 1x1 convolution's weights as a linear map: the same numbers as projecting the whole map, for the
    few hundred samples instead of every voxel). Returns (weight * sum of stage terms + cross_weight * cross term,
    detached terms)."""
    spatial = tuple(onehot.shape[2:])
    b = onehot.shape[0]
    g = math.lcm(int(grid_stride), *[int(s) for st in stage_strides for s in st])
    pos = grid_positions(spatial, [g] * len(spatial)).to(onehot.device)
    valid = torch.ones(b, len(pos), dtype=torch.bool, device=onehot.device)
    if ignore is not None:  # samples centred on ignore-labelled voxels carry no composition
        valid &= ~ignore.flatten(1)[:, flat_index(pos, spatial)]
    keep = torch.nonzero(valid.flatten()).flatten()
    if len(keep) > max_samples:
        keep = keep[torch.randperm(len(keep), device=keep.device, generator=generator)[:max_samples]]
    feats, comps = [], []
    for k, (f, st) in enumerate(zip(features, stage_strides)):
        fpos = torch.div(pos, torch.tensor(st, device=pos.device), rounding_mode="floor")
        z = f.flatten(2)[:, :, flat_index(fpos, f.shape[2:])].transpose(1, 2).reshape(b * len(pos), -1)
        r = label_composition(onehot, pos, [window_scale * s + 1 for s in st])
        z = z[keep].float()
        feats.append(projections[k](z) if projections is not None else z)
        comps.append(r.reshape(b * len(pos), -1)[keep])
    n = len(keep)
    terms, total = {}, onehot.new_zeros(())
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=onehot.device)
    for k in range(len(feats)):
        loss, _ = affinity_weighted_loss(feats[k], composition_affinity(comps[k]), off_diagonal, temperature)
        terms[f"pdcr_{k}"] = loss.detach()
        total = total + weight * loss
    if len(feats) == 2 and cross_weight:
        all_pairs = torch.ones(n, n, dtype=torch.bool, device=onehot.device)
        loss, _ = affinity_weighted_loss(feats[0], composition_affinity(comps[0], comps[1]), all_pairs, temperature,
                                         candidates=feats[1])
        terms["pdcr_cross"] = loss.detach()
        total = total + cross_weight * loss
    return total, terms
