"""Checkpoint I/O: atomic writes and loads that fail with a clear message."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch


def atomic_torch_save(obj, filename: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash mid-write leaves the previous
    file intact and never a truncated checkpoint under the final name."""
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
