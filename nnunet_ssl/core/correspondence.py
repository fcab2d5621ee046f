"""Voxel correspondences between two augmented views of one volume."""
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native


def _flatten_coords(coords: Tensor) -> Tensor:
    # (B, 3, *S) -> (B, prod(S), 3)
    return coords.flatten(2).transpose(1, 2).float()


def argmin_last(x: Tensor, block: int = 64) -> Tensor:
    """``x.argmin(dim=-1)`` (first occurrence of the minimum) of a floating-point tensor without NaNs, faster.

    On CPU torch's argmin over the last dim costs about 13x its amin: minima of blocks of ``block`` values, the
    first block holding the overall minimum, then the argmin inside that block give the same index in a fraction
    of the time (1.6 -> 0.4 ms for Spade's (4, 256, 2304) search on one core)."""
    n = x.shape[-1]
    if n <= 2 * block:
        return x.argmin(dim=-1)
    pad = (-n) % block
    if pad:
        x = F.pad(x, (0, pad), value=float("inf"))
    blocks = x.reshape(*x.shape[:-1], -1, block)
    first = blocks.amin(dim=-1).argmin(dim=-1)  # (...,) index of the first block holding the minimum
    inside = torch.gather(blocks, -2, first[..., None, None].expand(*first.shape, 1, block)).squeeze(-2)
    return first * block + inside.argmin(dim=-1)


