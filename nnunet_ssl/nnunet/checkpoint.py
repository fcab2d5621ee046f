"""Checkpoints of every plugin trainer: one format, one writer, one loader; atomic writes; loads that fail with a
clear message.

The format is nnU-Net's own (what nnUNetv2_predict, ``--c`` and ``-pretrained_weights`` read) plus the entries a
trainer adds in :meth:`CheckpointFormatMixin.checkpoint_state` (pretraining heads, PDCR projections, ...)."""
from __future__ import annotations

import glob
import os
import pickle
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FINAL_CHECKPOINT = "checkpoint_final.pth"
TEMPORARY_MARKER = ".tmp-"  # atomic writes go to '<name>.tmp-<pid>' first


def temporary_name(filename: str) -> str:
    return f"{filename}{TEMPORARY_MARKER}{os.getpid()}"


def destination_name(filename: str) -> str:
    """The name a (possibly temporary) checkpoint file will have once its atomic write is done."""
    return filename.split(TEMPORARY_MARKER)[0]


@contextmanager
def atomic_write_path(filename: str) -> Iterator[str]:
    """Yields a temporary path for code that writes a file itself (nnU-Net's save_checkpoint); on success the file
    written there is fsynced and renamed to ``filename``, on failure it is removed. Nothing written: nothing done."""
    tmp = temporary_name(filename)
    try:
        yield tmp
        if os.path.exists(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare_output_folder(output_folder: str, fresh_run: bool) -> list[str]:
    """Make a training run's output folder safe to write into; returns what was done (for the log).

    * A fresh run (not a --c resume) renames a previous run's ``checkpoint_final.pth`` to
      ``checkpoint_final.pth.stale-<time>``: if the new run fails, no final checkpoint may sit next to its logs and
      look like its result.
    * Temporary files of atomic writes left by a killed process (``*.pth.tmp-<pid>``) are removed."""
    done = []
    final = os.path.join(output_folder, FINAL_CHECKPOINT)
    if fresh_run and os.path.isfile(final):
        stale = f"{final}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(final, stale)
        done.append(f"fresh run: moved the previous run's {FINAL_CHECKPOINT} to {os.path.basename(stale)} (use --c "
                    f"to continue a run instead)")
    for leftover in glob.glob(os.path.join(glob.escape(output_folder), f"*.pth{TEMPORARY_MARKER}*")):
        if not leftover.endswith(f"{TEMPORARY_MARKER}{os.getpid()}"):
            os.remove(leftover)
            done.append(f"removed {os.path.basename(leftover)}, an unfinished checkpoint write of a killed run")
    return done


class CrashSafeCheckpointsMixin:
    """For nnUNetTrainer subclasses (before the class that writes checkpoints): a failed run never leaves a
    checkpoint_final.pth. At the start of training the output folder is prepared (:func:`prepare_output_folder`; a
    run is fresh unless a checkpoint was loaded, i.e. ``current_epoch`` is still 0), and every checkpoint is written
    to a temporary file first (:func:`atomic_write_path`) and renamed once complete."""

    def on_train_start(self):
        if self.local_rank == 0:
            for line in prepare_output_folder(self.output_folder, fresh_run=self.current_epoch == 0):
                self.print_to_log_file(line)
        super().on_train_start()

    def save_checkpoint(self, filename: str) -> None:
        with atomic_write_path(filename) as tmp:
            super().save_checkpoint(tmp)


def load_checkpoint_file(filename: str, map_location="cpu") -> dict:
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"checkpoint {filename} does not exist: check the path (nnUNet_results, "
                                f"dataset, trainer, plans, configuration and fold)")
    try:
        ckpt = torch.load(filename, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint {filename} is truncated or corrupt ({type(e).__name__}): "
                         f"delete it and resume from checkpoint_latest.pth or retrain") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(f"{filename} is not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


def unwrapped_network(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class CheckpointFormatMixin:
    """The plugin's one checkpoint writer and loader, for nnUNetTrainer subclasses (in the bases after the mixins that
    wrap ``save_checkpoint``: CrashSafeCheckpointsMixin's atomic write, the CPU fast path's standard layout).

    A trainer adds its own entries by extending :meth:`checkpoint_state` and :meth:`load_checkpoint_state` (through
    ``super()``); :meth:`optimizer_for_epoch` gives the optimizer and scheduler a resumed run continues with. The file
    is read once (nnU-Net's own ``load_checkpoint`` fails on a dict and, in nnUNetTrainer_warmup, calls torch.load
    without weights_only=False, which torch >= 2.6 refuses for nnU-Net's log)."""

    def checkpoint_state(self, filename: str) -> dict:
        """What a checkpoint holds; ``filename`` is its final name (checkpoint_final.pth, ..._latest, ..._best)."""
        return {
            "network_weights": {k: v.detach().cpu() for k, v in unwrapped_network(self.network).state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        torch.save(self.checkpoint_state(destination_name(filename)), filename)

    def optimizer_for_epoch(self, epoch: int):
        """(optimizer, lr scheduler) a run resumed at ``epoch`` continues with (their states are loaded next)."""
        return self.optimizer, self.lr_scheduler

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        ckpt = (load_checkpoint_file(filename_or_checkpoint, self.device)
                if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint)
        self.load_checkpoint_state(ckpt)

    def load_checkpoint_state(self, ckpt: dict) -> None:
        network = unwrapped_network(self.network)
        own = network.state_dict().keys()
        network.load_state_dict({k[7:] if k not in own and k.startswith("module.") else k: v
                                 for k, v in ckpt["network_weights"].items()})
        self.my_init_kwargs = ckpt["init_args"]
        self.current_epoch = ckpt["current_epoch"]
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt.get("_best_ema")
        self.inference_allowed_mirroring_axes = ckpt.get("inference_allowed_mirroring_axes",
                                                         self.inference_allowed_mirroring_axes)
        self.optimizer, self.lr_scheduler = self.optimizer_for_epoch(self.current_epoch)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
