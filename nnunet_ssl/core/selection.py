"""Pair selection: which rows of a batch are positives and negatives of each other (Spade's spatial prior,
SimCLR's instances, PCL's positions), and which rows are the two views of one crop."""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import native


def contrastive_masks(
    coords: Tensor,
    group_ids: Tensor,
    r_pos: float,
    r_neg: float,
    valid: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Build positive and negative pair masks from positions and group membership.

    Args:
        coords: (N, 3) positions in a common frame (e.g. canonical crop centres).
        group_ids: (N,) long; entries sharing an id are always positives
            (the views of one crop, or a voxel and its corresponding voxel).
        r_pos: pairs closer than this are positives as well; 0 disables that.
        r_neg: pairs farther than this (and not positive) are negatives.
            Pairs in the band r_pos <= d <= r_neg are neither (too ambiguous).
        valid: optional (N,) bool; invalid entries (padding) are never paired.

    Returns:
        (pos_mask, neg_mask), both bool (N, N), disjoint, with a false diagonal.
    """
    if r_neg < r_pos:
        raise ValueError(f"r_neg ({r_neg}) must be >= r_pos ({r_pos})")
    if coords.dim() != 2 or group_ids.dim() != 1 or coords.shape[0] != group_ids.shape[0]:
        raise ValueError(
            f"expected coords (N, D) and group_ids (N,), got {tuple(coords.shape)} and {tuple(group_ids.shape)}"
        )
    fast = native.contrastive_masks(coords, group_ids, r_pos, r_neg)  # on CPU: one call instead of ~10 operations
    if fast is not None:
        pos, neg = fast
    else:
        c = coords.float()
        # Direct differences rather than the matmul expansion, which loses precision for large coordinates.
        dist = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")
        pos = (group_ids[:, None] == group_ids[None, :]) | (dist < r_pos)
        pos.fill_diagonal_(False)
        neg = (dist > r_neg) & ~pos
        neg.fill_diagonal_(False)
    if valid is not None:
        v = valid.to(device=coords.device, dtype=torch.bool)
        both = v[:, None] & v[None, :]
        pos &= both
        neg &= both
    return pos, neg


def instance_masks(group_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """SimCLR / NT-Xent selection: positives share a group (the other views), all other rows are negatives.

    Args:
        group_ids: (N,) ids; rows with the same id are views of one instance.

    Returns:
        (pos_mask, neg_mask), bool (N, N), disjoint, with a false diagonal.
    """
    if group_ids.dim() != 1:
        raise ValueError(f"expected group_ids (N,), got {tuple(group_ids.shape)}")
    n = group_ids.shape[0]
    same = group_ids[:, None] == group_ids[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=group_ids.device)
    return pos, ~same


def positional_masks(
    positions: Tensor, delta: float, group_ids: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """PCL selection (Zeng et al. 2021): slices at nearby normalised positions are positives.

    pos_ij: i != j and (|p_i - p_j| < delta, or same group when ``group_ids`` is given);
    neg_ij: every other non-self pair (PCL has no excluded band).

    Args:
        positions: (N,) scalar positions, e.g. the normalised slice position in the volume.
        delta: positional threshold.
        group_ids: optional (N,) ids that make rows positives regardless of position.

    Returns:
        (pos_mask, neg_mask), bool (N, N), disjoint, with a false diagonal.
    """
    if positions.dim() != 1:
        raise ValueError(f"expected positions (N,), got {tuple(positions.shape)}")
    n = positions.shape[0]
    # float64: exact for float32 inputs, so threshold ties behave as in plain Python arithmetic.
    p = positions.double()
    close = (p[:, None] - p[None, :]).abs() < delta
    if group_ids is not None:
        if group_ids.shape != positions.shape:
            raise ValueError(
                f"group_ids {tuple(group_ids.shape)} must match positions {tuple(positions.shape)}"
            )
        close = close | (group_ids[:, None] == group_ids[None, :])
    off_diag = ~torch.eye(n, dtype=torch.bool, device=positions.device)
    pos = off_diag & close
    return pos, off_diag & ~pos


def view_pairs(sample_index: Tensor) -> Tuple[Tensor, Tensor]:
    """Row indices (a, b) of the two views of each crop, ordered by crop; works for any row order.

    The layout check reads the values, which on an accelerator would wait for every queued kernel: it runs for
    host tensors only (the engine checks each loader batch on the host before moving it to the device). A host
    batch's layout repeats from step to step: its pairs are kept per layout (read-only tensors)."""
    if sample_index.device.type == "cpu" and sample_index.dim() == 1 and len(sample_index) <= 4096:
        return _host_view_pairs(tuple(sample_index.tolist()))
    return _view_pairs(sample_index)


@functools.lru_cache(maxsize=64)
def _host_view_pairs(layout: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # kept for training steps too: never inference tensors
        return _view_pairs(torch.tensor(layout, dtype=torch.long))


def _view_pairs(sample_index: Tensor) -> Tuple[Tensor, Tensor]:
    order = torch.argsort(sample_index, stable=True)
    a, b = order[0::2], order[1::2]
    if len(a) != len(b) or (sample_index.device.type == "cpu" and not torch.equal(sample_index[a], sample_index[b])):
        raise ValueError("every crop must appear exactly twice in the batch (two views)")
    return a, b
