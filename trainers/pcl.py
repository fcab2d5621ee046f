"""PCL: Positional Contrastive Learning (Zeng et al., 2021).

Position of a sample = normalised position of its centre along the volume's out-of-plane axis (nnU-Net's first
axis after ``transpose_forward``, the lowest-resolution one). For 2d configurations it is the paper's
p = (slice index + 1) / number of slices of the original volume; for 3d crops the canonical coordinate of the crop
centre. Positives: every sample (both views, any case) with |p_i - p_j| < delta; all others are negatives.
Supervised-contrastive loss scaled by temperature / base_temperature as in the paper's code."""
import torch

from nnunet_ssl.core.selection import positional_masks
from nnunet_ssl.nnunet.budget import CPUBudget, SmokeBudget
from nnunet_ssl.nnunet.engine import GlobalContrastTrainer


class PCLPretrainTrainer(GlobalContrastTrainer):
    benchmark_name = "pcl"
    delta = 0.1
    temperature = 0.1
    base_temperature = 0.07

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
        loss, terms = super().compute_loss(outputs, batch)
        return loss * (self.temperature / self.base_temperature), terms


class PCLPretrainTrainer_cpu(CPUBudget, PCLPretrainTrainer):
    pass



class PCLPretrainTrainer_smoke(SmokeBudget, PCLPretrainTrainer):
    pass
