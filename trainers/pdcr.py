"""PDCR + UAFS (Liu et al., "Contrastive and Selective Hidden Embeddings for Medical Image Segmentation", TMI 2022)
as nnU-Net segmentation trainers: a supervised regulariser added to nnU-Net's own loss.

PDCRTrainer (patch-dragsaw contrastive regularisation):
  features of two decoder stages are sampled on a regular grid (``pdcr_grid_stride`` input voxels). Each sample i
  gets r_i, the class composition (fractions, background included) of the ground truth inside a window around it
  (``pdcr_window_scale`` x the stage's stride, +1). Affinity a_ij = 1 - 1/2 sum_c |r_ic - r_jc|, divergence
  d_ij = 1 - a_ij; with s_ij = cos(f_i, f_j) / tau (tau 0.5):
      l_ij = -log( exp(s_ij a_ij) / sum_k exp(s_ik d_ik) ),   averaged over valid pairs,
  for each stage, plus a cross-layer term (stage A samples against stage B samples, affinities between their
  compositions). Loss = nnU-Net's loss + 0.01 PDCR + 0.01 cross-layer PDCR.
PDCRUAFSTrainer: PDCR + UAFS blocks after the same two decoder stages (see nnunet_ssl.core.uafs).

Both work alone or on top of any pretraining checkpoint (-pretrained_weights), and predict with stock
nnUNetv2_predict (the plugin's discovery finds the trainer at inference).
"""
import functools
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunet_ssl.core.distributed import average_gradients_, broadcast_parameters_
from nnunet_ssl.core.loss.pdcr import pdcr_loss
from nnunet_ssl.nnunet.budget import SmokeBudget
from nnunet_ssl.nnunet.feature_decoder import convert_decoder, stage_index
from nnunet_ssl.nnunet.model import encoder_strides, unwrap
from nnunet_ssl.nnunet.segmentation import SegmentationTrainerMixin
from nnunet_ssl.trainers.finetune import (nnUNetTrainerFinetune, nnUNetTrainerFinetune_cpu_120ep,
                                         nnUNetTrainerFinetune_smoke)


