"""Pure-tensor core of the Spade contrastive pretraining (depends on torch only)."""
from .correspondence import downsample_coords, gather_at, sample_correspondences
from .heads import DenseProjectionHead, GlobalProjectionHead
from .losses import info_nce
from .selection import contrastive_masks, pair_statistics

__all__ = [
    "contrastive_masks",
    "pair_statistics",
    "info_nce",
    "GlobalProjectionHead",
    "DenseProjectionHead",
    "sample_correspondences",
    "gather_at",
    "downsample_coords",
]