def sample_correspondences(
    coords_a: Tensor,
    valid_a: Tensor,
    coords_b: Tensor,
    valid_b: Tensor,
    num_samples: int,
    tolerance: float,
    generator: Optional[torch.Generator] = None,
    candidate_factor: Optional[float] = 4.0,
    search: str = "auto",
) -> Dict[str, Tensor]:
    """Sample matching voxel pairs between view a and view b, per batch item.

    Each voxel of a view holds the position (common voxel frame of the underlying
    volume) it shows. Up to ``num_samples`` distinct valid voxels of view a whose
    nearest valid voxel of view b lies within ``tolerance`` are drawn uniformly at
    random; each is paired with that nearest voxel.

    To bound memory, nearest neighbours are only searched for a random subset of
    ``candidate_factor * num_samples`` eligible a-voxels (all of them when
    ``candidate_factor`` is None or they are fewer). Eligible means valid and inside
    the bounding box of view b's valid positions grown by ``tolerance``, which no
    matching voxel can lie outside of; this keeps the hit rate high for partially
    overlapping views.

    ``search``: how the nearest valid b voxel is found, with the same result either way (up to exact ties):
    'brute' ranks all of view b in a (B, candidates, prod(S)) distance matrix; 'window' fits an affine map to view
    b's coordinates and looks only at the few voxels that can lie within ``tolerance`` (``_window_nearest``);
    'native' runs the whole matching in compiled C (``native.match_voxels``: a grid of cells of view b's positions;
    CPU only, the window elsewhere or where no C compiler is found); 'auto' takes 'native' on CPU, where the
    matrix's memory traffic and the window's many small operations dominate the search, and brute force on other
    devices, where the matrix is cheap and the window's Python-side sizing would wait for the device.

    Returns a dict with, for K = num_samples:
        'index_a', 'index_b': long (B, K) flat indices into the spatial dims,
        'mask': bool (B, K), False for padding slots (too few correspondences),
        'distance': float (B, K) distance between the paired positions.
    Padding slots hold index 0 and distance 0.
    """
    if coords_a.shape != coords_b.shape:
        raise ValueError(f"views must have equal shapes, got {tuple(coords_a.shape)} and {tuple(coords_b.shape)}")
    if coords_a.dim() not in (4, 5) or coords_a.shape[1] != 3:
        raise ValueError(f"expected coords (B, 3, *S) with 2 or 3 spatial dims, got {tuple(coords_a.shape)}")
    spatial = (coords_a.shape[0],) + tuple(coords_a.shape[2:])
    if tuple(valid_a.shape) != spatial or tuple(valid_b.shape) != spatial:
        raise ValueError(f"valid masks must be {spatial}, got {tuple(valid_a.shape)} and {tuple(valid_b.shape)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if search not in ("auto", "brute", "window", "native"):
        raise ValueError(f"search must be 'auto', 'brute', 'window' or 'native', got {search!r}")
    bsz = coords_a.shape[0]
    return match_voxels(_flatten_coords(coords_a), valid_a.reshape(bsz, -1), _flatten_coords(coords_b),
                        valid_b.reshape(bsz, -1), tuple(coords_b.shape[2:]), num_samples, tolerance, generator,
                        candidate_factor, search)


def candidate_count(n: int, num_samples: int, candidate_factor: Optional[float] = 4.0) -> int:
    """How many of a view's n voxels the matching searches for ``num_samples`` matches (all with no factor)."""
    return n if candidate_factor is None else min(n, max(num_samples, int(math.ceil(candidate_factor * num_samples))))


def match_voxels(pa: Tensor, va: Tensor, pb: Tensor, vb: Tensor, shape: Tuple[int, ...], num_samples: int,
                 tolerance: float, generator: Optional[torch.Generator] = None,
                 candidate_factor: Optional[float] = 4.0, search: str = "auto") -> Dict[str, Tensor]:
    """``sample_correspondences`` on flat views: positions pa, pb (B, V, 3) and validity va, vb (B, V) of views
    whose voxels lie on the grid ``shape`` (row-major, V = prod(shape)); the same result, without the checks and
    the layout change (the dense loss lays out the positions of all its views once)."""
    device = pa.device
    bsz = pa.shape[0]
    k = num_samples
    n = pa.shape[1]
    va = va.to(device=device, dtype=torch.bool)
    vb = vb.to(device=device, dtype=torch.bool)
    m = candidate_count(n, k, candidate_factor)
    # one random score per voxel of view a: the eligible voxels with the m highest are the candidates, and the
    # matches among them with the k highest fill the slots (the first k matches of a random order of the eligible
    # voxels: a uniform choice among the candidates' matches)
    scores = torch.rand(bsz, n, generator=generator, device=device)
    auto_cpu = search == "auto" and device.type == "cpu"
    if search == "native" or auto_cpu:
        out = native.match_voxels(pa, va, pb, vb, scores, m, k, tolerance)
        if out is not None:
            return out
    # float32 throughout: coordinates must stay exact to well below a voxel. Invalid voxels may hold arbitrary (even
    # non-finite) coordinates: view a's are zeroed, view b's are set infinitely far (never nearest, never within
    # tolerance). Python-scalar fills: a tensor made from a Python number would be copied to the device (a
    # synchronisation)
    pa = torch.where(va[..., None], pa.float(), 0.0)
    pb_far = torch.where(vb[..., None], pb.float(), float("inf"))
    lo = pb_far.amin(dim=1, keepdim=True) - tolerance
    hi = torch.where(vb[..., None], pb_far, float("-inf")).amax(dim=1, keepdim=True) + tolerance
    eligible = va & ((pa >= lo) & (pa <= hi)).all(dim=-1)

    # the candidates in descending score order, ineligible voxels pushed below
    cand_score, cand_idx = scores.masked_fill(~eligible, -1.0).topk(m, dim=1)
    cand_ok = cand_score >= 0
    cand_pos = torch.gather(pa, 1, cand_idx[..., None].expand(-1, -1, 3))  # (B, M, 3)

    found = None
    if search in ("window", "native") or auto_cpu:
        found = _window_nearest(cand_pos, pb_far, vb, shape, tolerance)
    if found is not None:
        nn_idx, d2 = found
    else:
        nn_idx = _brute_nearest(cand_pos, pb_far, vb)
        # the exact distance of the chosen pair (the expansion is only used to rank); infinite for an invalid voxel
        nn_pos = torch.gather(pb_far, 1, nn_idx[..., None].expand(-1, -1, 3))
        d2 = (cand_pos - nn_pos).square_().sum(dim=-1)
    dist = d2.sqrt_()
    match = cand_ok & (dist <= tolerance)

    # the k matches with the highest scores, in descending order
    kk = min(k, m)
    sel_score, sel = cand_score.masked_fill(~match, -1.0).topk(kk, dim=1)
    mask = sel_score >= 0
    # padding slots hold index 0 and distance 0
    picked = torch.gather(torch.stack((cand_idx, nn_idx), -1), 1, sel[..., None].expand(-1, -1, 2))
    picked = torch.where(mask[..., None], picked, 0)
    index_a, index_b = picked.unbind(-1)
    distance = torch.where(mask, torch.gather(dist, 1, sel), 0.0)
    if kk < k:
        pad = k - kk
        index_a = F.pad(index_a, (0, pad))
        index_b = F.pad(index_b, (0, pad))
        distance = F.pad(distance, (0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return {"index_a": index_a, "index_b": index_b, "mask": mask, "distance": distance}


def _brute_nearest(cand_pos: Tensor, pb: Tensor, vb: Tensor) -> Tensor:
    """Flat index of the nearest valid b voxel of every candidate, from all of view b: (B, M). pb: view b's
    positions, any value at invalid voxels."""
    # Rank b voxels by |b|^2 - 2<a, b> (the |a|^2 term is constant per row), in one (B, M, Sb) buffer; float32 even
    # under autocast, since half precision cannot resolve voxel coordinates.
    with torch.autocast(device_type=cand_pos.device.type, enabled=False):
        # both views centred on the mean valid b position: the expansion loses precision with large coordinates
        pb = torch.where(vb[..., None], pb, 0.0)
        centre = pb.sum(dim=1, keepdim=True) / vb.sum(dim=1).clamp_min(1)[:, None, None]
        pb = torch.where(vb[..., None], pb - centre, 0.0)
        cand_pos = cand_pos - centre
        # invalid b voxels get +inf in the per-column |b|^2 term (their coordinates are zeroed, so the product
        # term stays finite): cheaper than masking the whole (B, M, Sb) buffer afterwards
        norm_b = pb.pow(2).sum(-1).masked_fill(~vb, float("inf"))
        # bmm, then the column term added in place: the same numbers as baddbmm(norm_b, ., ., alpha=-2) (x -2 is
        # exact), without baddbmm's copy of the broadcast input into the (B, M, Sb) buffer (2x faster on CPU)
        score_b = torch.bmm(cand_pos * -2.0, pb.transpose(1, 2)).add_(norm_b[:, None, :])
        return argmin_last(score_b)


@functools.lru_cache(maxsize=8)
def _index_rows(shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """(prod(shape), nd + 1) float64: each voxel's index followed by a 1, in row-major order (read-only)."""
    axes = [torch.arange(n, device=device, dtype=torch.float64) for n in shape]
    ones = torch.ones(shape, device=device, dtype=torch.float64)
    return torch.stack(torch.meshgrid(*axes, indexing="ij") + (ones,), dim=-1).reshape(-1, len(shape) + 1)


@functools.lru_cache(maxsize=8)
def _halo_layout(shape: Tuple[int, ...], halo: Tuple[int, ...], device: torch.device) -> Tuple[Tensor, ...]:
    """A grid ``shape`` padded by ``halo`` voxels on both sides of each axis: the range of a box's first corner in
    unpadded indices, -halo and shape - 1 (nd,) float64 each, the halo (nd,) float64, the row-major strides of the
    padded grid (nd,) float64, the flat offsets of a box of halo + 1 voxels per axis from its first corner (W,), and
    each padded voxel's flat index in the unpadded grid (0 in the halo); all read-only."""
    padded = [n + 2 * h for n, h in zip(shape, halo)]
    strides = [math.prod(padded[d + 1:]) for d in range(len(shape))]
    box = torch.zeros((), dtype=torch.long, device=device)
    for d, h in enumerate(halo):
        box = box[..., None] + torch.arange(h + 1, device=device) * strides[d]
    original = F.pad(torch.arange(math.prod(shape), device=device).view(shape),
                     [h for h in reversed(halo) for _ in range(2)])
    as_float = functools.partial(torch.tensor, dtype=torch.float64, device=device)
    return (as_float([-h for h in halo]), as_float([n - 1 for n in shape]), as_float(halo), as_float(strides),
            box.reshape(-1), original.reshape(-1))


def _window_nearest(cand_pos: Tensor, pb: Tensor, vb: Tensor, shape: Tuple[int, ...],
                    tolerance: float) -> Optional[Tuple[Tensor, Tensor]]:
    """The nearest valid b voxel of every candidate among those that can lie within ``tolerance`` of it, or None
    when that window would not be much smaller than view b (then brute force is as cheap).

    View b's coordinates are fitted by an affine map of the voxel index, c(j) ~ A j + c0 (least squares over the
    valid voxels; exact for nnU-Net's rotations, scalings and mirrorings), with largest residual r. A valid voxel j
    within ``tolerance`` of a candidate p then has |A (j - u)| <= tolerance + r, u = A^-1 (p - c0) (any invertible
    A: r is measured, not assumed), hence |j_d - u_d| <= (tolerance + r) * |row d of A^-1| =: R_d: the box of
    L_d = floor(2 R_d) + 1 indices from ceil(u_d - R_d) holds every such voxel, so the nearest valid voxel in the box
    is the nearest of view b whenever one lies within tolerance (the only case that is used). Elastic deformation
    only widens the box through r. View b is padded by L_d - 1 invalid voxels per side, so that every box, its
    first corner clamped into the padded grid, is one fixed set of flat offsets (a clamped box still holds every
    voxel of the view its unclamped box held). pb (B, Sb, 3): view b's positions, any value at invalid voxels (as
    for _brute_nearest). Returns the flat indices (B, M) and the squared distances (B, M), infinite where the box
    held no valid voxel."""
    bsz, m = cand_pos.shape[:2]
    nd = len(shape)
    sb = pb.shape[1]
    if m == 0 or sb == 0:
        return None
    dev = pb.device
    with torch.autocast(device_type=dev.type, enabled=False):
        x = _index_rows(shape, dev)  # [j, 1] per voxel
        w = vb.to(torch.float64)[..., None]  # (B, Sb, 1)
        y = torch.where(vb[..., None], pb, 0.0).to(torch.float64)  # invalid voxels weigh 0 in the fit: finite
        xw_t = (x[None] * w).transpose(1, 2)  # (B, nd+1, Sb)
        # a view without any valid voxel gets a dummy fit (it never matches: its boxes hold no valid voxel); valid
        # voxels on a plane or a line make the fit singular: brute force then
        empty = ~vb.any(dim=1)[:, None, None]
        eye = torch.eye(nd + 1, device=dev, dtype=torch.float64)
        params, fit_info = torch.linalg.solve_ex(torch.where(empty, eye, xw_t @ x), xw_t @ y)  # (B, nd+1, 3)
        params = torch.where(empty, eye[:, :3], params)
        resid = ((x @ params).sub_(y).norm(dim=-1) * w[..., 0]).amax(dim=1)  # (B,) over valid voxels
        a = params[:, :nd].transpose(1, 2)  # (B, 3, nd)
        a_pinv, info = torch.linalg.solve_ex(a.transpose(1, 2) @ a, a.transpose(1, 2))  # (B, nd, 3)
        # (a hair wider than the bound: rounding in the fit and in u must not drop a voxel on the box's edge)
        radius = (tolerance + resid + 1e-4)[:, None] * a_pinv.norm(dim=-1) + 1e-6  # (B, nd)
        length = (torch.floor(2 * radius) + 1).amax(dim=0)  # (nd,) one box size for the batch
        # one read on the host for every decision
        *length, failed = torch.cat((length, (fit_info.ne(0) | info.ne(0)).any()[None].double())).tolist()
        if failed or not all(math.isfinite(v) for v in length) or math.prod(length) * 4 > sb:
            return None
        halo = tuple(int(v) - 1 for v in length)
        first, last, halo_t, strides, box, original = _halo_layout(tuple(shape), halo, dev)
        u = (cand_pos.to(torch.float64) - params[:, nd][:, None, :]) @ a_pinv.transpose(1, 2)  # (B, M, nd)
        # the box's first corner: the integers within R_d of u_d start at ceil(u_d - R_d); clamped into the padded
        # grid, kept in padded coordinates (+ halo)
        start = torch.ceil(u - radius[:, None, :]).clamp_(first, last)
        corner = ((start + halo_t) * strides).sum(-1).long()
        flat = (corner[..., None] + box).view(bsz, -1)  # (B, M * W) in the padded grid, row-major within each box
        # view b's positions, one plane per axis (a gather and a sum over planes: 2x faster than over (.., 3) rows),
        # padded; invalid voxels and the halo infinitely far
        far = torch.where(vb[:, None, :], pb.transpose(1, 2), float("inf")).reshape(bsz, 3, *shape)
        far = F.pad(far, [h for h in reversed(halo) for _ in range(2)], value=float("inf")).view(bsz, 3, -1)
        pos = torch.gather(far, 2, flat[:, None, :].expand(-1, 3, -1)).view(bsz, 3, m, -1)
        d2, best = pos.sub_(cand_pos.transpose(1, 2)[..., None]).square_().sum(dim=1).min(dim=-1)  # first occurrence:
        # ties go to the lowest flat index, as with brute force
        nn_idx = original[torch.gather(flat.view(bsz, m, -1), 2, best[..., None]).squeeze(-1)]
        return nn_idx, d2


def gather_at(feature_map: Tensor, flat_index: Tensor) -> Tensor:
    """Pick feature vectors at flat spatial indices: (B, C, *S), (B, K) -> (B, K, C)."""
    bsz, ch = feature_map.shape[:2]
    flat = feature_map.reshape(bsz, ch, -1)
    idx = flat_index.to(device=flat.device, dtype=torch.long)[:, None, :].expand(-1, ch, -1)
    return torch.gather(flat, 2, idx).transpose(1, 2)


def feature_grid(layers: Sequence[Tuple]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Where a chain of convolutions puts its output voxels: output voxel i's receptive field is centred on input
    position ``scale * i + offset`` (per axis, in input voxels).

    ``layers``: (kernel, stride, padding) of each convolution from the input on, each an int or a per-axis tuple.
    One layer maps its output index j to input position ``stride * j - padding + (kernel - 1) / 2``; composing
    them gives the affine map. nnU-Net's convolutions (odd kernel k, padding (k - 1) / 2) centre voxel i of a stage
    of total stride S exactly on input voxel S * i (offset 0), *not* on the centre S * i + (S - 1) / 2 of the block
    of S voxels it summarises: with mirrored views the best-matching feature voxels of the two views are then
    S - 1 input voxels apart, which the correspondence search has to allow for."""
    dims = max((len(v) for layer in layers for v in layer if isinstance(v, (tuple, list))), default=1)
    scale, offset = [1.0] * dims, [0.0] * dims

    def per_axis(v):
        return [float(x) for x in v] if isinstance(v, (tuple, list)) else [float(v)] * dims

    for kernel, stride, padding in layers:
        k, st, p = per_axis(kernel), per_axis(stride), per_axis(padding)
        for d in range(dims):
            offset[d] += scale[d] * (-p[d] + (k[d] - 1) / 2)
            scale[d] *= st[d]
    return tuple(scale), tuple(offset)


def sample_coords(coords: Tensor, valid: Tensor, scale: Sequence[float], offset: Sequence[float],
                  out_shape: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """A per-voxel coordinate map read at the receptive-field centres of a feature map (``feature_grid``).

    coords (B, 3, *S), valid (B, *S) -> (B, 3, *out_shape), (B, *out_shape). Centre ``scale * i + offset`` per
    axis; a fractional centre is interpolated linearly between its two neighbours (exact for the affine fields the
    loader makes). A feature voxel is valid when the voxels it is read from are valid and inside the crop."""
    nd = coords.dim() - 2
    if nd not in (2, 3) or len(scale) != nd or len(offset) != nd or len(out_shape) != nd:
        raise ValueError(f"sample_coords: coords {tuple(coords.shape)} with scale {tuple(scale)}, offset "
                         f"{tuple(offset)}, out_shape {tuple(out_shape)}: expected 2 or 3 spatial dims throughout")
    c = coords.float()
    v = valid.bool()
    for d in range(nd):
        size = c.shape[2 + d]
        n_out, st, off = int(out_shape[d]), float(scale[d]), float(offset[d])
        if st.is_integer() and off.is_integer() and n_out > 0 and off >= 0 and off + st * (n_out - 1) <= size - 1:
            # centres on whole voxels, all inside (nnU-Net's odd-kernel strides: offset 0): a strided view, no
            # arithmetic and no copy (the interpolation below would read every voxel twice, weighting one by 0)
            axis = slice(int(off), int(off) + int(st) * (n_out - 1) + 1, int(st))
            c = c[(slice(None),) * (2 + d) + (axis,)]
            v = v[(slice(None),) * (1 + d) + (axis,)]
            continue
        pos = torch.arange(int(out_shape[d]), device=c.device, dtype=torch.float64) * float(scale[d]) + float(offset[d])
        lo = torch.floor(pos)
        w = (pos - lo).to(c.dtype)
        hi = torch.where(w > 0, lo + 1, lo)
        inside = (lo >= 0) & (hi <= size - 1)
        lo_i, hi_i = lo.clamp(0, size - 1).long(), hi.clamp(0, size - 1).long()
        shape = [1] * (nd + 2)
        shape[2 + d] = -1
        c = c.index_select(2 + d, lo_i) * (1 - w).view(shape) + c.index_select(2 + d, hi_i) * w.view(shape)
        shape_v = shape[1:]
        v = v.index_select(1 + d, lo_i) & v.index_select(1 + d, hi_i) & inside.view(shape_v)
    return (c.to(coords.dtype) if coords.is_floating_point() else c), v
