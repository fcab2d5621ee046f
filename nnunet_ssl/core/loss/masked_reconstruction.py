"""Masked-region reconstruction loss for CNNs (MAE-style masked image modelling: He et al. 2022, "Masked
autoencoders are scalable vision learners"; for 3D CNN U-Nets Wald et al. 2025, "An OpenMind for 3D medical vision
self-supervised learning"). The mask comes from ``nnunet_ssl.core.masking.block_mask``."""
from __future__ import annotations

from torch import Tensor


def masked_reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked voxels (and every channel): prediction/target (B, C, *S), mask (B, *S).
    Computed in float32; 0 (still attached to the graph) when nothing is masked."""
    p, t = prediction.float(), target.float()
    m = mask.to(p.dtype)[:, None]
    squared = ((p - t) ** 2 * m).sum()
    count = m.sum() * p.shape[1]
    return squared / count.clamp_min(1.0)
