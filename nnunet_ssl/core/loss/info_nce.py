"""Multi-positive InfoNCE over selection masks: the contrastive loss under every crop-level and dense
branch of the plugin (van den Oord et al. 2018, "Representation learning with contrastive predictive coding";
multi-positive "L_out" form of Khosla et al. 2020, "Supervised contrastive learning")."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(
    anchors: Tensor,
    candidates: Optional[Tensor],
    pos_mask: Tensor,
    neg_mask: Tensor,
    temperature: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Multi-positive InfoNCE (supervised-contrastive "L_out" form).

    For anchor i with positives P_i and negatives N_i:
        L_i = -1/|P_i| * sum_{p in P_i} [s_ip - logsumexp_{a in P_i u N_i} s_ia],
    s_ij = <a_i, c_j> / temperature. Entries that are neither positive nor negative
    do not enter the denominator. The loss is the mean of L_i over anchors with at
    least one positive; with none, a zero still attached to the graph is returned.

    Inputs are expected to be L2-normalised already; they are normalised again
    defensively (a no-op for unit vectors) so the temperature keeps its meaning.
    Computed in float32 regardless of autocast, since the logits at low
    temperature overflow/underflow half precision.

    Args:
        anchors: (Na, D).
        candidates: (Nc, D), or None to contrast anchors against themselves.
        pos_mask, neg_mask: bool (Na, Nc). An entry in both counts as positive.
        temperature: softmax temperature (> 0).

    Returns:
        (loss scalar float32, stats) with detached float tensors 'mean_pos',
        'mean_neg' (per-anchor counts averaged over all anchors) and
        'num_anchors' (anchors that contributed, i.e. had a positive).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=-1)
        c = a if candidates is None else F.normalize(candidates.float(), dim=-1)
        pos = pos_mask.to(device=a.device, dtype=torch.bool)
        neg = neg_mask.to(device=a.device, dtype=torch.bool)
        na, nc = a.shape[0], c.shape[0]
        if pos.shape != (na, nc) or neg.shape != (na, nc):
            raise ValueError(
                f"masks must be ({na}, {nc}), got {tuple(pos.shape)} and {tuple(neg.shape)}"
            )

        n_pos = pos.sum(1)
        allowed = pos | neg  # neg & ~pos counted below without materialising it: an entry in both is positive
        n_neg = allowed.sum(1) - n_pos
        has_pos = n_pos > 0
        n_anchors = has_pos.sum()
        stats = {
            "mean_pos": n_pos.sum() / max(na, 1),
            "mean_neg": n_neg.sum() / max(na, 1),
            "num_anchors": n_anchors.float(),
        }

        # Anchors without a positive are dropped by weight, not by indexing: no host-device synchronisation
        # (a boolean index or a Python `if` on a GPU tensor waits for every queued kernel). Their rows get
        # every entry in the denominator, so logsumexp never sees an all -inf row and their (discarded)
        # values and gradients stay finite; the loss stays attached to every input through the logits, so
        # backward works (zero gradients) even when no anchor contributes.
        logits = torch.mm(a, c.t()).div_(temperature)
        lse = torch.logsumexp(logits.masked_fill(~allowed & has_pos[:, None], float("-inf")), dim=1)
        # mean over positives of (logit - lse), without materialising the log-probabilities
        pos_mean = logits.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
        loss = torch.where(has_pos, lse - pos_mean, 0.0).sum() / n_anchors.clamp_min(1)
    return loss, stats
