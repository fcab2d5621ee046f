"""Affinity-weighted (soft-label) contrast: Liu et al. 2022, "Contrastive and Selective Hidden Embeddings for
Medical Image Segmentation", IEEE TMI (PDCR's patch-dragsaw contrast); also SpadeSoft's crop-level loss."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
