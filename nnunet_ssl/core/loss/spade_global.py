"""Spade's global (invariant, crop-level) loss (Zhang et al., 2022, Spade): positives are corresponding crops, also
across patients; negatives only far-away crops, with an ambiguous band left out."""
from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

from ..selection import contrastive_masks
from .info_nce import info_nce


def spade_global_loss(embeddings: Tensor, centers: Tensor, sample_index: Tensor, r_pos: float, r_neg: float,
                      temperature: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Crop-level contrast with spatial-prior selection.

    Positives of anchor i: its other view and every crop (any case) whose canonical centre is closer than
    ``r_pos``; negatives: crops farther than ``r_neg``; the band in between is left out of the denominator
    (likely false negatives are not pushed away). embeddings (N,D) unit vectors, centers (N,3) canonical."""
    pos, neg = contrastive_masks(centers, sample_index, r_pos, r_neg)
    return info_nce(embeddings, None, pos, neg, temperature)
