"""DrasCLR (Yu et al., 2023): anatomy-location-conditioned contrastive learning.

* Anatomical location of a crop = its canonical position (the foundation's spatial metadata) instead of an atlas
  registration. The conditioning lives in the projection head only (a mixture of experts gated by location), so
  the U-Net handed to nnU-Net stays the stock architecture.
* A momentum (key) copy of U-Net + head (momentum 0.999) and a negative queue organised by location bins: the
  negatives of an anchor at location l are keys of *other subjects* stored in l's bin.
* L = L_local (anchor query vs the momentum key of its other view) + beta * L_neighbour (the k crops sampled next
  to the anchor in the same scan vs the anchor's key), both against the anchor's negatives; temperature 0.2.
  The loader draws the k neighbours near view 0 (overlap ``neighbor_overlap``), so they are the anchor's nearest
  crops by construction.
* Queue and momentum encoder are saved in the checkpoint and restored with ``--c``.
"""
import zlib

import torch
from torch import nn

from nnunet_ssl.core.heads import LocationConditionedHead
from nnunet_ssl.core.loss.drasclr import drasclr_loss
from nnunet_ssl.core.queue import LocationBinnedQueue
from nnunet_ssl.nnunet.budget import CPUBudget, SmokeBudget
from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer


def subject_ids(keys) -> torch.Tensor:
    """Stable integer id per case identifier (the same in every process and run)."""
    return torch.tensor([zlib.crc32(str(k).encode()) for k in keys], dtype=torch.long)


class DrasCLRPretrainTrainer(ContrastivePretrainTrainer):
    benchmark_name = "drasclr"
    temperature = 0.2
    beta = 1.0
    num_neighbors = 2               # k
    neighbor_overlap = (0.1, 0.5)
    use_momentum_encoder = True
    momentum = 0.999
    queue_size = 4096
    queue_bins_per_axis = 3         # 27 location bins over the canonical cube
    num_experts = 4
    global_hidden_dim = 512
    global_out_dim = 128

    head_inputs = {"global": "bottleneck"}
    logged_terms = ("local", "neighbour", "mean_neg")
    queue = None  # LocationBinnedQueue, built with the heads

    def build_heads(self) -> nn.ModuleDict:
        self.queue = LocationBinnedQueue(self.global_out_dim, self.queue_size, self.queue_bins_per_axis).to(
            self.device)
        return nn.ModuleDict({"global": LocationConditionedHead(
            self.feature_channels("bottleneck"), self.global_hidden_dim, self.global_out_dim, self.num_experts)})

    def head_condition(self, batch):
        return batch["canonical_center"].to(self.device)

    def _rows(self, batch):
        # rows: view 0 of the B cases, view 1, then the neighbour crops (loader layout); B from the host-side keys,
        # index tensors where the batch is: no device synchronisation
        v = batch["view_index"]
        b = len(batch["keys"])
        ar = lambda lo, hi: torch.arange(lo, hi, device=v.device)  # noqa: E731
        return b, ar(0, b), ar(b, 2 * b), ar(2 * b, len(v))

    def pair_selection(self, batch):
        """Crop-level view of the rule for inspection: positives of a crop are its other view and its
        neighbours (same scan); negatives are crops of other subjects in the same location bin (what the queue
        holds for it)."""
        case = batch["case_index"]
        same_case = case[:, None] == case[None, :]
        n = len(case)
        eye = torch.eye(n, dtype=torch.bool)
        bins = self.queue.bin_index(batch["canonical_center"].to(self.queue.keys.device)).cpu() \
            if self.queue is not None else torch.zeros(n, dtype=torch.long)
        pos = same_case & ~eye
        neg = ~same_case & (bins[:, None] == bins[None, :])
        return pos, neg

    def compute_loss(self, outputs, batch):
        b, anchor, other, neigh = self._rows(batch)
        dev = self.device
        q = outputs["global"]
        k = outputs["key_global"]
        loc = batch["canonical_center"].to(dev)
        subj = subject_ids(batch["keys"]).to(dev, non_blocking=True)
        neg_keys, neg_mask = self.queue.negatives(loc[anchor], subj)
        q_neigh = q[neigh].view(self.num_neighbors, b, -1).transpose(0, 1) if self.num_neighbors else None
        loss, stats = drasclr_loss(q[anchor], k[other], q_neigh, neg_keys, neg_mask, self.temperature, self.beta)
        # under DDP outputs and batch are the gathered global ones (engine): every rank enqueues the same keys in the
        # same order, so the queues stay identical without being synchronised
        if self.model.training:  # the queue only learns from training batches
            self.queue.enqueue(k[other], loc[other], subj)
        return loss, {"local": stats["local"], "neighbour": stats["neighbour"], "mean_neg": stats["mean_neg"]}

    def stateful_modules(self) -> dict:
        return {**super().stateful_modules(), "queue": self.queue}


class DrasCLRPretrainTrainer_cpu(CPUBudget, DrasCLRPretrainTrainer):
    queue_size = 512



class DrasCLRPretrainTrainer_smoke(SmokeBudget, DrasCLRPretrainTrainer):
    queue_size = 64
