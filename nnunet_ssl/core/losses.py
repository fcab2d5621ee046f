"""Contrastive losses."""
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
        neg = neg_mask.to(device=a.device, dtype=torch.bool) & ~pos
        na, nc = a.shape[0], c.shape[0]
        if pos.shape != (na, nc) or neg.shape != (na, nc):
            raise ValueError(
                f"masks must be ({na}, {nc}), got {tuple(pos.shape)} and {tuple(neg.shape)}"
            )

        n_pos = pos.sum(1)
        n_neg = neg.sum(1)
        has_pos = n_pos > 0
        stats = {
            "mean_pos": n_pos.float().sum().detach() / max(na, 1),
            "mean_neg": n_neg.float().sum().detach() / max(na, 1),
            "num_anchors": has_pos.float().sum().detach(),
        }

        # Anchors without a positive are dropped by weight, not by indexing: no host-device synchronisation
        # (a boolean index or a Python `if` on a GPU tensor waits for every queued kernel). Their rows get
        # every entry in the denominator, so logsumexp never sees an all -inf row and their (discarded)
        # values and gradients stay finite; the loss stays attached to every input through the logits, so
        # backward works (zero gradients) even when no anchor contributes.
        logits = a @ c.t() / temperature
        allowed = pos | neg | ~has_pos[:, None]
        lse = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
        # sum over positives of (logit - lse), without materialising the log-probabilities
        pos_sum = logits.masked_fill(~pos, 0.0).sum(1)
        n_pos_f = n_pos.float().clamp_min(1.0)
        per_anchor = torch.where(has_pos, -(pos_sum - n_pos_f * lse) / n_pos_f, 0.0)
        loss = per_anchor.sum() / has_pos.sum().clamp_min(1).float()
    return loss, stats


def affinity_weighted_loss(
    z: Tensor,
    affinity: Tensor,
    valid_pairs: Tensor,
    temperature: float = 0.5,
    candidates: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Continuous (soft-label) contrast, PDCR-style (Liu et al., TMI 2022).

    With s_ij = cos(z_i, c_j) / temperature and d_ij = 1 - a_ij, every valid pair (i, j) contributes
        l_ij = -( s_ij * a_ij - logsumexp_{k valid for i} (s_ik * d_ik) ),
    i.e. similarity is pulled in proportion to the affinity and pushed in proportion to the
    dissimilarity. The loss is the mean of l_ij over valid pairs. Without ``candidates`` the
    candidates are the rows of ``z`` themselves and self-pairs are never valid.

    Args:
        z: (N, D) anchor embeddings.
        affinity: (N, M) affinities, expected in [0, 1] (M = N without candidates).
        valid_pairs: bool (N, M); pairs that enter both the numerator and the denominator.
        temperature: > 0.
        candidates: optional (M, D) second embedding set (e.g. another layer).

    Returns:
        (loss scalar float32, stats) with detached 'mean_affinity' (over valid pairs) and
        'num_pairs'. Without a valid pair the loss is a zero attached to the graph.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        a = F.normalize(z.float(), dim=-1)
        c = a if candidates is None else F.normalize(candidates.float(), dim=-1)
        na, nc = a.shape[0], c.shape[0]
        if affinity.shape != (na, nc) or valid_pairs.shape != (na, nc):
            raise ValueError(
                f"affinity and valid_pairs must be ({na}, {nc}), got "
                f"{tuple(affinity.shape)} and {tuple(valid_pairs.shape)}"
            )
        aff = affinity.to(device=a.device, dtype=torch.float32)
        valid = valid_pairs.to(device=a.device, dtype=torch.bool)
        if candidates is None:
            valid = valid & ~torch.eye(na, dtype=torch.bool, device=a.device)

        n_pairs = valid.sum()
        stats = {
            "mean_affinity": (aff * valid).sum().detach() / n_pairs.clamp_min(1).float(),
            "num_pairs": n_pairs.float().detach(),
        }
        # As in info_nce, no host-device synchronisation: every row is computed, rows without a valid pair get a
        # constant (finite) denominator and drop out by weight; the loss stays attached to every input through the
        # logits, so backward works (zero gradients) when there is no valid pair.
        rows = valid.any(1)
        logits = a @ c.t() / temperature
        scaled = (logits * (1.0 - aff)).masked_fill(~valid, float("-inf")).masked_fill(~rows[:, None], 0.0)
        lse = torch.logsumexp(scaled, dim=1)
        per_pair = lse[:, None] - logits * aff
        loss = torch.where(valid, per_pair, 0.0).sum() / n_pairs.clamp_min(1).float()
    return loss, stats
