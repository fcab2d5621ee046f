"""The fine-tuning recipe for pretrained starts: phases, learning-rate schedule and parameter groups.

Phases, in epochs of a run of ``num_epochs`` (each optional except the last two):

1. *linear probe* (LP-FT, Kumar et al. 2022): only the segmentation layers train, at the peak lr;
2. *decoder warm-up* (the "sawtooth" of nnU-Net's ``PretrainedTrainer``): decoder + segmentation layers, lr rising
   linearly from 0 to the peak; the encoder is frozen;
3. *whole-network warm-up*: every weight, lr rising linearly from 0 to the peak;
4. *poly decay*: every weight, lr = peak · (1 − t)^0.9 over the remaining epochs (nnU-Net's schedule).

Layer-wise lr decay scales encoder stage i (of S) by ``layer_decay ** (S - 1 - i)``: the first stage, whose
features are the most generic, moves least; decoder and segmentation layers get the full lr.

Parameter groups are made from the network's *names*: ``UNetDecoder`` holds a reference to the encoder, so
``network.decoder.parameters()`` yields every encoder weight too; here a parameter belongs to the encoder when its
first name is ``encoder.*`` (``named_parameters`` lists a shared tensor once, under its first name), and
``decoder.encoder.*`` never counts as decoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch.nn as nn

PHASES = ("probe", "decoder", "warmup", "decay")
# which parameter kinds train in each phase
TRAINABLE = {"probe": {"seg"}, "decoder": {"seg", "decoder"}, "warmup": {"seg", "decoder", "encoder"},
             "decay": {"seg", "decoder", "encoder"}}


@dataclass(frozen=True)
class Recipe:
    num_epochs: int
    probe_epochs: int = 0
    decoder_warmup_epochs: int = 0
    warmup_epochs: int = 0
    poly_exponent: float = 0.9

    def __post_init__(self):
        used = self.probe_epochs + self.decoder_warmup_epochs + self.warmup_epochs
        if min(self.probe_epochs, self.decoder_warmup_epochs, self.warmup_epochs) < 0 or used >= self.num_epochs:
            raise ValueError(f"fine-tuning recipe: probe ({self.probe_epochs}) + decoder warm-up "
                             f"({self.decoder_warmup_epochs}) + warm-up ({self.warmup_epochs}) epochs must be >= 0 "
                             f"and leave epochs for the poly decay of a {self.num_epochs}-epoch run")

    def phase(self, epoch: int) -> Tuple[str, float]:
        """(phase name, lr factor relative to the peak lr) at the start of ``epoch``."""
        e = epoch
        if e < self.probe_epochs:
            return "probe", 1.0
        e -= self.probe_epochs
        if e < self.decoder_warmup_epochs:
            return "decoder", (e + 1) / self.decoder_warmup_epochs
        e -= self.decoder_warmup_epochs
        if e < self.warmup_epochs:
            return "warmup", (e + 1) / self.warmup_epochs
        e -= self.warmup_epochs
        remaining = self.num_epochs - self.probe_epochs - self.decoder_warmup_epochs - self.warmup_epochs
        return "decay", (1.0 - min(e, remaining) / remaining) ** self.poly_exponent


_STAGE = re.compile(r"^encoder\.(?:stages\.(\d+)|stem)\.")


def parameter_kind(name: str) -> Tuple[str, int]:
    """('seg' | 'decoder' | 'encoder', encoder stage or -1) of a parameter name of nnU-Net's U-Nets."""
    if ".seg_layers." in name or name.startswith("seg_layers."):
        return "seg", -1
    if name.startswith("encoder.") or name.startswith("decoder.encoder."):
        m = _STAGE.match(name[len("decoder."):] if name.startswith("decoder.encoder.") else name)
        return "encoder", int(m.group(1)) if m and m.group(1) is not None else 0
    return "decoder", -1


def parameter_groups(network: nn.Module, layer_decay: float = 1.0) -> List[Dict]:
    """SGD parameter groups, one per (kind, encoder stage), each with its ``kind`` and ``lr_scale``."""
    by_key: Dict[Tuple[str, int], List] = {}
    for name, p in network.named_parameters():
        by_key.setdefault(parameter_kind(name), []).append(p)
    n_stages = 1 + max([s for (k, s) in by_key if k == "encoder"], default=0)
    groups = []
    for (kind, stage), params in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        scale = layer_decay ** (n_stages - 1 - stage) if kind == "encoder" else 1.0
        groups.append({"params": params, "kind": kind, "stage": stage, "lr_scale": float(scale)})
    return groups


class RecipeLRScheduler:
    """Sets each group's lr for an epoch and freezes the kinds the phase does not train (``requires_grad``, so the
    frozen weights get no gradient, no weight decay and no momentum update, and cost no backward pass)."""

    def __init__(self, optimizer, peak_lr: float, recipe: Recipe):
        self.optimizer, self.peak_lr, self.recipe = optimizer, peak_lr, recipe
        self.current_phase = None

    def step(self, epoch: int) -> None:
        phase, factor = self.recipe.phase(epoch)
        self.current_phase = phase
        for g in self.optimizer.param_groups:
            train = g["kind"] in TRAINABLE[phase]
            g["lr"] = self.peak_lr * factor * g["lr_scale"] if train else 0.0
            for p in g["params"]:
                p.requires_grad_(train)
