"""Shared engine of all contrastive pretraining trainers: a subclass of nnUNetTrainer.

A pretraining method is a small subclass that declares
  * its heads (:meth:`build_heads`, fed from the U-Net bottleneck and/or one decoder stage), and
  * its objective (:meth:`compute_loss`, a pure-tensor function of the head outputs and the batch metadata).
The engine owns everything else: the two-view loader with spatial metadata, AMP, optimisation, logging and
the progress plot, atomic checkpoints, and the hand-off of the full U-Net to stock nnU-Net
(``nnUNetv2_train ... -pretrained_weights checkpoint_final.pth``).

Method hyper-parameters and the training budget are class attributes, so variants are declarations::

    class SpadePretrainTrainer_cpu(CPUBudget, SpadePretrainTrainer):
        crop_scale = 0.5

Layout: :class:`PretrainingEngine` holds the pretraining itself (set-up, steps, epoch logging, what a checkpoint
holds); :class:`ContrastivePretrainTrainer` composes the plugin's shared behaviour around it through ``super()``
(declared budgets, CPU fast path, throttled progress plot, crash-safe checkpoint writes). The model wrapper lives in
``model``, the budgets in ``budget``, the log and its plot in ``pretraining_log``.
"""
from __future__ import annotations

import copy
import os
from time import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from torch import nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from nnunet_ssl.core.distributed import cases_per_rank, gather_global_batch, shared_seed
from nnunet_ssl.core.heads import GlobalProjectionHead
from nnunet_ssl.core.loss.info_nce import info_nce
from nnunet_ssl.core.momentum import momentum_update
from nnunet_ssl.core.selection import view_pairs
from nnunet_ssl.nnunet.budget import BudgetMixin, DeclaredBudgetMixin
from nnunet_ssl.nnunet.checkpoint import CheckpointFormatMixin, CrashSafeCheckpointsMixin
from nnunet_ssl.nnunet.cpu_fast import CPUFastPathMixin
from nnunet_ssl.nnunet.model import ContrastiveModel, encoder_grid, encoder_strides, unwrap
from nnunet_ssl.nnunet.pair_loader import TwoViewDataLoader
from nnunet_ssl.nnunet.pretraining_log import ContrastiveLocalLogger
from nnunet_ssl.nnunet.progress import ThrottledProgressPlotMixin
from nnunet_ssl.nnunet.transforms import split_training_transforms
from nnunet_ssl.nnunet.unlabeled import CombinedDataset, load_unlabeled_dataset
from nnunet_ssl.nnunet.weight_scale import reset_conv_scales, scale_invariant_convs

# loader-batch entries that describe a crop for inspection and tests (nnunet-ssl inspect-pairs, the loader's
# geometric tests) but that no loss reads: never copied to the device or gathered across DDP ranks
# (documentation/batch_contract.md lists every key and its readers)
DESCRIPTIVE_BATCH_KEYS = ("bbox", "overlap", "neighbor_overlap", "mm_scale", "mm_offset", "size_mm", "aug_affine",
                          "aug_mirror", "aug_elastic")


