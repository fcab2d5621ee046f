"""Spade's local (equivariant, dense) loss: Zhang et al. 2022 (Spade); voxel-level contrast between the exactly
corresponding feature voxels of two augmented views of a crop."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import native
from ..correspondence import candidate_count, match_voxels, sample_coords
from ..selection import view_pairs
from .info_nce import unit_rows
from .masked_logsumexp import masked_logsumexp


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
    # the positions of every view's feature voxels, laid out once for the matching and the loss: (N, V, 3), (N, V)
    pos = c_feat.movedim(1, -1).reshape(len(c_feat), -1, 3).float().contiguous()  # one copy of the strided map
    ok = v_feat.flatten(1)
    tol = tolerance * float(max(scale))
    n_vox = math.prod(expect)
    # rows (2P,), P = B * K: slot j of view a, then the same slots of view b; voxels are read straight from the maps
    # by flat (view, voxel) index, without copying whole feature maps per view. The denominator of row i: its
    # negatives (other real slots farther than r_neg) and its positive, its corresponding voxel in the other view,
    # row (i + P) mod 2P (never also a negative, even when farther than r_neg); a padding row keeps only its
    # partner (a finite, discarded value)
    if (search in ("native", "auto") and pos.device.type == "cpu" and math.isfinite(tol)
            and native.library() is not None):
        # on CPU, the whole selection in one C call, from the same random scores: the same rows and masks
        scores = torch.rand(len(a), n_vox, generator=generator, device=pos.device)
        flat, slot_ok, keep, count = native.dense_selection(  # (on the CPU and with the library: never None)
            pos, ok, a, b, scores, canonical_scale, canonical_offset, candidate_count(n_vox, num_samples),
            num_samples, tol, r_neg)
        n_neg = torch.tensor(float(count))
        p = len(flat) // 2
    else:
        # pair selection needs no gradients: in inference mode its operations skip autograd's and the views'
        # bookkeeping; its results are only read (indices, masks), never saved for backward
        with torch.inference_mode():
            corr = match_voxels(pos.index_select(0, a), ok.index_select(0, a), pos.index_select(0, b),
                                ok.index_select(0, b), expect, num_samples, tol, generator=generator, search=search)
        k = corr["mask"].shape[1]
        views = torch.cat((a, b))
        flat = (views[:, None] * n_vox + torch.cat((corr["index_a"], corr["index_b"]))).reshape(-1)
        # (2P, 3) canonical positions: the views' preprocessed voxel positions, each view's (scale, offset) applied
        x = pos.view(-1, 3).index_select(0, flat).view(len(views), k, 3)
        x = (x * canonical_scale.to(x).index_select(0, views)[:, None, :]
             + canonical_offset.to(x).index_select(0, views)[:, None, :]).view(-1, 3)
        m = corr["mask"].reshape(-1)
        slot_ok = torch.cat((m, m))
        p = m.numel()
        with torch.inference_mode():
            keep = far_pairs(x, slot_ok, r_neg)
            keep.diagonal(p).fill_(1.0)
            keep.diagonal(-p).fill_(1.0)
        n_neg = keep.sum() - 2 * p
    with torch.autocast(device_type=dense.device.type, enabled=False):
        # float32: the logits at low temperature overflow / underflow half precision
        z = unit_rows(_voxel_rows(dense, flat).float())  # (2P, C)
        q = z * (1.0 / temperature)
        # |<q_i, z_j>| <= 1 / temperature for unit vectors: that bound is the shift of the log-sum-exp
        lse = masked_logsumexp(q, z, keep, 1.0 / temperature)
        # the positive logit of row i is <q_i, z_(i + P) mod 2P>, the same for both rows of a pair: P dot products
        pos_logit = (q[:p] * z[p:]).sum(1)
        n_ok = slot_ok.sum().float()
        per_voxel = 1.0 / n_ok.clamp_min(1)
        pos_sum = torch.where(slot_ok[:p], pos_logit, 0.0).sum()
        loss = (torch.where(slot_ok, lse, 0.0).sum() - 2.0 * pos_sum) * per_voxel
    stats = {"mean_pos": (n_ok > 0).float(), "mean_neg": (n_neg * per_voxel).detach(), "num_anchors": n_ok,
             "num_pairs": n_ok / 2}
    return loss, stats


def _voxel_rows(dense: Tensor, flat: Tensor) -> Tensor:
    """Feature vectors (len(flat), C) of the voxels ``flat`` = map * V + voxel of dense (N, C, *S'), V voxels per
    map. A channels-last map is already a (N * V, C) table: rows are read from it directly (and the gradient comes
    back channels-last); other layouts are read by advanced indexing, without copying the map into that table."""
    rows = dense.movedim(1, -1)
    if rows.is_contiguous():
        return rows.reshape(-1, dense.shape[1]).index_select(0, flat)
    n_vox = rows.shape[1:-1].numel()
    return dense.flatten(2)[flat // n_vox, :, flat % n_vox]


# far_pairs computes in float32 on CPU where r^2 is at least this fraction of R^2 (R: the points' largest distance from
# their centre): float32's rounding of the product, ~1e-6 R^2, then stays two orders of magnitude below r^2
FLOAT32_MIN_RADIUS2 = 1e-4


def far_pairs(x: Tensor, ok: Tensor, radius: float) -> Tensor:
    """(n, n) float32 1.0 where rows i and j are both ``ok`` and |x_i - x_j| > ``radius``, else 0.0; x (n, 3).

    From one product of rows [x, |x|^2, 1] and [-2 x, 1, |x|^2 - r^2] (d^2 - r^2 per pair), with r^2 at least 1e-12;
    rows and columns that are not ``ok`` get -1e30 in the constant terms. The sign, clamped at 0, is the mask: as
    fast as a copy, where a comparison and a boolean mask cost 4-8x at 512 x 512 on CPU. In float64 the product is
    exact to ~1e-16 of |x|^2: points closer than 1e-6 count as coincident (two slots on one voxel are never each
    other's negatives, also at radius 0). On CPU, where r^2 >= 1e-4 R^2 (R: the largest distance of an ok row from
    the ok rows' mean), the product is float32 on centred coordinates (~3x cheaper): its rounding, ~1e-6 R^2,
    cannot make coincident points far; only pairs within ~1e-6 R^2 of r^2 may go either way. MPS (no float64):
    float32 always."""
    r2 = max(radius * radius, 1e-12)
    okc = ok[:, None]
    x = torch.where(okc, x.float(), 0.0)  # rows that are not ok are masked by their offsets: any value there
    if x.device.type in ("cpu", "mps"):
        centred = torch.where(okc, x - x.sum(0) / ok.sum().clamp_min(1), 0.0)  # on the ok rows' mean
        if x.device.type == "mps" or r2 >= FLOAT32_MIN_RADIUS2 * float(centred.square().sum(1).amax()):
            x = centred
        else:
            x = x.double()
    else:  # CUDA: deciding would read the device; float64 at this size costs nothing there
        x = x.double()
    n2 = x.square().sum(1, keepdim=True)
    one = torch.ones_like(n2)
    off = torch.where(okc, 0.0, -1e30)
    left = torch.cat((x, n2 + off, one), 1)
    right = torch.cat((-2.0 * x, one, n2 - r2 + off), 1)
    return torch.sign((left @ right.t()).float()).clamp_(min=0.0)
