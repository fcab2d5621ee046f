"""Continuous pair affinities in [0, 1] from geometry, for affinity-weighted contrast."""
import torch
from torch import Tensor


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def box_overlap_affinity(boxes: Tensor) -> Tensor:
    """Overlap of axis-aligned boxes relative to the smaller one: vol(i n j) / min(vol_i, vol_j).

    Args:
        boxes: (N, 3, 2) per-axis [lo, hi) bounds in a common frame.

    Returns:
        (N, N) symmetric affinities in [0, 1]: 1 on the diagonal and for nested boxes, 0 for
        disjoint or touching ones. A box with zero volume has affinity 0 to every other box.
    """
    if boxes.dim() != 3 or boxes.shape[2] != 2:
        raise ValueError(f"expected boxes (N, D, 2), got {tuple(boxes.shape)}")
    b = _as_float(boxes)
    lo, hi = b[..., 0], b[..., 1]
    vol = (hi - lo).clamp_min(0).prod(-1)
    inter = (
        (torch.minimum(hi[:, None], hi[None, :]) - torch.maximum(lo[:, None], lo[None, :]))
        .clamp_min(0)
        .prod(-1)
    )
    smaller = torch.minimum(vol[:, None], vol[None, :])
    # Guarded division: zero-volume pairs get 0 instead of 0/0.
    aff = torch.where(smaller > 0, inter / smaller.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(inter))
    eye = torch.eye(b.shape[0], dtype=torch.bool, device=b.device)
    return torch.where(eye, torch.ones_like(aff), aff.clamp(0.0, 1.0))
