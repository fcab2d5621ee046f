"""Spade's global (invariant, crop-level) loss (Zhang et al., 2022, Spade): positives are corresponding crops, also
across patients; negatives only far-away crops, with an ambiguous band left out."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..selection import contrastive_masks
from .info_nce import info_nce


def spade_global_loss(embeddings: Tensor, centers: Tensor, sample_index: Tensor, r_pos: float, r_neg: float,
                      temperature: float, queue_keys: Optional[Tensor] = None, queue_centers: Optional[Tensor] = None,
                      queue_filled: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Crop-level contrast with spatial-prior selection.

    Positives of anchor i: its other view and every crop (any case) whose canonical centre is closer than
    ``r_pos``; negatives: crops farther than ``r_neg``; the band in between is left out of the denominator
    (likely false negatives are not pushed away). embeddings (N,D) unit vectors, centers (N,3) canonical.

    With a queue of earlier steps' keys (queue_keys (Q,D), queue_centers (Q,3), queue_filled (Q,) bool), the filled
    entries farther than ``r_neg`` from the anchor are negatives as well; nearer ones are left out (a queued key is
    never a positive: it may be a stale view of the anchor's own crop)."""
    pos, neg = contrastive_masks(centers, sample_index, r_pos, r_neg)
    if queue_keys is None:
        return info_nce(embeddings, None, pos, neg, temperature)
    if queue_centers is None or queue_filled is None:
        raise ValueError("a queue needs its keys, centres and filled mask")
    far = torch.cdist(centers.float(), queue_centers.to(centers).float(),
                      compute_mode="donot_use_mm_for_euclid_dist") > r_neg
    q_neg = far & queue_filled.to(device=far.device, dtype=torch.bool)[None, :]
    candidates = torch.cat((embeddings.float(), queue_keys.to(embeddings.device).float()), 0)
    pos = torch.cat((pos, torch.zeros_like(q_neg)), 1)
    neg = torch.cat((neg, q_neg), 1)
    return info_nce(embeddings, candidates, pos, neg, temperature)
