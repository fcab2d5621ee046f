"""Pure-tensor core of the methods (depends on torch only): losses in ``loss/`` (one per file), and the building
blocks they use here."""
from .affinity import box_overlap_affinity
from .correspondence import feature_grid, gather_at, sample_coords, sample_correspondences
from .heads import DenseProjectionHead, GlobalProjectionHead, LocationConditionedHead, ReconstructionHead
from .loss import (affinity_weighted_loss, dense_correspondence_loss, drasclr_loss, info_nce, masked_reconstruction_loss,
                   pdcr_loss, spade_global_loss)
from .masking import block_mask
from .momentum import momentum_update
from .queue import LocationBinnedQueue, PositionedQueue
from .selection import contrastive_masks, instance_masks, positional_masks, view_pairs

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
    "PositionedQueue",
    "drasclr_loss",
    "momentum_update",
    "sample_correspondences",
    "gather_at",
    "feature_grid",
    "sample_coords",
    "ReconstructionHead",
    "block_mask",
    "masked_reconstruction_loss",
    "pdcr_loss",
    "spade_global_loss",
    "dense_correspondence_loss",
    "view_pairs",
]
