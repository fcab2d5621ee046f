"""Masked-region reconstruction (the non-contrastive anchor) and Spade + reconstruction (the hybrid).

Both train the *whole* decoder: the reconstruction head reads the last decoder stage at full resolution, so no
decoder stage reaches fine-tuning with random weights (Spade's local branch alone trains the decoder only up to
its ``decoder_stage``)."""
from torch import nn

from nnunet_ssl.core.heads import ReconstructionHead
from nnunet_ssl.core.loss.masked_reconstruction import masked_reconstruction_loss
from nnunet_ssl.core.masking import block_mask
from nnunet_ssl.nnunet.budget import CPUBudget, SmokeBudget
from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer
from nnunet_ssl.trainers.spade import SpadePretrainTrainer


class MaskedInputMixin:
    """Masks ``mask_ratio`` of each view in cubes of ``mask_block`` voxels (zero = the mean of z-scored
    intensities) before the forward pass; the reconstruction loss reads the unmasked view and the mask."""
    mask_ratio = 0.6
    mask_block = 8       # voxels per cube edge (Hippocampus CPU crops 24x32x24: 3x4x3 cubes)
    lambda_recon = 1.0

    def prepare_input(self, data, batch):
        mask = block_mask(data.shape[0], data.shape[2:], self.mask_block, self.mask_ratio,
                          generator=self.step_generator, device=data.device).to(data.dtype)
        # a float mask: per-row batch entries are gathered across DDP ranks, and collectives need not support bool
        batch["recon_target"], batch["recon_mask"] = data, mask
        return data * (1 - mask)[:, None]

    def reconstruction_head(self) -> nn.Module:
        return ReconstructionHead(self.feature_channels("full"), self.num_input_channels,
                                  dim=len(self.configuration_manager.patch_size))

    def reconstruction_loss(self, outputs, batch):
        return masked_reconstruction_loss(outputs["recon"], batch["recon_target"], batch["recon_mask"])


class MaskedReconPretrainTrainer(MaskedInputMixin, ContrastivePretrainTrainer):
    """Masked image modelling for nnU-Net's CNNs: 60 % of each crop masked in 8-voxel cubes, reconstructed by the
    full U-Net + a 1x1 head, MSE on the masked voxels. Labels are never read; the two views of the loader are
    simply two independently masked samples."""

    benchmark_name = "recon"
    head_inputs = {"recon": "full"}
    logged_terms = ("recon",)

    def build_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"recon": self.reconstruction_head()})

    def compute_loss(self, outputs, batch):
        loss = self.reconstruction_loss(outputs, batch)
        return loss, {"recon": loss}


class SpadeReconPretrainTrainer(MaskedInputMixin, SpadePretrainTrainer):
    """Spade's global + local contrast on masked views, plus masked reconstruction:
    L = lambda_global * L_global + lambda_local * L_local + lambda_recon * L_recon (1, 1, 1).
    Masking each view independently also acts as an extra augmentation for the contrast (cut-out); the weights
    are equal because at the start the three terms are of the same order on z-scored inputs (InfoNCE ~2-6,
    MSE ~1) and none of them should dominate the encoder."""

    benchmark_name = "spade_recon"
    head_inputs = {"global": "bottleneck", "local": "decoder", "recon": "full"}
    logged_terms = SpadePretrainTrainer.logged_terms + ("recon",)

    def build_heads(self) -> nn.ModuleDict:
        heads = super().build_heads()
        heads["recon"] = self.reconstruction_head()
        return heads

    def compute_loss(self, outputs, batch):
        loss, terms = super().compute_loss(outputs, batch)
        l_r = self.reconstruction_loss(outputs, batch)
        return loss + self.lambda_recon * l_r, {**terms, "recon": l_r}


class MaskedReconPretrainTrainer_cpu(CPUBudget, MaskedReconPretrainTrainer):
    """The CPU budget of SpadePretrainTrainer_cpu."""


class MaskedReconPretrainTrainer_cpu_640ep(MaskedReconPretrainTrainer_cpu):
    """The CPU budget's masked reconstruction pretrained sixteen times as long (640 x 25 = 16 000 iterations, ~22 min
    on 2 cores in bf16): at that length, not at 1000 or 4000 iterations, the start is ahead of from-scratch nnU-Net
    with 2 labelled Hippocampus cases (BENCHMARKS.md, the test split)."""
    num_epochs = 640


class MaskedReconPretrainTrainer_smoke(SmokeBudget, MaskedReconPretrainTrainer):
    pass


class SpadeReconPretrainTrainer_cpu(CPUBudget, SpadeReconPretrainTrainer):
    local_samples = 64


class SpadeReconPretrainTrainer_smoke(SmokeBudget, SpadeReconPretrainTrainer):
    local_samples = 32
