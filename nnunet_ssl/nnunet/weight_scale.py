"""Reset the scale of the convolutions that feed an InstanceNorm before the weights are handed to fine-tuning.

A convolution followed by InstanceNorm (every conv block of nnU-Net's networks) computes the same function
whatever the scale of each output channel's weights: the norm divides it out (the channel's bias is removed with
the mean). Its effective learning rate under SGD, however, falls with the square of that scale. Contrastive
pretraining grows these weights (measured on Hippocampus with the CPU budget: encoder conv norms 3-9 at the start,
10-66 after 1000 iterations of PCL), so nnU-Net's fine-tuning schedule, tuned for He-initialised weights, barely
moves them and a few-label run can stay at background. Rescaling each output channel to the norm of nnU-Net's He
initialisation keeps the pretrained function and restores the step sizes fine-tuning was designed for."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

# per-output-channel norm of nnU-Net's InitWeights_He(1e-2): fan_in * 2 / ((1 + a^2) fan_in)
HE_CHANNEL_NORM = math.sqrt(2.0 / (1.0 + 1e-2 ** 2))


def scale_invariant_convs(network: nn.Module) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """State-dict keys of the convolutions whose output goes straight into an InstanceNorm without running
    statistics (the conv blocks of dynamic_network_architectures: ``.conv`` then ``.norm``; dropout in between
    scales nothing), one (weight keys, bias keys) pair per convolution. A tensor can sit under several keys -
    PlainConvUNet's state dict holds the encoder as encoder.* and decoder.encoder.*, each conv also as
    all_modules.0.* - and load_state_dict would restore the old scale from any key left unscaled, so every key
    of the tensor is listed. Transposed convolutions and segmentation layers are not among them."""
    convs = {}
    for module in network.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
        if (isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv, nn.modules.conv._ConvTransposeNd)
                and isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats):
            convs[id(conv.weight)] = id(conv.bias) if conv.bias is not None else None
    keys_of: Dict[int, List[str]] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
    return [(tuple(keys_of[w]), tuple(keys_of[b]) if b is not None else ()) for w, b in convs.items()]


def reset_conv_scales(state_dict: Dict[str, torch.Tensor], convs: List[Tuple[Tuple[str, ...], Tuple[str, ...]]],
                      channel_norm: float = HE_CHANNEL_NORM) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` in which each listed convolution's output channels (weights and bias alike) are
    scaled so that every channel's weights have norm ``channel_norm``. Channels with all-zero weights stay as
    they are. The network computes the same function up to InstanceNorm's epsilon."""
    out = dict(state_dict)
    for w_keys, b_keys in convs:
        w = state_dict[w_keys[0]]
        norms = w.detach().float().flatten(1).norm(dim=1)
        factor = torch.where(norms > 0, channel_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
        scaled_w = (w.float() * factor.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        for k in w_keys:
            out[k] = scaled_w
        if b_keys:
            b = state_dict[b_keys[0]]
            scaled_b = (b.float() * factor).to(b.dtype)
            for k in b_keys:
                out[k] = scaled_b
    return out
