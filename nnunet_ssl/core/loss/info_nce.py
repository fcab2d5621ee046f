"""Multi-positive InfoNCE over selection masks: the contrastive loss under every crop-level and dense
branch of the plugin (van den Oord et al. 2018, "Representation learning with contrastive predictive coding";
multi-positive "L_out" form of Khosla et al. 2020, "Supervised contrastive learning")."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .masked_logsumexp import masked_logsumexp


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
        a = unit_rows(anchors.float())
        c = a if candidates is None else unit_rows(candidates.float())
        pos = pos_mask.to(device=a.device, dtype=torch.bool)
        neg = neg_mask.to(device=a.device, dtype=torch.bool)
        na, nc = a.shape[0], c.shape[0]
        if pos.shape != (na, nc) or neg.shape != (na, nc):
            raise ValueError(
                f"masks must be ({na}, {nc}), got {tuple(pos.shape)} and {tuple(neg.shape)}"
            )

        # 0/1 float masks: counts, the denominator's mask and the positives' weights in a few products (a boolean
        # mask costs several times a float product on CPU); neg & ~pos is never materialised: an entry in both
        # counts as positive
        pos_f = pos.float()
        allowed_f = (pos | neg).float()
        n_pos = pos_f.sum(1)
        has_pos = n_pos > 0
        n_anchors = has_pos.sum()
        stats = {
            "mean_pos": n_pos.sum() / max(na, 1),
            "mean_neg": (allowed_f.sum() - n_pos.sum()) / max(na, 1),
            "num_anchors": n_anchors.float(),
        }

        # Anchors without a positive are dropped by weight, not by indexing: no host-device synchronisation
        # (a boolean index or a Python `if` on a GPU tensor waits for every queued kernel). Their rows keep
        # every entry in the denominator, so the log-sum-exp never sees an empty row and their (discarded)
        # values and gradients stay finite; the loss stays attached to every input through the logits, so
        # backward works (zero gradients) even when no anchor contributes.
        q = a * (1.0 / temperature)
        lse = masked_logsumexp(q, c, torch.where(has_pos[:, None], allowed_f, 1.0), 1.0 / temperature)
        # mean over positives of the logit: <q_i, sum_j pos_ij c_j> / |P_i|, without the logits' masked copy
        pos_mean = (q * (pos_f @ c)).sum(1) / n_pos.clamp_min(1)
        loss = torch.where(has_pos, lse - pos_mean, 0.0).sum() / n_anchors.clamp_min(1)
    return loss, stats


def unit_rows(z: Tensor) -> Tensor:
    """``F.normalize(z, dim=-1)`` (eps 1e-12) in three operations instead of four."""
    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)
