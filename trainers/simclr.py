"""SimCLR baseline (Chen et al., 2020): the control that shows what spatial priors add.

Same encoder, global head, crops, augmentation and budget as Spade's global branch; the only positive of a crop
is its other view and every other crop of the batch is a negative (NT-Xent)."""
from torch import nn

from nnunet_ssl.core.heads import GlobalProjectionHead
from nnunet_ssl.core.losses import info_nce
from nnunet_ssl.core.selection import instance_masks
from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer, CPUBudget, SmokeBudget


class SimCLRPretrainTrainer(ContrastivePretrainTrainer):
    temperature = 0.1
    global_hidden_dim = 512
    global_out_dim = 128

    head_inputs = {"global": "bottleneck"}
    logged_terms = ("mean_pos_global", "mean_neg_global")

    def build_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"global": GlobalProjectionHead(self.feature_channels("bottleneck"),
                                                             self.global_hidden_dim, self.global_out_dim)})

    def pair_selection(self, batch):
        return instance_masks(batch["sample_index"])

    def compute_loss(self, outputs, batch):
        pos, neg = self.pair_selection(batch)
        loss, stats = info_nce(outputs["global"], None, pos, neg, self.temperature)
        return loss, {"mean_pos_global": stats["mean_pos"], "mean_neg_global": stats["mean_neg"]}


class SimCLRPretrainTrainer_cpu(CPUBudget, SimCLRPretrainTrainer):
    """The CPU budget of SpadePretrainTrainer_cpu."""



class SimCLRPretrainTrainer_smoke(SmokeBudget, SimCLRPretrainTrainer):
    pass