def _project_rows(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to feature vectors (N, C) -> (N, D): its weights as a linear map."""
    return F.linear(rows, head.weight.flatten(1), head.bias)


class PDCRRegulariserMixin:
    """The PDCR regulariser on a segmentation trainer of the plugin (first in the bases): decoder stages captured in
    the forward pass, their projection heads (trained with the network, saved with it), the regularised training
    step. The base trainer's schedule stays; ``configure_optimizers`` of the concrete trainer adds the heads."""

    pdcr_stages: Tuple[int, ...] = (-2, -1)  # decoder stages (negative: from full resolution)
    pdcr_grid_stride: int = 8                # sample spacing in input voxels (rounded up to the stages' strides)
    pdcr_window_scale: int = 2               # composition window = scale x stage stride + 1 voxels per axis
    pdcr_temperature: float = 0.5
    pdcr_weight: float = 0.01
    pdcr_cross_weight: float = 0.01
    pdcr_proj_dim: int = 64                  # 1x1 projections bring both stages to one width (cross-layer term)
    pdcr_max_samples: int = 512              # per stage and step (random subset), bounds the N x N affinity

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        return convert_decoder(net)

    def _do_i_compile(self):
        return False  # stage features are captured in Python during the forward

    def cpu_fast_path_modules(self):
        return [self.network, self.pdcr_heads]

    # ------------------------------------------------------------------ set-up
    def _stage_geometry(self):
        dec = unwrap(self.network).decoder
        strides = encoder_strides(self.network)
        idx = [stage_index(dec, s) for s in self.pdcr_stages]
        stage_strides = [tuple(int(v) for v in strides[len(strides) - (i + 2)]) for i in idx]
        channels = [int(dec.encoder.output_channels[-(i + 2)]) for i in idx]
        return idx, stage_strides, channels

    def build_pdcr_heads(self) -> nn.ModuleList:
        """The projection heads, built once (on the first ``configure_optimizers``; a schedule with phases calls it
        again and must keep them), and the decoder told which stages to capture."""
        idx, _, channels = self._stage_geometry()
        unwrap(self.network).decoder.capture_stages = tuple(idx)
        if getattr(self, "pdcr_heads", None) is None:  # (an instance attribute: not a training setting)
            conv = nn.Conv3d if len(self.configuration_manager.patch_size) == 3 else nn.Conv2d
            self.pdcr_heads = nn.ModuleList([conv(c, self.pdcr_proj_dim, 1) for c in channels]).to(self.device)
            if self.is_ddp:  # nnU-Net's DDP wraps the network only: start the heads from rank 0's weights everywhere
                broadcast_parameters_(self.pdcr_heads)
        return self.pdcr_heads

    # ------------------------------------------------------------------ the regulariser
    def pdcr_regulariser(self, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The PDCR loss (nnunet_ssl.core.loss.pdcr) of the decoder stages captured in this step's forward pass,
        against ``target`` in nnU-Net's label encoding (labels or regions, optional ignore label)."""
        idx, stage_strides, _ = self._stage_geometry()
        captured = unwrap(self.network).decoder.captured
        lm = self.label_manager
        seg = target[:, :1] if not lm.has_regions else target
        if lm.has_regions:
            onehot = seg[:, :len(lm.foreground_regions)].float()
            ignore = seg[:, -1].bool() if lm.has_ignore_label else None
        else:
            lab = seg[:, 0].long()
            ignore = (lab == lm.ignore_label) if lm.has_ignore_label else None
            lab = torch.where(lab == lm.ignore_label, torch.zeros_like(lab), lab) if lm.has_ignore_label else lab
            onehot = F.one_hot(lab.clamp(0, lm.num_segmentation_heads - 1), lm.num_segmentation_heads)
            onehot = onehot.movedim(-1, 1).float()
        # projections and loss in float32 (on CUDA outside autocast; on CPU the forward's bf16 context has ended)
        # the 1x1 projections apply to the sampled feature voxels only (pdcr_loss samples first): projecting the whole
        # full-resolution map, and its backward, cost ~14 ms of a ~72 ms bf16 CPU-budget step, for ~200 samples
        with torch.autocast(self.device.type, enabled=False) if self.device.type == "cuda" else dummy_context():
            features = [captured[i] for i in idx]
            projections = [functools.partial(_project_rows, head) for head in self.pdcr_heads]
            return pdcr_loss(features, stage_strides, onehot, ignore, self.pdcr_grid_stride, self.pdcr_window_scale,
                             self.pdcr_temperature, self.pdcr_weight, self.pdcr_cross_weight, self.pdcr_max_samples,
                             projections=projections)

    # ------------------------------------------------------------------ training step
    def train_step(self, batch: dict) -> dict:
        data = self.cpu_fast_input(batch["data"].to(self.device, non_blocking=True))
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        # CPU: bf16 where the CPU has it (the loss is then Float32Loss); the regulariser below runs outside, in float32
        ctx = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else self.cpu_autocast()
        with ctx:
            output = self.network(data)
            seg_loss = self.loss(output, target)
        reg, terms = self.pdcr_regulariser(target[0] if isinstance(target, list) else target)
        loss = seg_loss + reg
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.sync_pdcr_head_gradients()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.sync_pdcr_head_gradients()
            # the shared guarded step (CPUFastPathMixin): a step with non-finite gradients is skipped and counted,
            # as GradScaler does under fp16; bf16 on CPU has no GradScaler to do it
            self.step_if_finite(params, 12)
        out = {"loss": loss.detach().cpu().numpy(), "seg_loss": seg_loss.detach().cpu().numpy()}
        out.update({k: v.cpu().numpy() for k, v in terms.items()})
        return out

    def sync_pdcr_head_gradients(self) -> None:
        """The projection heads are outside nnU-Net's DDP module: average their gradients over the ranks as DDP
        does for the network's, so every rank takes the same step and the heads stay identical."""
        if self.is_ddp:
            average_gradients_(self.pdcr_heads.parameters())

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        keys = [k for k in train_outputs[0] if k.startswith("pdcr") or k == "seg_loss"]
        self.print_to_log_file("PDCR terms: " + ", ".join(
            f"{k} {np.mean([o[k] for o in train_outputs]):.4f}" for k in keys))

    # ------------------------------------------------------------------ checkpoints: projections travel along
    def checkpoint_state(self, filename: str) -> dict:
        return {**super().checkpoint_state(filename),
                "pdcr_heads": {k: v.detach().cpu() for k, v in self.pdcr_heads.state_dict().items()}}

    def load_checkpoint_state(self, ckpt: dict) -> None:
        super().load_checkpoint_state(ckpt)  # the optimizer state covers the projection heads as well
        if "pdcr_heads" in ckpt:
            self.pdcr_heads.load_state_dict(ckpt["pdcr_heads"])


class PDCRTrainer(PDCRRegulariserMixin, SegmentationTrainerMixin, nnUNetTrainer):
    """PDCR on nnU-Net's own schedule (no warm-up, peak lr 1e-2, poly decay); network and heads in one SGD group."""

    def configure_optimizers(self):
        params = list(self.network.parameters()) + list(self.build_pdcr_heads().parameters())
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class PDCRFinetuneTrainer(PDCRRegulariserMixin, nnUNetTrainerFinetune):
    """PDCR on the plugin's from-scratch recipe (nnUNetTrainerFinetune: nnU-Net's warm-up trainer), so that it and
    the from-scratch baseline differ only in the regulariser. The heads are a second SGD group with the network's
    settings; the warm-up and the poly decay set every group's lr."""

    def configure_optimizers(self, stage: str = "warmup_all"):
        heads = list(self.build_pdcr_heads().parameters())
        optimizer, scheduler = super().configure_optimizers(stage)
        # the warm-up's 'train' stage keeps the optimizer (and its heads group); a new one gets the heads
        if not any(p is heads[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": heads})
        return optimizer, scheduler


class PDCRFinetuneTrainer_cpu(PDCRFinetuneTrainer, nnUNetTrainerFinetune_cpu_120ep):
    """The CPU benchmark's fine-tuning budget (120 x 25 iterations, 5 warm-up epochs) with PDCR: compare it with the
    ``scratch`` row (``nnunet-ssl benchmark --methods scratch --finetune-trainer PDCRFinetuneTrainer_cpu``)."""


class PDCRUAFSTrainer(PDCRTrainer):
    """PDCR + UAFS blocks after the PDCR stages."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        return convert_decoder(net, uafs_stages=PDCRTrainer.pdcr_stages)


class PDCRUAFSFinetuneTrainer(PDCRFinetuneTrainer):
    """PDCR + UAFS blocks on the from-scratch recipe (as PDCRFinetuneTrainer)."""

    build_network_architecture = staticmethod(PDCRUAFSTrainer.build_network_architecture)


class PDCRUAFSFinetuneTrainer_cpu(PDCRUAFSFinetuneTrainer, nnUNetTrainerFinetune_cpu_120ep):
    """The CPU benchmark's fine-tuning budget with PDCR + UAFS (as PDCRFinetuneTrainer_cpu)."""


class PDCRTrainer_smoke(SmokeBudget, PDCRTrainer):
    """2 epochs x 2 iterations (set-up check)."""


class PDCRUAFSTrainer_smoke(SmokeBudget, PDCRUAFSTrainer):
    """2 epochs x 2 iterations (set-up check)."""


class PDCRFinetuneTrainer_smoke(PDCRFinetuneTrainer, nnUNetTrainerFinetune_smoke):
    """2 epochs x 2 iterations, the first a warm-up epoch (set-up check)."""
