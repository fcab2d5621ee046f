"""Projection heads for the global (per-crop) and local (per-voxel) branches."""
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class GlobalProjectionHead(nn.Module):
    """Global average pool -> Linear -> ReLU -> Linear -> L2 normalise."""

    def __init__(self, in_channels: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, feature_map: Tensor) -> Tensor:
        # Works for any number of spatial dims.
        pooled = feature_map.flatten(2).mean(dim=2)
        return F.normalize(self.mlp(pooled), dim=1)


class DenseProjectionHead(nn.Module):
    """Per-voxel projection via 1x1(x1) convolutions, L2-normalised over channels."""

    def __init__(
        self,
        in_channels: int,
        out_dim: int = 64,
        hidden_dim: Optional[int] = None,
        dim: int = 3,
    ):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.dim = dim
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
        return F.normalize(self.proj(feature_map), dim=1)
