"""One mechanism each: every plugin trainer takes its class-declared budget, and the shared mixins (thread cap, CPU
fast path, skipped-step report, crash-safe writes, the one checkpoint format and loader) compose through super()
around the pretraining engine and nnU-Net's segmentation trainers. Trainers are built from the small in-memory plan
of test_cpu_fast (no planning, no data), so the file runs in seconds."""
import os

import numpy as np
import pytest
import torch
from test_cpu_fast import DATASET_JSON, _plans, _pretraining_batch, _segmentation_batch, _trainer, nnunet_dirs  # noqa

from nnunet_ssl.nnunet.budget import BUDGET_ATTRIBUTES
from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS

CPU = torch.device("cpu")


def test_every_plugin_trainer_takes_its_declared_budget(nnunet_dirs, monkeypatch):
    monkeypatch.setenv("NNUNET_SSL_WALL_SECONDS", "60")
    checked = 0
    for name, cls in {**PRETRAINING_TRAINERS, **SEGMENTATION_TRAINERS}.items():
        tr = cls(_plans(), "3d_fullres", 0, DATASET_JSON, CPU)
        for declared, attribute in BUDGET_ATTRIBUTES.items():
            if hasattr(cls, declared):
                assert getattr(tr, attribute) == getattr(cls, declared), (name, declared)
                checked += 1
    assert checked > 3 * len(PRETRAINING_TRAINERS)
    # a few values spelled out (presets, the warm-up alias, PDCR's smoke budget, the stock row's epoch bound)
    t = {n: c(_plans(), "3d_fullres", 0, DATASET_JSON, CPU) for n, c in SEGMENTATION_TRAINERS.items()
         if n in ("nnUNetTrainerFinetune_cpu", "PDCRTrainer_smoke", "nnUNetTrainerWallClock")}
    assert (t["nnUNetTrainerFinetune_cpu"].num_epochs, t["nnUNetTrainerFinetune_cpu"].warmup_duration_whole_net) == (40, 5)
    assert (t["PDCRTrainer_smoke"].num_epochs, t["PDCRTrainer_smoke"].num_iterations_per_epoch) == (2, 2)
    assert t["nnUNetTrainerWallClock"].num_epochs == 100_000
    spade = PRETRAINING_TRAINERS["SpadePretrainTrainer_cpu"](_plans(), "3d_fullres", 0, DATASET_JSON, CPU)
    assert (spade.num_epochs, spade.num_iterations_per_epoch, spade.save_every) == (40, 25, 5)
    # the benchmark's longer reconstruction start is a product trainer (found without nnUNet_extTrainer)
    long = PRETRAINING_TRAINERS["MaskedReconPretrainTrainer_cpu_640ep"](_plans(), "3d_fullres", 0, DATASET_JSON, CPU)
    assert (long.num_epochs * long.num_iterations_per_epoch, long.mask_ratio) == (16_000, 0.6)


@pytest.mark.parametrize("name,batch", [("SpadePretrainTrainer", _pretraining_batch),
                                        ("nnUNetTrainerFinetune", _segmentation_batch),
                                        ("PDCRTrainer", _segmentation_batch),
                                        ("PDCRFinetuneTrainer", _segmentation_batch),
                                        ("PDCRUAFSFinetuneTrainer", _segmentation_batch)])
def test_mixins_compose_around_every_trainer(nnunet_dirs, monkeypatch, name, batch):
    cls = {**PRETRAINING_TRAINERS, **SEGMENTATION_TRAINERS}[name]
    before = torch.get_num_threads()
    try:
        # the thread cap (CPUFastPathMixin.initialize) runs around the trainer's own set-up ...
        monkeypatch.setenv("NNUNET_SSL_NUM_THREADS", "1")
        torch.set_num_threads(2)
        tr = _trainer(cls, cpu_bf16=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # ... and so does the fast path's layout switch
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in tr.network.parameters() if p.ndim == 5)
    out = tr.train_step(batch())
    # the epoch end logs (the trainer's own) and reports skipped steps (the fast path's): 3 of 4 fail the epoch
    tr.skipped_steps_epoch = 3
    with pytest.raises(FloatingPointError, match="3 of 4 steps"):
        tr.on_train_epoch_end([out] * 4)
    assert len(tr.logger.get_checkpoint()["train_losses"]) == 1

    # a checkpoint write that fails half-way leaves nothing under the final name (CrashSafeCheckpointsMixin) ...
    final = nnunet_dirs / "checkpoint_final.pth"
    state = tr.checkpoint_state

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed while writing")

    tr.checkpoint_state = lambda filename: {**state(filename), "poison": Unpicklable()}
    with pytest.raises(RuntimeError, match="killed while writing"):
        tr.save_checkpoint(str(final))
    assert not final.exists() and not [f for f in os.listdir(nnunet_dirs) if ".tmp-" in f]
    # ... a complete one is written in the standard layout, and the one loader restores it into a fresh trainer
    tr.checkpoint_state = state
    tr.current_epoch = 6
    tr.save_checkpoint(str(final))
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 7 and ckpt["trainer_name"] == name
    assert all(v.is_contiguous() for v in ckpt["network_weights"].values())
    fresh = _trainer(cls, cpu_bf16=False)
    fresh.load_checkpoint(str(final))
    assert fresh.current_epoch == 7
    for k, v in fresh.network.state_dict().items():
        assert torch.equal(v, ckpt["network_weights"][k]), k
    assert any(".uafs." in k for k in ckpt["network_weights"]) == ("UAFS" in name)  # UAFS blocks where asked for
    if name.startswith("PDCR"):  # the projection heads travel along
        for a, b in zip(fresh.pdcr_heads.parameters(), tr.pdcr_heads.parameters()):
            assert torch.equal(a, b.contiguous())
    if name == "SpadePretrainTrainer":  # and so do the pretraining heads
        for a, b in zip(fresh.heads.state_dict().values(), tr.heads.state_dict().values()):
            assert torch.equal(a, b.contiguous())
        assert np.isfinite(ckpt["ssl_best_val_loss"] or 0.0)
