"""Spade's local (equivariant, dense) loss: Zhang et al. 2022 (Spade); voxel-level contrast between the exactly
corresponding feature voxels of two augmented views of a crop."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..correspondence import sample_coords, sample_correspondences
from ..selection import view_pairs


def dense_correspondence_loss(dense: Tensor, coords: Tensor, valid: Tensor, canonical_scale: Tensor,
                              canonical_offset: Tensor, sample_index: Tensor, grid: Sequence,
                              num_samples: int, tolerance: float, r_neg: float, temperature: float,
                              generator: Optional[torch.Generator] = None,
                              search: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """Voxel-level contrast between the two views of each crop (Spade's local, equivariant branch).

    dense (N,C,*S') features (normalised here, per sampled voxel: the map need not be) whose voxel i sits at input
    position ``scale * i + offset`` (``grid`` = (scale, offset) from ``feature_grid`` of the network's convolutions;
    a plain stride tuple means offset 0, the centre of nnU-Net's odd-kernel, same-padded convolutions); coords
    (N,3,*S) preprocessed voxel coordinates of every input voxel and valid (N,*S) from the loader. Up to
    ``num_samples`` voxels of view a per crop are matched to the exactly corresponding feature voxel of view b
    (nearest in coordinates, within ``tolerance`` feature voxels). Positive: that voxel. Negatives: all other
    sampled voxels (both views, all crops) whose canonical distance exceeds ``r_neg``; nearer ones are excluded.
    ``search``: how the nearest voxel is found (``sample_correspondences``; the same pairs either way).

    Padding slots (crops with fewer matches than ``num_samples``) stay in the fixed-size (2*B*K) layout and are
    masked out of every pair, rather than removed by boolean indexing: the shapes never depend on the data, so
    nothing waits for the device."""
    scale, offset = (grid if isinstance(grid[0], (tuple, list)) else (grid, (0.0,) * len(grid)))
    expect = tuple(-(-n // int(round(f))) for n, f in zip(coords.shape[2:], scale))
    if tuple(dense.shape[2:]) != expect:
        raise ValueError(f"feature map {tuple(dense.shape[2:])} does not match the input {tuple(coords.shape[2:])} "
                         f"at stride {tuple(scale)} ({expect})")
    c_feat, v_feat = sample_coords(coords.to(dense.device), valid.to(dense.device), scale, offset, expect)
    if r_neg < 0:
        raise ValueError(f"r_neg must be >= 0, got {r_neg}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a, b = view_pairs(sample_index)
    a, b = a.to(dense.device, non_blocking=True), b.to(dense.device, non_blocking=True)
    corr = sample_correspondences(c_feat[a], v_feat[a], c_feat[b], v_feat[b], num_samples,
                                  tolerance * float(max(scale)), generator=generator, search=search)
    k = corr["mask"].shape[1]
    # rows (2*B*K,): slot j of view a, then the same slots of view b; voxels are read straight from the (N,C,V)
    # maps by (row, voxel) index, without copying whole feature maps per view
    src = torch.cat((a, b))[:, None].expand(-1, k).reshape(-1)  # batch row each sampled voxel is read from
    vox = torch.cat((corr["index_a"], corr["index_b"])).reshape(-1)
    with torch.autocast(device_type=dense.device.type, enabled=False):
        # float32: the logits at low temperature overflow / underflow half precision
        z = F.normalize(dense.flatten(2)[src, :, vox].float(), dim=-1)  # (2P, C)
        x = c_feat.flatten(2)[src, :, vox].float()  # (2P, 3) preprocessed voxel positions
        x = x * canonical_scale.to(x)[src] + canonical_offset.to(x)[src]
        m = corr["mask"].reshape(-1)
        slot_ok = torch.cat((m, m))
        n, p = z.shape[0], m.numel()
        # the one positive of row i is its corresponding voxel in the other view, row (i + P) mod 2P
        rows = torch.arange(n, device=z.device)
        partner = (rows + p).remainder_(n)
        # negatives: other sampled voxels farther than r_neg; squared distances from direct per-axis differences
        # (exact, as contrastive_masks' cdist: two slots may share a voxel, at distance 0 exactly; the diagonal is
        # exactly 0, so it is never a negative and needs no mask of its own)
        d2 = (x[:, None, 0] - x[None, :, 0]).square_()
        for axis in (1, 2):
            d2.add_((x[:, None, axis] - x[None, :, axis]).square_())
        far = (d2 > r_neg * r_neg) & slot_ok[:, None] & slot_ok[None, :]
        logits = z @ z.t() / temperature
        # the denominator: the negatives and the positive; padding rows keep every entry (a finite, discarded
        # value; no all -inf row), as in info_nce
        excluded = ~far & slot_ok[:, None]
        excluded[rows, partner] = False
        lse = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)
        pos_logit = logits.gather(1, partner[:, None]).squeeze(1)
        n_ok = slot_ok.sum()
        loss = torch.where(slot_ok, lse - pos_logit, 0.0).sum() / n_ok.clamp_min(1).float()
        # the partner is the positive, never also a negative (even when farther than r_neg)
        n_neg = far.sum() - far.gather(1, partner[:, None]).sum()
    per_voxel = 1.0 / n_ok.clamp_min(1).float()
    stats = {"mean_pos": (n_ok > 0).float().detach(), "mean_neg": (n_neg * per_voxel).detach(),
             "num_anchors": n_ok.float().detach(), "num_pairs": m.sum().float().detach()}
    return loss, stats
