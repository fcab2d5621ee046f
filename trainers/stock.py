"""Stock nnU-Net given a wall-clock budget: the anchor row of the benchmark (``stock``).

Everything is nnU-Net's own ``nnUNetTrainer`` — Dice + CE loss with deep supervision, its augmentation, SGD
(lr 1e-2, Nesterov momentum 0.99) with the poly schedule, float32 on CPU — except the length of training: instead
of a number of epochs the run gets ``NNUNET_SSL_WALL_SECONDS`` seconds of training time, and the poly schedule
runs over that time (lr = 1e-2 · (1 − t/T)^0.9, set at each epoch start). ``nnunet-ssl benchmark`` gives it the
training time of the budget's ``scratch`` run with the same labelled cases on the same machine, so the row answers
"what would stock nnU-Net reach in the same minutes". Epochs are 25 iterations (nnU-Net's 250 would leave the
schedule only a few steps in a CPU budget), with one validation batch each (monitoring only)."""
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.nnunet.budget import DeclaredBudgetMixin
from nnunet_ssl.nnunet.checkpoint import CheckpointFormatMixin, CrashSafeCheckpointsMixin
from nnunet_ssl.nnunet.cpu_fast import apply_thread_limit, keep_freed_memory
from nnunet_ssl.nnunet.segmentation import SkipFinalValidationMixin

WALL_SECONDS = "NNUNET_SSL_WALL_SECONDS"


def training_seconds(logging: dict) -> float:
    """Training time recorded in nnU-Net's log: the sum of the finished epochs' durations (start-up, the final
    validation and any time between a crash and ``--c`` do not count)."""
    starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    return float(sum(e - s for s, e in zip(starts, ends)))


class nnUNetTrainerWallClock(DeclaredBudgetMixin, SkipFinalValidationMixin, CrashSafeCheckpointsMixin,
                             CheckpointFormatMixin, nnUNetTrainer):
    """nnUNetTrainer for ``NNUNET_SSL_WALL_SECONDS`` of training (the mixins give a working ``--c``, atomic
    checkpoint writes and the benchmark's skipped final validation; no CPU fast path: stock trains in float32;
    nothing of the training itself changes; on CPU its process keeps freed memory for reuse, as the budget's runs
    do)."""
    num_iterations_per_epoch = 25
    num_val_iterations_per_epoch = 1
    num_epochs = 100_000  # an upper bound only; the wall clock ends the run

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        value = os.environ.get(WALL_SECONDS, "")
        try:
            self.wall_seconds = float(value)
            assert self.wall_seconds > 0
        except (ValueError, AssertionError):
            raise RuntimeError(f"{type(self).__name__} trains for a wall-clock budget: set {WALL_SECONDS} to a "
                               f"positive number of seconds (got {value!r})") from None

    def initialize(self):
        apply_thread_limit(self.print_to_log_file)  # the benchmark's --jobs: a share of the cores
        if self.device.type == "cpu":
            # the same process setting as the budget's own runs get (no change to the training, only page faults)
            keep_freed_memory(self.print_to_log_file)
        super().initialize()

    def elapsed(self) -> float:
        return training_seconds(self.logger.get_checkpoint())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        lr = self.initial_lr * (1.0 - min(self.elapsed() / self.wall_seconds, 1.0)) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.logger.log("lrs", lr, self.current_epoch)

    def run_training(self):
        # nnUNetTrainer.run_training with one change: the loop ends when the training time is used up
        self.on_train_start()
        start = time.time()
        for _ in range(self.current_epoch, self.num_epochs):
            if self.elapsed() >= self.wall_seconds:
                break
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                outputs = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(outputs)
            self.on_epoch_end()
        self.print_to_log_file(f"wall-clock budget {self.wall_seconds:.0f} s used: {self.current_epoch} epochs x "
                               f"{self.num_iterations_per_epoch} iterations ({time.time() - start:.0f} s this call)")
        self.on_train_end()
