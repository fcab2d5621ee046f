"""Checkpoints are written atomically and bad ones are refused with a clear message."""
import os

import pytest
import torch

from nnunet_ssl.nnunet.checkpoint import atomic_torch_save, load_checkpoint_file


def test_atomic_save_roundtrip_and_no_leftovers(tmp_path):
    f = tmp_path / "checkpoint_latest.pth"
    atomic_torch_save({"network_weights": {"w": torch.ones(2)}}, str(f))
    assert torch.equal(load_checkpoint_file(str(f))["network_weights"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    f = tmp_path / "checkpoint_latest.pth"
    atomic_torch_save({"network_weights": {"w": torch.zeros(1)}}, str(f))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"network_weights": {}, "x": Unpicklable()}, str(f))
    assert torch.equal(load_checkpoint_file(str(f))["network_weights"]["w"], torch.zeros(1))
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


def test_truncated_checkpoint_is_refused(tmp_path):
    f = tmp_path / "checkpoint_final.pth"
    atomic_torch_save({"network_weights": {"w": torch.randn(1000)}}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint_file(str(f))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an nnU-Net checkpoint"):
        load_checkpoint_file(str(tmp_path / "other.pth"))
