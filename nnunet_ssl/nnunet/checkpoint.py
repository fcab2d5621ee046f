"""Checkpoint I/O: atomic writes and loads that fail with a clear message."""
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


def atomic_torch_save(obj, filename: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash mid-write leaves the previous
    file intact and never a truncated checkpoint under the final name."""
    tmp = temporary_name(filename)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    """For nnUNetTrainer subclasses (first in the bases): a failed run never leaves a checkpoint_final.pth.

    At the start of training the output folder is prepared (:func:`prepare_output_folder`; a run is fresh unless a
    checkpoint was loaded, i.e. ``current_epoch`` is still 0). Trainers that save with nnU-Net's own
    ``save_checkpoint`` get atomic writes through :func:`atomic_write_path`; trainers that override it write with
    :func:`atomic_torch_save` themselves."""

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
