"""nnU-Net's UNetDecoder, able to hand out its stage features and to run UAFS blocks after chosen stages.

The U-Net's parameters and their state-dict keys are untouched (pretrained weights load, stock inference code
works). UAFS blocks live under ``decoder.uafs.seg_layers``: nnU-Net treats ``.seg_layers.`` parameters as
task-specific and never transfers them with ``-pretrained_weights``, which is exactly right for blocks driven by
the task's auxiliary predictions, so a pretrained U-Net loads and the blocks start from their initialisation.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_ssl.core.uafs import UAFSBlock


class FeatureUNetDecoder(UNetDecoder):
    """Set ``capture_stages`` to keep the outputs of those decoder stages (after UAFS) in ``captured``."""

    def forward(self, skips):
        lres_input = skips[-1]
        seg_outputs = []
        capture = getattr(self, "capture_stages", ())
        uafs = getattr(self, "uafs", None)
        self.captured = {}
        n = len(self.stages)
        for s in range(n):
            x = self.transpconvs[s](lres_input)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = self.stages[s](x)
            if uafs is not None and str(s) in uafs.seg_layers:
                # the stage's own deep-supervision head is the auxiliary prediction that measures uncertainty
                x = uafs.seg_layers[str(s)](x, self.seg_layers[s](x))
            if s in capture:
                self.captured[s] = x
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == n - 1:
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]


def stage_index(decoder: UNetDecoder, stage: int) -> int:
    return stage % len(decoder.stages)


def convert_decoder(network: nn.Module, uafs_stages: Optional[Sequence[int]] = None) -> nn.Module:
    """Turn ``network.decoder`` (a UNetDecoder of PlainConvUNet / ResidualEncoderUNet) into a FeatureUNetDecoder,
    optionally with UAFS blocks after ``uafs_stages`` (negative values count from full resolution)."""
    dec = network.decoder
    if not isinstance(dec, UNetDecoder):
        raise TypeError(f"{type(network).__name__} has no nnU-Net UNetDecoder; PDCR/UAFS support PlainConvUNet and "
                        f"ResidualEncoderUNet plans")
    dec.__class__ = FeatureUNetDecoder
    dec.capture_stages = ()
    if uafs_stages:
        dim = 3 if dec.encoder.conv_op is nn.Conv3d else 2
        blocks: Dict[str, nn.Module] = {}
        for s in uafs_stages:
            i = stage_index(dec, s)
            blocks[str(i)] = UAFSBlock(dec.encoder.output_channels[-(i + 2)], dim)
        dec.uafs = nn.Module()
        dec.uafs.seg_layers = nn.ModuleDict(blocks)
    return network
