"""Pure-tensor core of the contrastive pretraining methods (depends on torch only)."""
from .affinity import box_overlap_affinity
from .correspondence import feature_grid, gather_at, sample_coords, sample_correspondences
from .heads import DenseProjectionHead, GlobalProjectionHead, LocationConditionedHead, ReconstructionHead
from .losses import affinity_weighted_loss, info_nce
from .objectives import drasclr_loss, momentum_update
from .queue import LocationBinnedQueue
from .reconstruction import block_mask, masked_reconstruction_loss
from .selection import contrastive_masks, instance_masks, positional_masks

__all__ = [
    "contrastive_masks",
    "instance_masks",
    "positional_masks",
    "info_nce",
    "affinity_weighted_loss",
    "box_overlap_affinity",
    "GlobalProjectionHead",
    "DenseProjectionHead",
    "LocationConditionedHead",
    "LocationBinnedQueue",
    "drasclr_loss",
    "momentum_update",
    "sample_correspondences",
    "gather_at",
    "feature_grid",
    "sample_coords",
    "ReconstructionHead",
    "block_mask",
    "masked_reconstruction_loss",
]
