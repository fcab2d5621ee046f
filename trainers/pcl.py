"""PCL: Positional Contrastive Learning (Zeng et al., 2021).

Position of a sample = normalised position of its centre along the volume's out-of-plane axis (nnU-Net's first
axis after ``transpose_forward``, the lowest-resolution one). For 2d configurations it is the paper's
p = (slice index + 1) / number of slices of the original volume; for 3d crops the canonical coordinate of the crop
centre. Positives: every sample (both views, any case) with |p_i - p_j| < delta; all others are negatives.
Supervised-contrastive loss scaled by temperature / base_temperature as in the paper's code."""
import torch
from torch import nn

from nnunet_ssl.core.heads import GlobalProjectionHead
from nnunet_ssl.core.losses import info_nce
from nnunet_ssl.core.selection import positional_masks
from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer, CPUBudget, SmokeBudget


class PCLPretrainTrainer(ContrastivePretrainTrainer):
    delta = 0.1
    temperature = 0.1
    base_temperature = 0.07
    global_hidden_dim = 512
    global_out_dim = 128

    head_inputs = {"global": "bottleneck"}
    logged_terms = ("mean_pos_global", "mean_neg_global")

    def build_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"global": GlobalProjectionHead(self.feature_channels("bottleneck"),
                                                             self.global_hidden_dim, self.global_out_dim)})

    def positions(self, batch) -> torch.Tensor:
        """Normalised out-of-plane position of each sample's centre."""
        p = batch["canonical_center"][:, 0]
        if len(self.configuration_manager.patch_size) == 2:
            # 2d: the axis is not resampled, so canonical_scale[0] = 1 / N_slices and u = (index + 0.5) / N
            p = p + 0.5 * batch["canonical_scale"][:, 0]
        return p

    def pair_selection(self, batch):
        return positional_masks(self.positions(batch), self.delta, batch["sample_index"])

    def compute_loss(self, outputs, batch):
        pos, neg = self.pair_selection(batch)
        loss, stats = info_nce(outputs["global"], None, pos, neg, self.temperature)
        return loss * (self.temperature / self.base_temperature), {"mean_pos_global": stats["mean_pos"],
                                                                   "mean_neg_global": stats["mean_neg"]}


class PCLPretrainTrainer_cpu(CPUBudget, PCLPretrainTrainer):
    pass



class PCLPretrainTrainer_smoke(SmokeBudget, PCLPretrainTrainer):
    pass
