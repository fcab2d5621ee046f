"""DrasCLR's loss: Yu et al. 2023, "DrasCLR: A self-supervised framework of learning disease-related and
anatomy-specific representation for 3D medical images" (location-conditioned features; negatives from the same
location in other subjects, held in a location-binned queue)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _queue_nce(q: Tensor, k_pos: Tensor, neg: Tensor, neg_mask: Tensor, temperature: float) -> Tensor:
    """Per-query -log softmax of the positive against the masked negatives.

    q (B,K,D), k_pos (B,D), neg (B,C,D), neg_mask (B,C) -> (B,K). The positive logit is always
    in the denominator, so rows without negatives give exactly 0 and never an all -inf row."""
    l_pos = torch.einsum("bkd,bd->bk", q, k_pos) / temperature
    l_neg = torch.einsum("bkd,bcd->bkc", q, neg) / temperature
    l_neg = l_neg.masked_fill(~neg_mask[:, None, :], float("-inf"))
    return torch.logsumexp(torch.cat((l_pos[..., None], l_neg), dim=2), dim=2) - l_pos


def drasclr_loss(q_anchor: Tensor, k_positive: Tensor, q_neighbors: Optional[Tensor], neg_keys: Tensor,
                 neg_mask: Tensor, temperature: float = 0.2, beta: float = 1.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DrasCLR's local + neighbourhood contrast against location-binned queue negatives.

    l_local(b) = -log( e^{q_b.k_b/t} / (e^{q_b.k_b/t} + sum_{n valid} e^{q_b.n/t}) ); the neighbour term is the
    same with each neighbour query q_{b,k} in place of q_b (same positive key, same negatives).
    loss = mean_b l_local + beta * mean_{b,k} l_neighbour. Keys (positive and negatives) are momentum-encoder
    outputs and are treated as constants. All vectors are L2-normalised (a no-op for unit inputs); computed in
    float32 regardless of autocast.

    Args:
        q_anchor (B,D), k_positive (B,D), q_neighbors (B,K,D) or None, neg_keys (B,C,D), neg_mask (B,C) bool.

    Returns:
        (loss, stats) with detached 'local', 'neighbour' and 'mean_neg' (valid negatives per anchor).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=q_anchor.device.type, enabled=False):
        q = F.normalize(q_anchor.float(), dim=-1)
        k = F.normalize(k_positive.detach().float(), dim=-1)
        neg = F.normalize(neg_keys.detach().float(), dim=-1)
        mask = neg_mask.to(device=q.device, dtype=torch.bool)
        b = q.shape[0]
        if k.shape != q.shape or neg.shape[0] != b or neg.shape[2:] != q.shape[1:] or mask.shape != neg.shape[:2]:
            raise ValueError(f"shape mismatch: q_anchor {tuple(q.shape)}, k_positive {tuple(k.shape)}, "
                             f"neg_keys {tuple(neg.shape)}, neg_mask {tuple(mask.shape)}")
        # sum / count instead of mean: an empty batch gives 0, not NaN.
        local = _queue_nce(q[:, None], k, neg, mask, temperature).sum() / max(b, 1)
        if q_neighbors is not None:
            qn = F.normalize(q_neighbors.float(), dim=-1)
            if qn.dim() != 3 or qn.shape[0] != b or qn.shape[2] != q.shape[1]:
                raise ValueError(f"q_neighbors must be ({b}, K, {q.shape[1]}), got {tuple(qn.shape)}")
            neighbour = _queue_nce(qn, k, neg, mask, temperature).sum() / max(qn.shape[0] * qn.shape[1], 1)
        else:
            neighbour = local.new_zeros(())
        loss = local + beta * neighbour
        stats = {
            "local": local.detach(),
            "neighbour": neighbour.detach(),
            "mean_neg": mask.sum(1).float().sum().detach() / max(b, 1),
        }
    return loss, stats
