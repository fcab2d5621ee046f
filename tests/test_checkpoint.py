"""Checkpoints are written atomically and bad ones are refused with a clear message."""
import os
from pathlib import Path

import pytest
import torch

from conftest import atomic_torch_save

from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file


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


def test_atomic_write_path_renames_only_a_finished_file(tmp_path):
    from nnunet_ssl.nnunet.checkpoint import atomic_write_path
    target = tmp_path / "checkpoint_best.pth"
    with atomic_write_path(str(target)) as tmp:
        assert not target.exists()
        torch.save({"network_weights": {"w": torch.ones(1)}}, tmp)
    assert load_checkpoint_file(str(target))["network_weights"]["w"] == 1
    with pytest.raises(OSError, match="disk full"), atomic_write_path(str(target)) as tmp:
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError("disk full")
    assert load_checkpoint_file(str(target))["network_weights"]["w"] == 1  # the previous file is untouched
    with atomic_write_path(str(tmp_path / "never.pth")):
        pass  # nothing written (e.g. checkpointing disabled): nothing appears
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pth"]


def test_prepare_output_folder_sets_aside_a_stale_final_and_removes_dead_writes(tmp_path):
    from nnunet_ssl.nnunet.checkpoint import prepare_output_folder, temporary_name
    final = tmp_path / "checkpoint_final.pth"
    final.write_bytes(b"previous run")
    dead_write = tmp_path / "checkpoint_latest.pth.tmp-999999999"
    dead_write.write_bytes(b"killed mid-write")
    own_write = tmp_path / os.path.basename(temporary_name(str(tmp_path / "checkpoint_best.pth")))
    own_write.write_bytes(b"this process is writing it")

    assert prepare_output_folder(str(tmp_path), fresh_run=False)[0].startswith("removed checkpoint_latest.pth.tmp-")
    assert final.exists() and not dead_write.exists() and own_write.exists()  # a resumed run keeps its final

    done = prepare_output_folder(str(tmp_path), fresh_run=True)
    assert len(done) == 1 and "moved the previous run's checkpoint_final.pth" in done[0]
    stale = [f for f in os.listdir(tmp_path) if f.startswith("checkpoint_final.pth.stale-")]
    assert not final.exists() and len(stale) == 1 and (tmp_path / stale[0]).read_bytes() == b"previous run"


def test_crash_safe_mixin_on_a_trainer_using_nnunets_save(tmp_path):
    """The mixin's behaviour on a stand-in for nnUNetTrainer (whose save_checkpoint calls torch.save itself)."""
    from nnunet_ssl.nnunet.checkpoint import CrashSafeCheckpointsMixin

    class StandInTrainer:
        local_rank = 0

        def __init__(self):
            self.output_folder, self.current_epoch, self.log, self.fail_while_saving = str(tmp_path), 0, [], False

        def print_to_log_file(self, *args):
            self.log.append(" ".join(map(str, args)))

        def on_train_start(self):
            self.log.append("started")

        def save_checkpoint(self, filename):
            with open(filename, "wb") as f:
                f.write(b"PK partial")
                if self.fail_while_saving:
                    raise KeyboardInterrupt  # killed mid-write
            torch.save({"network_weights": {}, "current_epoch": self.current_epoch}, filename)

    class Trainer(CrashSafeCheckpointsMixin, StandInTrainer):
        pass

    (tmp_path / "checkpoint_final.pth").write_bytes(b"previous run")
    trainer = Trainer()
    trainer.on_train_start()
    assert "moved the previous run's checkpoint_final.pth" in trainer.log[0] and trainer.log[-1] == "started"
    trainer.fail_while_saving = True
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    assert not (tmp_path / "checkpoint_final.pth").exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    trainer.fail_while_saving, trainer.current_epoch = False, 3
    trainer.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    assert load_checkpoint_file(str(tmp_path / "checkpoint_final.pth"))["current_epoch"] == 3


def test_plugin_trainers_are_crash_safe():
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS

    from nnunet_ssl.nnunet.checkpoint import CrashSafeCheckpointsMixin
    unsafe = [n for n, c in {**PRETRAINING_TRAINERS, **SEGMENTATION_TRAINERS}.items()
              if not issubclass(c, CrashSafeCheckpointsMixin)]
    assert not unsafe


def test_heads_of_another_design_fail_in_one_line():
    from nnunet_ssl.core.heads import GlobalProjectionHead
    from nnunet_ssl.nnunet.engine import load_head_state
    heads = torch.nn.ModuleDict({"global": GlobalProjectionHead(8, hidden_dim=16, out_dim=4)})
    old = torch.nn.ModuleDict({"global": GlobalProjectionHead(8, hidden_dim=16, out_dim=4, batch_norm=False)})
    with pytest.raises(ValueError, match=r"missing \['global.norm.bias'.*start the pretraining afresh") as e:
        load_head_state(heads, old.state_dict())
    assert "\n" not in str(e.value)
    load_head_state(heads, {k: v + 1 if v.is_floating_point() else v for k, v in heads.state_dict().items()})
