"""The network side of pretraining: U-Net + projection heads as one module, and where the U-Net's feature voxels
sit in the input (strides, receptive-field centres), read from the real convolutions."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_ssl.core.correspondence import feature_grid
from nnunet_ssl.nnunet.checkpoint import unwrapped_network as unwrap  # noqa: F401 (re-exported)


def encoder_strides(network: nn.Module) -> np.ndarray:
    """Cumulative stride of every encoder stage, shape (n_stages, dim)."""
    enc = unwrap(network).encoder
    dim = 3 if enc.conv_op is nn.Conv3d else 2
    strides = [np.broadcast_to(np.asarray(s), (dim,)) for s in enc.strides]
    return np.cumprod(np.stack(strides), axis=0)


def encoder_grid(network: nn.Module, stage: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(scale, offset) of encoder stage ``stage``'s output voxels in input voxels (core ``feature_grid``), read
    from the real convolutions on the main path (stem, then the stages' convs in order; the 1x1 ``skip`` convs of
    residual blocks run in parallel and are left out). Decoder stages feed on the same grid through the skip
    connection of that resolution."""
    enc = unwrap(network).encoder
    stage = stage % len(enc.stages)
    layers = []
    for name, m in enc.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Conv3d)) or ".skip" in f".{name}" or "skip." in name:
            continue
        parts = name.split(".")
        if parts[0] == "stages" and int(parts[1]) > stage:
            continue
        layers.append((tuple(m.kernel_size), tuple(m.stride), tuple(m.padding)))
    return feature_grid(layers)


def padded_input(network: nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """(1, C, *S') float batch of one preprocessed volume (C, *S), zero-padded at the far end of every axis to a
    multiple of the network's total stride (so a whole volume runs through the U-Net at once)."""
    div = encoder_strides(network)[-1]
    shape = np.asarray(volume.shape[1:])
    target = (np.ceil(shape / div) * div).astype(int)
    pad = []
    for s, t in zip(shape[::-1], target[::-1]):
        pad += [0, int(t - s)]
    return torch.nn.functional.pad(volume[None].float(), pad)


class ContrastiveModel(nn.Module):
    """U-Net + projection heads in one module, so DDP/AMP see a single forward.

    ``head_inputs`` maps each head to 'bottleneck', 'decoder' (the output of decoder stage ``decoder_stage``;
    0 = lowest resolution, negative values count from the full-resolution end) or 'full' (the last decoder stage,
    at the input's resolution). The decoder runs only as far as needed."""

    def __init__(self, network: nn.Module, heads: nn.ModuleDict, head_inputs: Dict[str, str],
                 decoder_stage: Optional[int]):
        super().__init__()
        self.network = network
        self.heads = heads
        self.head_inputs = dict(head_inputs)
        n_dec = len(network.decoder.stages)
        self.decoder_stage = None if decoder_stage is None else decoder_stage % n_dec

    def forward(self, x: torch.Tensor, condition: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``condition`` (e.g. each crop's location) reaches the heads that declare ``conditioned = True``."""
        skips = self.network.encoder(x)
        feats = {"bottleneck": skips[-1]}
        wanted = set(self.head_inputs.values())
        if wanted & {"decoder", "full"}:
            dec = self.network.decoder
            last = len(dec.stages) - 1 if "full" in wanted else self.decoder_stage
            lres = skips[-1]
            for s in range(last + 1):
                lres = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
                if s == self.decoder_stage:
                    feats["decoder"] = lres
            feats["full"] = lres
        return {name: head(feats[self.head_inputs[name]], condition) if getattr(head, "conditioned", False)
                else head(feats[self.head_inputs[name]]) for name, head in self.heads.items()}