def load_head_state(heads: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """heads.load_state_dict, failing in one line when the checkpoint's heads are of another design (e.g. global
    heads written before they had a BatchNorm): the network weights of such a checkpoint still hand off."""
    own, theirs = set(heads.state_dict()), set(state)
    if own != theirs:
        missing, unexpected = sorted(own - theirs), sorted(theirs - own)
        raise ValueError(f"the checkpoint's projection heads do not match this trainer's (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): it was written by another version or trainer; start the "
                         f"pretraining afresh (its network_weights still load with -pretrained_weights)")
    heads.load_state_dict(state)


class PretrainingEngine(CheckpointFormatMixin, nnUNetTrainer):
    """Pretraining on nnU-Net's data and network: methods (subclasses of ContrastivePretrainTrainer) implement
    build_heads and compute_loss."""

    # row name of a method in ``nnunet-ssl benchmark`` (declared by the method's base trainer; variants inherit it)
    benchmark_name: Optional[str] = None
    # ---- budget (nnU-Net attributes; GPU-scale defaults) ----
    num_epochs: int = 300
    num_iterations_per_epoch: int = 250
    num_val_iterations_per_epoch: int = 25
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    save_every: int = 25
    # checkpoint_final.pth hands each conv block over with He initialisation's weight scale (see weight_scale)
    reset_conv_scales_at_hand_off: bool = True
    # ---- sampling ----
    cases_per_step: Optional[int] = None  # cases per step over all DDP ranks (2 views each); None = plans' batch
    crop_overlap: Tuple[float, float] = (0.3, 0.9)  # min/max fraction of voxels the two crops share
    # pretraining crop = crop_scale x the plans' patch size (rounded down to what the U-Net can divide). Crops
    # smaller than the volumes are what gives them different positions: with nnU-Net's patch often as large as the
    # median volume (small datasets), crop_scale=1 leaves the crops almost no room to move.
    crop_scale: float = 0.75
    num_neighbors: int = 0  # further crops per case near view 0 (DrasCLR's anatomical neighbours)
    neighbor_overlap: Tuple[float, float] = (0.1, 0.5)
    # add the image-only cases of `nnunet-ssl add-unlabeled` (for these plans + configuration) to the training cases
    use_unlabeled: bool = True
    # ---- model ----
    head_inputs: Dict[str, str] = {}  # head name -> 'bottleneck' | 'decoder'
    decoder_stage: Optional[int] = -2  # decoder stage feeding dense heads (-2: one below full resolution)
    grad_clip: float = 12.0
    # momentum (key) copy of U-Net + heads, updated as an exponential moving average after every step; its
    # outputs reach compute_loss as outputs["key_<head>"] (MoCo / DrasCLR)
    use_momentum_encoder: bool = False
    momentum: float = 0.999
    # loss terms compute_loss reports (logged per epoch for train and validation)
    logged_terms: Tuple[str, ...] = ()
    # loader-batch entries the loss never reads, left out of the device batch: the per-voxel coordinate maps (4 values
    # per input voxel) skip the copy (and, under DDP, the gather) unless a method's loss reads them (Spade: ())
    host_only_batch_keys: Tuple[str, ...] = ("coords", "valid")
    # random generator for sampling inside compute_loss: None (global RNG) in one process; under DDP seeded
    # identically on all ranks every step, so that each rank draws the same samples of the gathered batch
    step_generator: torch.Generator | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.logger.local_logger = ContrastiveLocalLogger(self.logged_terms)
        self.heads = None
        self.model = None
        self.key_model = None
        self.best_val_loss = None

    # ------------------------------------------------------------------ to implement by methods
    def build_heads(self) -> nn.ModuleDict:
        raise NotImplementedError

    def compute_loss(self, outputs: Dict[str, torch.Tensor], batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return (total loss, {term: scalar}) with terms named as in ``logged_terms``."""
        raise NotImplementedError

    def prepare_input(self, data: torch.Tensor, batch: dict) -> torch.Tensor:
        """The network's input for this step (default: the views as loaded). Masked reconstruction masks it here
        and leaves what its loss needs in ``batch``."""
        return data

    def head_condition(self, batch: dict) -> Optional[torch.Tensor]:
        """Per-crop input of conditioned heads (None: no head is conditioned)."""
        return None

    def pair_selection(self, batch: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """Crop-level (positive, negative) masks (N,N) of the method's selection rule, for ``nnunet-ssl
        inspect-pairs``; methods whose rule is crop-level use the same function in compute_loss."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a crop-level selection rule")

    def method_hyperparameters(self) -> dict:
        """Class-level settings of the method and its budget, recorded in the log and in checkpoints."""
        out = {}
        for klass in reversed(type(self).__mro__):
            if issubclass(klass, (PretrainingEngine, BudgetMixin)):
                out.update({k: v for k, v in vars(klass).items() if not k.startswith("_")
                            and isinstance(v, (int, float, str, bool, tuple, dict, type(None)))})
        return out

    # ------------------------------------------------------------------ geometry helpers for methods
    def feature_channels(self, where: str) -> int:
        enc = self.network.encoder
        if where == "bottleneck":
            return int(enc.output_channels[-1])
        if where == "full":
            return int(enc.output_channels[0])
        stage = self.decoder_stage % len(self.network.decoder.stages)
        return int(enc.output_channels[-(stage + 2)])

    def decoder_grid(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """(scale, offset) of the decoder stage feeding dense heads: where its voxel i sits in the input. Read from
        the network's convolutions once per (network, stage): walking the modules every step costs ~50 us."""
        stage = self.decoder_stage % len(self.network.decoder.stages)
        cached = getattr(self, "_decoder_grid_cache", None)
        if cached is None or cached[0] is not self.network or cached[1] != stage:
            grid = encoder_grid(self.network, len(self.network.encoder.stages) - (stage + 2))
            self._decoder_grid_cache = cached = (self.network, stage, grid)
        return cached[2]

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        # the pretraining set-up instead of nnU-Net's (no segmentation loss, heads, one module for DDP); the mixins
        # of ContrastivePretrainTrainer run around it (thread cap before, CPU fast path after)
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        self._set_batch_size_and_oversample()
        if self.cases_per_step is not None:
            # cases_per_step counts the cases of one step over all DDP processes, split as nnU-Net splits its
            # batch size (the losses gather the whole batch, so the ranks together see cases_per_step cases)
            split = cases_per_rank(int(self.cases_per_step), dist.get_world_size() if self.is_ddp else 1,
                                   "cases_per_step")
            self.batch_size = split[self.local_rank]
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, False).to(self.device)
        self.heads = self.build_heads().to(self.device)
        model = ContrastiveModel(self.network, self.heads, self.head_inputs, self.decoder_stage)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects of the optimizer
            self.network, self.heads = model.network, model.heads
            # decoder stages above decoder_stage and the segmentation layers get no gradient in pretraining
            model = DDP(model, device_ids=[self.local_rank], find_unused_parameters=True)
        self.model = model
        if self.use_momentum_encoder:
            self.key_model = copy.deepcopy(unwrap(model)).requires_grad_(False)
        self.loss = None
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True
        self.print_to_log_file("pretraining hyper-parameters:", self.method_hyperparameters())
        self.logger.update_config({"hparas": {"num_epochs": self.num_epochs, "batch_size": self.batch_size,
                                              **{k: str(v) for k, v in self.method_hyperparameters().items()}}})

    def _do_i_compile(self):
        return False  # the pretraining forward is custom; compile is not worth its start-up here

    def cpu_fast_path_modules(self) -> list[nn.Module]:
        return [self.network, self.heads, self.key_model]

    def configure_optimizers(self):
        params = list(self.network.parameters()) + list(self.heads.parameters())
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).decoder.deep_supervision = enabled

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.pretraining_patch_size()
        rotation_for_DA, do_dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        dim = len(patch_size)
        initial_patch_size = get_patch_size(patch_size[-dim:], rotation_for_DA, rotation_for_DA, rotation_for_DA,
                                            (0.85, 1.25))
        if do_dummy_2d:
            initial_patch_size[0] = patch_size[0]
        self.print_to_log_file(f"pretraining crop {tuple(patch_size)} (plans patch "
                               f"{tuple(self.configuration_manager.patch_size)}, crop_scale {self.crop_scale})")
        spatial, intensity = self.get_pretraining_transforms(patch_size, rotation_for_DA, mirror_axes, do_dummy_2d)
        # validation: same geometry, no intensity augmentation, so the loss is comparable across epochs
        val_spatial, _ = self.get_pretraining_transforms(patch_size, rotation_for_DA, mirror_axes, do_dummy_2d)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        common = dict(label_manager=self.label_manager, transpose_forward=self.plans_manager.transpose_forward,
                      overlap_range=self.crop_overlap, num_neighbors=self.num_neighbors,
                      neighbor_overlap=self.neighbor_overlap)
        dl_tr = TwoViewDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size,
                                  spatial_transforms=spatial, intensity_transforms=intensity, **common)
        dl_val = TwoViewDataLoader(dataset_val, self.batch_size, initial_patch_size, patch_size,
                                   spatial_transforms=val_spatial, intensity_transforms=ComposeTransforms([]),
                                   **common)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                   pin, 0.002)
        next(gen_tr)
        next(gen_val)
        return gen_tr, gen_val

    def get_tr_and_val_datasets(self):
        """nnU-Net's split of the labelled cases; training also gets the unlabelled cases (validation does not, so
        the validation loss stays comparable across runs with and without them)."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.use_unlabeled:
            return dataset_tr, dataset_val
        unlabeled = load_unlabeled_dataset(self.preprocessed_dataset_folder_base, self.plans_manager,
                                           self.configuration_manager)
        if unlabeled is None:
            return dataset_tr, dataset_val
        # raises on an id shared with any labelled case, not only with this fold's training cases
        CombinedDataset(self.dataset_class(self.preprocessed_dataset_folder), unlabeled)
        self.print_to_log_file(f"pretraining cases: {len(dataset_tr.identifiers)} labelled + "
                               f"{len(unlabeled.identifiers)} unlabelled (from {unlabeled.source_folder}) for "
                               f"training, {len(dataset_val.identifiers)} labelled for validation")
        return CombinedDataset(dataset_tr, unlabeled), dataset_val

    def pretraining_patch_size(self) -> Tuple[int, ...]:
        """Plans patch size x crop_scale, rounded down to a multiple of the network's total stride per axis."""
        plans_ps = np.asarray(self.configuration_manager.patch_size)
        if self.crop_scale == 1.0:
            return tuple(int(p) for p in plans_ps)
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        div = encoder_strides(self.network)[-1]
        size = np.maximum(div, np.floor(plans_ps * self.crop_scale / div) * div)
        return tuple(int(s) for s in size)

    def get_pretraining_transforms(self, patch_size, rotation_for_DA, mirror_axes, do_dummy_2d):
        """nnU-Net's training augmentation (this trainer's own get_training_transforms), split into the spatial
        part (image + coordinate channels) and the intensity part (image only)."""
        transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        return split_training_transforms(transforms)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", enabled=True)
        return self.cpu_autocast()  # bf16 on CPUs with native bf16 (CPUFastPathMixin), else a no-op

    def batch_to_device(self, batch: dict) -> dict:
        """The loader batch with every tensor on the training device, copied before the forward pass so that on a
        GPU the copies overlap it instead of stalling the loss (host-to-device copies from pageable memory are
        safe with non_blocking). The two-view layout is checked first, on the host: on the device that check
        would wait for every queued kernel."""
        if "sample_index" in batch and "keys" in batch:
            view_pairs(batch["sample_index"][:2 * len(batch["keys"])].cpu())  # one-line error if not two views
        skip = set(self.host_only_batch_keys) | set(DESCRIPTIVE_BATCH_KEYS)
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items() if k not in skip}

    def _step(self, batch: dict, train: bool) -> dict:
        batch = self.batch_to_device(batch)
        data = self.cpu_fast_input(self.prepare_input(batch["data"], batch))
        condition = self.head_condition(batch)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.model(data, condition)
            if self.key_model is not None:
                with torch.no_grad():
                    self.key_model.train(self.model.training)
                    outputs.update({f"key_{k}": v.detach() for k, v in self.key_model(data, condition).items()})
        if self.is_ddp:
            # every rank computes the loss of the whole global batch (negatives from all ranks), on identical
            # inputs and with identical random sampling, so the ranks agree on loss, queues and statistics
            outputs, batch = gather_global_batch(outputs, batch, views=2 + self.num_neighbors)
            self.step_generator = torch.Generator(self.device).manual_seed(shared_seed(self.device))
        loss, terms = self.compute_loss(outputs, batch)  # losses compute in float32 themselves
        if train:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            # under DDP each rank back-propagates the global loss through its own rows only, and DDP averages the
            # ranks' gradients: x world_size turns that average into the gradient of the global loss
            backward_loss = loss * dist.get_world_size() if self.is_ddp else loss
            if self.grad_scaler is not None:
                self.grad_scaler.scale(backward_loss).backward()
                self.grad_scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                backward_loss.backward()
                self.step_if_finite(params, self.grad_clip)
            if self.key_model is not None:
                momentum_update(unwrap(self.model), self.key_model, self.momentum)
        # checked once the step is queued (one synchronisation per step, not one before the backward pass); a
        # non-finite loss has non-finite gradients, which the step skipped (GradScaler / step_if_finite)
        out = {"loss": loss.detach().cpu().numpy()}
        if not np.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite pretraining loss ({out['loss']}) at epoch {self.current_epoch}; "
                                     f"lower initial_lr or check the input data for NaNs")
        out.update({k: torch.as_tensor(v).detach().float().cpu().numpy() for k, v in terms.items()})
        return out

    def train_step(self, batch: dict) -> dict:
        return self._step(batch, train=True)

    def validation_step(self, batch: dict) -> dict:
        return self._step(batch, train=False)

    def on_train_epoch_start(self):
        self.model.train()
        super().on_train_epoch_start()
        self.model.train()

    def on_validation_epoch_start(self):
        self.model.eval()

    def _log_epoch(self, outputs: List[dict], prefix: str):
        means = {k: float(np.mean([np.asarray(o[k]) for o in outputs])) for k in outputs[0]}
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {k: float(np.mean([g[k] for g in gathered])) for k in means}
        self.logger.log(f"{prefix}_losses", means["loss"], self.current_epoch)
        for t in self.logged_terms:
            self.logger.log(f"{prefix}_{t}", means.get(t, float("nan")), self.current_epoch)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        self._log_epoch(train_outputs, "train")

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        self._log_epoch(val_outputs, "val")

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        lg = self.logger.get_value
        ep = self.current_epoch
        terms = ", ".join(f"{t} {lg('train_' + t, -1):.4g}/{lg('val_' + t, -1):.4g}" for t in self.logged_terms)
        self.print_to_log_file(f"train_loss {lg('train_losses', -1):.4f}  val_loss {lg('val_losses', -1):.4f}")
        if terms:
            self.print_to_log_file(f"(train/val) {terms}")
        self.print_to_log_file(f"Epoch time: {lg('epoch_end_timestamps', -1) - lg('epoch_start_timestamps', -1):.2f} s")
        if (ep + 1) % self.save_every == 0 and ep != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        val = lg("val_losses", -1)
        if np.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = float(val)
            self.print_to_log_file(f"New best validation contrastive loss: {val:.4f}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        # pretraining has no segmentation head worth evaluating: nnU-Net's final sliding-window validation is skipped
        self.print_to_log_file("Pretraining run: skipping nnU-Net's segmentation validation. Fine-tune with "
                               "nnUNetv2_train ... -pretrained_weights "
                               f"{join(self.output_folder, 'checkpoint_final.pth')}")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, filename: str) -> dict:
        state = super().checkpoint_state(filename)
        if os.path.basename(filename) == "checkpoint_final.pth" and self.reset_conv_scales_at_hand_off:
            # the hand-off: conv scales reset to He initialisation's (same function; see weight_scale). Only the
            # final checkpoint: latest/best ones resume training, whose momentum buffers match the old scales.
            state["network_weights"] = reset_conv_scales(state["network_weights"],
                                                         scale_invariant_convs(unwrap(self.network)))
        state.update({
            "ssl_heads": {k: v.detach().cpu() for k, v in self.heads.state_dict().items()},
            "ssl_method": {"trainer": self.__class__.__name__, **{k: repr(v) for k, v in
                                                                  self.method_hyperparameters().items()}},
            "ssl_extra_state": self.extra_checkpoint_state(),
            "ssl_best_val_loss": self.best_val_loss,
        })
        return state

    def stateful_modules(self) -> dict:
        """Method state beyond network and heads that a resumed run needs, by checkpoint key: the momentum encoder
        here; methods add their queues (``{**super().stateful_modules(), "queue": self.queue}``)."""
        return {"key_model": self.key_model} if self.key_model is not None else {}

    def extra_checkpoint_state(self) -> dict:
        # CPU clones: the checkpoint is written while training goes on, and must not alias device buffers
        return {name: {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                       for k, v in module.state_dict().items()}
                for name, module in self.stateful_modules().items()}

    def check_extra_state(self, state: dict) -> None:
        """Refuse, in one line, a checkpoint whose method state is missing or does not fit (e.g. a queue of another
        size): load_state_dict would fail only after the network had loaded, with a multi-line error."""
        modules = self.stateful_modules()
        missing = [name for name in modules if name not in state]
        if missing:
            raise ValueError(f"checkpoint has no {', '.join(repr(m) for m in missing)} state although "
                             f"{self.__class__.__name__} keeps it: it was written by another trainer or "
                             "configuration; start a new run instead of --c")
        for name, module in modules.items():
            own = {k: tuple(getattr(v, "shape", ())) for k, v in module.state_dict().items()}
            saved = {k: tuple(getattr(v, "shape", ())) for k, v in state[name].items()}
            if own != saved:
                diff = sorted(set(own) ^ set(saved)) or [k for k in own if own[k] != saved[k]]
                k = diff[0]
                raise ValueError(f"checkpoint's {name!r} state does not fit {self.__class__.__name__} ({k}: "
                                 f"{saved.get(k, 'absent')} in the checkpoint, {own.get(k, 'absent')} here): it was "
                                 "written with other settings; start a new run instead of --c")

    def load_extra_state(self, state: dict) -> None:
        self.check_extra_state(state)
        for name, module in self.stateful_modules().items():
            module.load_state_dict(state[name])

    def load_checkpoint_state(self, ckpt: dict) -> None:
        if "ssl_heads" not in ckpt:
            raise ValueError("checkpoint was not written by an nnunet_ssl pretraining trainer (no 'ssl_heads'); "
                             "use -pretrained_weights to start from other weights")
        self.check_extra_state(ckpt.get("ssl_extra_state", {}))  # refused before anything loads: no half-loaded run
        super().load_checkpoint_state(ckpt)
        load_head_state(self.heads, ckpt["ssl_heads"])
        self.load_extra_state(ckpt.get("ssl_extra_state", {}))
        self.best_val_loss = ckpt.get("ssl_best_val_loss")


