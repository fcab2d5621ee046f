"""Spade pretraining (Zhang et al., 2022, "Keep Your Friends Close & Enemies Farther")."""
import torch
from torch import nn

from nnunet_ssl.core.affinity import box_overlap_affinity
from nnunet_ssl.core.frames import canonical_boxes
from nnunet_ssl.core.loss import affinity_weighted_loss
from nnunet_ssl.core.heads import DenseProjectionHead, GlobalProjectionHead
from nnunet_ssl.core.loss import dense_correspondence_loss, spade_global_loss
from nnunet_ssl.core.queue import PositionedQueue
from nnunet_ssl.core.selection import contrastive_masks
from nnunet_ssl.nnunet.budget import CPUBudget, SmokeBudget
from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer


class SpadePretrainTrainer(ContrastivePretrainTrainer):
    """Global (crop-level, invariant) + local (dense, equivariant) contrast with spatial-prior pair selection.

    Distances are Euclidean in the canonical frame (each case's original image extent mapped to [0,1]^3).
    Labels are never read. Defaults are meant for a GPU run on standard nnU-Net plans."""

    benchmark_name = "spade"

    # global branch: bottleneck -> GlobalProjectionHead -> unit embedding; positives: other view or centre within r_pos
    r_pos = 0.1          # canonical distance below which crops of any case are positives
    r_neg = 0.3          # canonical distance above which crops are negatives (band in between: excluded)
    temperature_global = 0.1
    global_hidden_dim = 512
    global_out_dim = 128
    # local branch: decoder stage (engine's decoder_stage) -> 1x1x1 projection -> unit voxel embeddings
    local_samples = 128  # K voxel pairs per crop, drawn in the overlap of its two views
    r_local_neg = 0.1    # canonical distance above which sampled voxels are negatives (nearer: excluded)
    temperature_local = 0.1
    local_out_dim = 64
    local_match_tolerance = 1.0  # max distance (feature voxels) between matched voxel positions
    # nearest-voxel search of the matching: 'auto' (the C selection on CPU, brute force elsewhere), 'native',
    # 'window' (an affine fit's box) or 'brute'; the same pairs either way (sample_correspondences)
    local_match_search = "auto"
    lambda_global = 1.0
    lambda_local = 1.0
    # a FIFO of earlier steps' global keys (0: off): a batch of a few crops has few far-apart ones, and the queued
    # keys farther than r_neg from an anchor become extra negatives. Keys are the momentum encoder's when
    # use_momentum_encoder is set (MoCo), else the online embeddings, detached (a memory bank).
    global_queue_size = 0
    global_queue = None

    head_inputs = {"global": "bottleneck", "local": "decoder"}
    host_only_batch_keys = ()  # the dense branch matches voxels by their coordinates: the loss reads every entry
    logged_terms = ("global", "local", "mean_pos_global", "mean_neg_global", "mean_pos_local", "mean_neg_local")

    def build_heads(self) -> nn.ModuleDict:
        dim = len(self.configuration_manager.patch_size)
        if self.global_queue_size > 0:
            self.global_queue = PositionedQueue(self.global_out_dim, self.global_queue_size).to(self.device)
        return nn.ModuleDict({
            "global": GlobalProjectionHead(self.feature_channels("bottleneck"), self.global_hidden_dim,
                                           self.global_out_dim),
            # unnormalised map: dense_correspondence_loss normalises the voxels it samples (in float32)
            "local": DenseProjectionHead(self.feature_channels("decoder"), self.local_out_dim, dim=dim,
                                         normalize=False),
        })

    def pair_selection(self, batch):
        return contrastive_masks(batch["canonical_center"], batch["sample_index"], self.r_pos, self.r_neg)

    def global_loss(self, outputs, batch):
        centers = batch["canonical_center"].to(self.device)
        q = self.global_queue
        loss, stats = spade_global_loss(outputs["global"], centers, batch["sample_index"].to(self.device),
                                        self.r_pos, self.r_neg, self.temperature_global,
                                        *((q.keys, q.positions, q.filled) if q is not None else ()))
        # after the loss, so that a batch never meets its own keys; training batches only. Under DDP outputs and
        # batch are the gathered global ones (engine), so every rank enqueues the same keys in the same order
        if q is not None and self.model.training:
            q.enqueue(outputs.get("key_global", outputs["global"]).detach(), centers)
        return loss, stats

    def stateful_modules(self) -> dict:
        queue = {"global_queue": self.global_queue} if self.global_queue is not None else {}
        return {**super().stateful_modules(), **queue}

    def local_loss(self, outputs, batch):
        return dense_correspondence_loss(
            outputs["local"], batch["coords"], batch["valid"], batch["canonical_scale"],
            batch["canonical_offset"], batch["sample_index"], self.decoder_grid(), self.local_samples,
            self.local_match_tolerance, self.r_local_neg, self.temperature_local,
            generator=self.step_generator, search=self.local_match_search)  # identical voxel samples on every DDP rank

    def compute_loss(self, outputs, batch):
        l_g, s_g = self.global_loss(outputs, batch)
        l_l, s_l = self.local_loss(outputs, batch)
        loss = self.lambda_global * l_g + self.lambda_local * l_l
        return loss, {"global": l_g, "local": l_l, "mean_pos_global": s_g["mean_pos"],
                      "mean_neg_global": s_g["mean_neg"], "mean_pos_local": s_l["mean_pos"],
                      "mean_neg_local": s_l["mean_neg"]}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.logger.get_value("train_mean_neg_global", -1) < 0.5:
            # typical when the patch covers most of each volume: every crop centre is within r_neg of the others
            self.print_to_log_file(f"WARNING: the global branch found (almost) no negatives: crop centres lie within "
                                   f"r_neg={self.r_neg} of each other; use smaller r_pos/r_neg for this dataset")


