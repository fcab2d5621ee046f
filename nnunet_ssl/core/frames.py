"""Coordinate frames of a crop: preprocessed voxel index -> canonical [0,1]^3 and physical mm.

nnU-Net preprocessing transposes a case (``transpose_forward``), crops it to its non-zero bounding box
and resamples it to the target spacing. The maps below invert that chain for voxel *centres*, using
the resampling convention of nnU-Net's resizers (skimage-style, ``align_corners=False``):
``original_index = bbox_lo + (preprocessed_index + 0.5) * s - 0.5`` with
``s = shape_after_cropping / shape_preprocessed``. Everything is in the transposed (network) axis order.

The canonical frame maps the case's *original* image extent to [0,1] per axis (voxel edges at 0 and 1),
which makes positions comparable across patients regardless of field of view, cropping and spacing.
Pure numpy/torch: nothing here knows about nnU-Net.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class CaseFrame:
    """Per-axis affine maps ``y = x * scale + offset`` from preprocessed voxel index x (all (3,) float64)."""

    canonical_scale: np.ndarray
    canonical_offset: np.ndarray
    mm_scale: np.ndarray
    mm_offset: np.ndarray

    def to_canonical(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(index, dtype=np.float64) * self.canonical_scale + self.canonical_offset


def case_frame(bbox_lo: Sequence[int], shape_after_cropping: Sequence[int], shape_preprocessed: Sequence[int],
               shape_before_cropping: Sequence[int], spacing: Sequence[float]) -> CaseFrame:
    """All arguments in transposed axis order; ``spacing`` is the original (pre-resampling) spacing in mm."""
    lo = np.asarray(bbox_lo, dtype=np.float64)
    after = np.asarray(shape_after_cropping, dtype=np.float64)
    pre = np.asarray(shape_preprocessed, dtype=np.float64)
    before = np.asarray(shape_before_cropping, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    if not (len(lo) == len(after) == len(pre) == len(before) == len(sp) == 3):
        raise ValueError("case_frame expects 3 values per argument (one per spatial axis of the volume)")
    if np.any(pre <= 0) or np.any(before <= 0):
        raise ValueError(f"case_frame got an empty volume: preprocessed shape {pre}, original shape {before}")
    s = after / pre
    # original (transposed) voxel index of preprocessed voxel centre x: lo + (x + 0.5) * s - 0.5
    canonical_scale = s / before
    canonical_offset = (lo + 0.5 * s) / before  # (orig_index + 0.5) / before
    mm_scale = s * sp
    mm_offset = (lo + 0.5 * s - 0.5) * sp
    return CaseFrame(canonical_scale, canonical_offset, mm_scale, mm_offset)


def apply_axis_affine(coords: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """coords (N,3,*S) or (N,3); scale/offset (N,3) -> same shape as coords."""
    view = (coords.shape[0], coords.shape[1]) + (1,) * (coords.ndim - 2)
    return coords * scale.reshape(view).to(coords) + offset.reshape(view).to(coords)


def canonical_boxes(coords: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    """Axis-aligned box (N,3,2) [lo, hi] in the canonical frame covered by each crop's valid voxels.

    coords (N,3,*S) preprocessed voxel positions, valid (N,*S); rows without a valid voxel get an empty box
    (lo = hi = 0)."""
    can = apply_axis_affine(coords.float(), scale, offset).flatten(2)  # (N,3,V)
    v = valid.flatten(1)[:, None, :].expand_as(can)
    lo = torch.where(v, can, torch.full_like(can, float("inf"))).amin(2)
    hi = torch.where(v, can, torch.full_like(can, float("-inf"))).amax(2)
    empty = ~valid.flatten(1).any(1)
    lo[empty] = 0
    hi[empty] = 0
    return torch.stack((lo, hi), 2)
