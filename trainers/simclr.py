"""SimCLR baseline (Chen et al., 2020): the control that shows what spatial priors add.

Same encoder, global head, crops, augmentation and budget as Spade's global branch; the only positive of a crop
is its other view and every other crop of the batch is a negative (NT-Xent)."""
from nnunet_ssl.core.selection import instance_masks
from nnunet_ssl.nnunet.budget import CPUBudget, SmokeBudget
from nnunet_ssl.nnunet.engine import GlobalContrastTrainer


class SimCLRPretrainTrainer(GlobalContrastTrainer):
    """temperature 0.1; Spade's global head (FC(512) -> ReLU per voxel, mean, BatchNorm -> FC(128))."""

    benchmark_name = "simclr"

    def pair_selection(self, batch):
        return instance_masks(batch["sample_index"])


class SimCLRPretrainTrainer_cpu(CPUBudget, SimCLRPretrainTrainer):
    """The CPU budget of SpadePretrainTrainer_cpu."""


class SimCLRPretrainTrainer_smoke(SmokeBudget, SimCLRPretrainTrainer):
    pass