class ContrastivePretrainTrainer(DeclaredBudgetMixin, CrashSafeCheckpointsMixin, CPUFastPathMixin,
                                 ThrottledProgressPlotMixin, PretrainingEngine):
    """Base class of every pretraining method: the engine, with the plugin's shared behaviour composed around it
    (class-declared budgets, the CPU fast path's thread cap, bf16 and skipped-step report, the throttled progress
    plot, crash-safe checkpoint writes). Subclasses implement build_heads and compute_loss."""


class GlobalContrastTrainer(ContrastivePretrainTrainer):
    """Crop-level contrast only: bottleneck -> GlobalProjectionHead -> unit embedding, InfoNCE over the masks of
    ``pair_selection``. A method on it declares its selection rule (and may rescale the loss)."""

    temperature: float = 0.1
    global_hidden_dim: int = 512
    global_out_dim: int = 128

    head_inputs = {"global": "bottleneck"}
    logged_terms = ("mean_pos_global", "mean_neg_global")

    def build_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"global": GlobalProjectionHead(self.feature_channels("bottleneck"),
                                                             self.global_hidden_dim, self.global_out_dim)})

    def compute_loss(self, outputs, batch):
        pos, neg = self.pair_selection(batch)
        loss, stats = info_nce(outputs["global"], None, pos, neg, self.temperature)
        return loss, {"mean_pos_global": stats["mean_pos"], "mean_neg_global": stats["mean_neg"]}
