"""Uncertainty-aware feature selection (UAFS; Liu et al., TMI 2022), as a drop-in block for decoder features."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class UAFSBlock(nn.Module):
    """Re-weights decoder features by the certainty of an auxiliary prediction at the same stage.

    certainty c = 1 - H(softmax(aux)) / log(K) in [0,1] per location (1: confident, 0: uniform);
    gate g = sigmoid(conv1x1([f, c])) per channel; output f' = f * (1 + gamma * (g * c - 1)).
    gamma starts at 0, so a freshly inserted block is the identity and pretrained U-Net weights keep their
    meaning; training then learns how much to damp features where the prediction is uncertain (the
    uncertain, often minority-class locations whose features should not dominate)."""

    def __init__(self, channels: int, dim: int = 3):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.gate = conv(channels + 1, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def certainty(aux_logits: Tensor) -> Tensor:
        k = aux_logits.shape[1]
        if k < 2:  # a single (sigmoid) output: binary entropy
            p = torch.sigmoid(aux_logits.float())
            h = -(p * torch.log(p.clamp_min(1e-8)) + (1 - p) * torch.log((1 - p).clamp_min(1e-8))) / math.log(2)
        else:
            logp = torch.log_softmax(aux_logits.float(), 1)
            h = -(logp.exp() * logp).sum(1, keepdim=True) / math.log(k)
        return (1 - h).clamp(0, 1)

    def forward(self, features: Tensor, aux_logits: Tensor) -> Tensor:
        c = self.certainty(aux_logits).to(features.dtype)
        g = torch.sigmoid(self.gate(torch.cat((features, c), 1)))
        return features * (1 + self.gamma * (g * c - 1))