class SpadePretrainTrainer_cpu(CPUBudget, SpadePretrainTrainer):
    local_samples = 64


class SpadePretrainTrainer_smoke(SmokeBudget, SpadePretrainTrainer):
    local_samples = 32


class SpadeQueuePretrainTrainer(SpadePretrainTrainer):
    """Spade with a queue of momentum-encoder keys as extra global negatives (as MoCo, He et al. 2020): a step of a
    few crops holds ~2 crops far enough from an anchor to be its negatives, the queue of the last 256 keys ~90 (CPU
    budget). Pool validation (BENCHMARKS.md): +0.026 Dice over Spade at k = 2 (3 of 3 seeds), level at k = 5."""

    benchmark_name = "spade_queue"
    global_queue_size = 256
    use_momentum_encoder = True
    momentum = 0.99  # the keys follow the online network within ~100 steps: the queue spans 32 steps of 8 crops


class SpadeQueuePretrainTrainer_cpu(CPUBudget, SpadeQueuePretrainTrainer):
    local_samples = 64


class SpadeQueuePretrainTrainer_smoke(SmokeBudget, SpadeQueuePretrainTrainer):
    local_samples = 32



class SpadeSoftPretrainTrainer(SpadePretrainTrainer):
    """Spade with a soft global branch: no r_pos / r_neg thresholds; every pair is weighted by a continuous
    spatial affinity, in the manner of PDCR's affinity-weighted loss (Liu et al., 2022).

    a_ij = 1 for the two views of one crop, else the fraction of the smaller crop's canonical box shared by the two
    boxes (axis-aligned boxes of the crops' valid voxels in the canonical frame; 0 for disjoint crops).
    With s_ij = cos(z_i, z_j) / temperature_soft and d_ij = 1 - a_ij:
        l_ij = -( s_ij a_ij - log sum_{k != i} exp(s_ik d_ik) ),  L_global = mean over pairs i != j.
    Crops sharing anatomy are pulled together in proportion to how much they share; disjoint crops only push.
    The local branch is Spade's."""

    benchmark_name = "spade_soft"
    temperature_soft = 0.5
    logged_terms = ("global", "local", "mean_affinity_global", "mean_pos_local", "mean_neg_local")

    def build_heads(self) -> nn.ModuleDict:
        if self.global_queue_size > 0:
            raise ValueError(f"{type(self).__name__}: the soft global branch weights every pair of the batch and keeps "
                             f"no queue; set global_queue_size = 0 (it is {self.global_queue_size})")
        return super().build_heads()

    def affinity(self, batch) -> torch.Tensor:
        boxes = canonical_boxes(batch["coords"], batch["valid"], batch["canonical_scale"],
                                batch["canonical_offset"])
        a = box_overlap_affinity(boxes)
        s = batch["sample_index"]
        return torch.where(s[:, None] == s[None, :], torch.ones_like(a), a)

    def pair_selection(self, batch):
        # for inspection: pairs sharing any anatomy attract (a > 0), the others only repel
        a = self.affinity(batch)
        eye = torch.eye(len(a), dtype=torch.bool)
        return (a > 0) & ~eye, (a == 0) & ~eye

    def global_loss(self, outputs, batch):
        a = self.affinity(batch).to(self.device)
        valid = ~torch.eye(len(a), dtype=torch.bool, device=self.device)
        loss, stats = affinity_weighted_loss(outputs["global"], a, valid, self.temperature_soft)
        return loss, stats

    def compute_loss(self, outputs, batch):
        l_g, s_g = self.global_loss(outputs, batch)
        l_l, s_l = self.local_loss(outputs, batch)
        loss = self.lambda_global * l_g + self.lambda_local * l_l
        return loss, {"global": l_g, "local": l_l, "mean_affinity_global": s_g["mean_affinity"],
                      "mean_pos_local": s_l["mean_pos"], "mean_neg_local": s_l["mean_neg"]}

    def on_train_epoch_end(self, train_outputs):
        ContrastivePretrainTrainer.on_train_epoch_end(self, train_outputs)


class SpadeSoftPretrainTrainer_cpu(CPUBudget, SpadeSoftPretrainTrainer):
    local_samples = 64



class SpadeSoftPretrainTrainer_smoke(SmokeBudget, SpadeSoftPretrainTrainer):
    local_samples = 32
