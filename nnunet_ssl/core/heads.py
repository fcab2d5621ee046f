"""Projection heads for the global (per-crop) and local (per-voxel) branches."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _pooled_hidden(trunk: nn.Module, feature_map: Tensor) -> Tensor:
    """Linear -> ReLU applied to every voxel's feature vector, then averaged over the voxels.

    Pooling first would make crop embeddings nearly identical in nnU-Net networks: every stage
    ends in InstanceNorm, which fixes each channel's mean (and spread) per crop, so the channel
    means that average pooling returns carry almost no information about the crop (measured on
    Hippocampus bottlenecks: cosine 0.998 between the pooled vectors of different cases) and a
    contrastive loss on them stays at its uniform value. A per-voxel projection followed by a
    non-linearity depends on how the channels co-vary inside the crop, which InstanceNorm keeps.
    The parameters are those of the pool-first head (same shapes, same state-dict keys)."""
    voxels = feature_map.flatten(2).transpose(1, 2)  # (B, S, C)
    return trunk(voxels).mean(dim=1)


class GlobalProjectionHead(nn.Module):
    """Linear -> ReLU per voxel, average over voxels, -> BatchNorm -> Linear -> L2 normalise.

    The BatchNorm over the crops of the batch (SimCLR's projection head has one as well) removes the
    component that all crop embeddings share, so the loss sees their differences from the first step: without
    it, every embedding of a freshly initialised nnU-Net starts within cosine 0.99 of the others and the
    contrastive gradient is too small to pull them apart. Under DDP the engine turns it into SyncBatchNorm."""

    def __init__(self, in_channels: int, hidden_dim: int = 512, out_dim: int = 128, batch_norm: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.norm = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()

    def forward(self, feature_map: Tensor) -> Tensor:
        # Works for any number of spatial dims.
        hidden = self.norm(_pooled_hidden(self.mlp[:2], feature_map))
        return F.normalize(self.mlp[2](hidden), dim=1)


class DenseProjectionHead(nn.Module):
    """Per-voxel projection via 1x1(x1) convolutions, L2-normalised over channels.

    ``normalize=False`` leaves the normalisation to a loss that reads only some voxels and normalises those
    itself (Spade's dense loss: a few hundred sampled voxels of a map of tens of thousands); the loss and its
    gradients are the same, since normalising twice is normalising once."""

    def __init__(
        self,
        in_channels: int,
        out_dim: int = 64,
        hidden_dim: Optional[int] = None,
        dim: int = 3,
        normalize: bool = True,
    ):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.dim = dim
        self.normalize = normalize
        if hidden_dim:
            self.proj = nn.Sequential(
                conv(in_channels, hidden_dim, kernel_size=1),
                nn.ReLU(inplace=True),
                conv(hidden_dim, out_dim, kernel_size=1),
            )
        else:
            self.proj = conv(in_channels, out_dim, kernel_size=1)

    def forward(self, feature_map: Tensor) -> Tensor:
        if feature_map.dim() != self.dim + 2:
            raise ValueError(
                f"expected a (B, C, *spatial) tensor with {self.dim} spatial dims, "
                f"got shape {tuple(feature_map.shape)}"
            )
        projected = self.proj(feature_map)
        return F.normalize(projected, dim=1) if self.normalize else projected


class LocationConditionedHead(nn.Module):
    """Mixture-of-experts projection head whose mixing weights depend on a location.

    Conditions the projection on where a crop comes from (DrasCLR-style) while the encoder
    stays unchanged: Linear -> ReLU per voxel, averaged over the voxels, gives h (see _pooled_hidden and
    GlobalProjectionHead for why, and for the BatchNorm); a small MLP maps the location to a softmax
    gate over ``num_experts`` linear experts; the output is normalize(sum_e g_e (BN(h) W_e + b_e)).
    """

    conditioned = True  # the training engine passes each crop's location as the second argument

    def __init__(
        self,
        in_channels: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        num_experts: int = 4,
        location_dim: int = 3,
        batch_norm: bool = True,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.location_dim = location_dim
        self.trunk = nn.Sequential(nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True))
        self.norm = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()
        self.gate = nn.Sequential(
            nn.Linear(location_dim, 64), nn.ReLU(inplace=True), nn.Linear(64, num_experts)
        )
        self.expert_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, out_dim))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_dim))
        # Same scale as nn.Linear's default init, per expert.
        bound = 1.0 / math.sqrt(hidden_dim)
        nn.init.uniform_(self.expert_weight, -bound, bound)
        nn.init.uniform_(self.expert_bias, -bound, bound)

    def forward(self, feature_map: Tensor, location: Tensor) -> Tensor:
        if feature_map.dim() < 3:
            raise ValueError(f"expected a (B, C, *spatial) tensor, got shape {tuple(feature_map.shape)}")
        b = feature_map.shape[0]
        if location.shape != (b, self.location_dim):
            raise ValueError(
                f"expected location ({b}, {self.location_dim}), got {tuple(location.shape)}"
            )
        h = self.norm(_pooled_hidden(self.trunk, feature_map))
        g = torch.softmax(self.gate(location.to(self.expert_weight.dtype)), dim=1)
        per_expert = torch.einsum("bh,eho->beo", h, self.expert_weight) + self.expert_bias
        return F.normalize(torch.einsum("be,beo->bo", g.to(per_expert.dtype), per_expert), dim=1)


class ReconstructionHead(nn.Module):
    """1x1 convolution from full-resolution decoder features to the input's channels (masked reconstruction).
    Kept apart from nnU-Net's segmentation layers, which ``-pretrained_weights`` never transfers anyway."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 3):
        super().__init__()
        self.conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_channels, out_channels, kernel_size=1)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.conv(feature_map)
