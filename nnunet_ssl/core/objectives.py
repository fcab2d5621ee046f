"""Contrastive objectives as pure tensor functions (Spade's global and dense ones, DrasCLR's), shared by the trainers.

Batch layout (from the two-view loader): N = 2B rows, rows 0..B-1 are view 0 and rows B..2B-1 view 1 of the
same B sampled crops; ``sample_index`` (N,) says which crop a row belongs to.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .correspondence import gather_at, sample_coords, sample_correspondences
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
    """Row indices (a, b) of the two views of each crop, ordered by crop; works for any row order.

    The layout check reads the values, which on an accelerator would wait for every queued kernel: it runs for
    host tensors only (the engine checks each loader batch on the host before moving it to the device)."""
    order = torch.argsort(sample_index, stable=True)
    a, b = order[0::2], order[1::2]
    if len(a) != len(b) or (sample_index.device.type == "cpu" and not torch.equal(sample_index[a], sample_index[b])):
        raise ValueError("every crop must appear exactly twice in the batch (two views)")
    return a, b


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


def _queue_nce(q: Tensor, k_pos: Tensor, neg: Tensor, neg_mask: Tensor, temperature: float) -> Tensor:
    """Per-query -log softmax of the positive against the masked negatives.

    q (B,K,D), k_pos (B,D), neg (B,C,D), neg_mask (B,C) -> (B,K). The positive logit is always
    in the denominator, so rows without negatives give exactly 0 and never an all -inf row."""
    l_pos = torch.einsum("bkd,bd->bk", q, k_pos) / temperature
    l_neg = torch.einsum("bkd,bcd->bkc", q, neg) / temperature
    l_neg = l_neg.masked_fill(~neg_mask[:, None, :], float("-inf"))
    return torch.logsumexp(torch.cat((l_pos[..., None], l_neg), dim=2), dim=2) - l_pos


def drasclr_loss(q_anchor: Tensor, k_positive: Tensor, q_neighbors: Optional[Tensor], neg_keys: Tensor,
                 neg_mask: Tensor, temperature: float = 0.2, beta: float = 1.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DrasCLR's local + neighbourhood contrast against location-binned queue negatives.

    l_local(b) = -log( e^{q_b.k_b/t} / (e^{q_b.k_b/t} + sum_{n valid} e^{q_b.n/t}) ); the neighbour term is the
    same with each neighbour query q_{b,k} in place of q_b (same positive key, same negatives).
    loss = mean_b l_local + beta * mean_{b,k} l_neighbour. Keys (positive and negatives) are momentum-encoder
    outputs and are treated as constants. All vectors are L2-normalised (a no-op for unit inputs); computed in
    float32 regardless of autocast.

    Args:
        q_anchor (B,D), k_positive (B,D), q_neighbors (B,K,D) or None, neg_keys (B,C,D), neg_mask (B,C) bool.

    Returns:
        (loss, stats) with detached 'local', 'neighbour' and 'mean_neg' (valid negatives per anchor).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=q_anchor.device.type, enabled=False):
        q = F.normalize(q_anchor.float(), dim=-1)
        k = F.normalize(k_positive.detach().float(), dim=-1)
        neg = F.normalize(neg_keys.detach().float(), dim=-1)
        mask = neg_mask.to(device=q.device, dtype=torch.bool)
        b = q.shape[0]
        if k.shape != q.shape or neg.shape[0] != b or neg.shape[2:] != q.shape[1:] or mask.shape != neg.shape[:2]:
            raise ValueError(f"shape mismatch: q_anchor {tuple(q.shape)}, k_positive {tuple(k.shape)}, "
                             f"neg_keys {tuple(neg.shape)}, neg_mask {tuple(mask.shape)}")
        # sum / count instead of mean: an empty batch gives 0, not NaN.
        local = _queue_nce(q[:, None], k, neg, mask, temperature).sum() / max(b, 1)
        if q_neighbors is not None:
            qn = F.normalize(q_neighbors.float(), dim=-1)
            if qn.dim() != 3 or qn.shape[0] != b or qn.shape[2] != q.shape[1]:
                raise ValueError(f"q_neighbors must be ({b}, K, {q.shape[1]}), got {tuple(qn.shape)}")
            neighbour = _queue_nce(qn, k, neg, mask, temperature).sum() / max(qn.shape[0] * qn.shape[1], 1)
        else:
            neighbour = local.new_zeros(())
        loss = local + beta * neighbour
        stats = {
            "local": local.detach(),
            "neighbour": neighbour.detach(),
            "mean_neg": mask.sum(1).float().sum().detach() / max(b, 1),
        }
    return loss, stats


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """EMA of the online network into the target: p_t <- m * p_t + (1 - m) * p_o; buffers are copied.

    The two modules must have the same architecture (parameters and buffers in the same order)."""
    p_on, p_tg = list(online.parameters()), list(target.parameters())
    b_on, b_tg = list(online.buffers()), list(target.buffers())
    if len(p_on) != len(p_tg) or len(b_on) != len(b_tg) or any(
            x.shape != y.shape for x, y in zip(p_on + b_on, p_tg + b_tg)):
        raise ValueError("online and target modules must have the same parameter and buffer shapes")
    if p_tg:
        torch._foreach_mul_(p_tg, momentum)
        torch._foreach_add_(p_tg, p_on, alpha=1.0 - momentum)
    if b_tg:
        torch._foreach_copy_(b_tg, b_on)
