"""Crash safety of pretraining through the real nnUNetv2_train: SIGKILL at seeded random moments and in the middle of
checkpoint writes, resume with --c; a failed run never leaves a checkpoint_final.pth, and a fresh run sets aside
the final checkpoint of an earlier run in the same folder."""
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, TINY_DATASET, TINY_DATASET_ID, atomic_torch_save, clean_env

from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file

pytestmark = pytest.mark.slow
EXT_TRAINERS = Path(__file__).parent / "ext_trainers"
PLANS = "nnUNetPlansTiny"
KILL_TRAINER = "SpadePretrainTrainer_killtest"
NUM_EPOCHS = 6  # SpadePretrainTrainer_killtest.num_epochs
LOG_LISTS = ("train_losses", "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps", "train_global",
             "val_global", "train_local", "val_local")


def _output_folder(root: Path, trainer: str) -> Path:
    return root / "results" / TINY_DATASET / f"{trainer}__{PLANS}__3d_fullres" / "fold_all"


def _start(root: Path, trainer: str, stdout: Path, resume: bool, **env) -> subprocess.Popen:
    cmd = [str(c) for c in (BIN / "nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", trainer, "-p",
                            PLANS, "-device", "cpu")] + (["--c"] if resume else [])
    # unbuffered, so that the test sees "Epoch N" the moment the trainer prints it
    env = clean_env(root, nnUNet_extTrainer=EXT_TRAINERS, PYTHONUNBUFFERED=1, **env)
    with open(stdout, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_until(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True as soon as ``condition()`` holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the training process")


def _epochs_started(stdout: Path) -> list:
    return [int(n) for n in re.findall(r": Epoch (\d+)$", stdout.read_text(), re.MULTILINE)]


def _checkpoints_are_sound(out: Path) -> dict:
    """Every checkpoint in the folder loads and is self-consistent; a final one is a complete run."""
    epochs = {}
    for f in sorted(out.glob("checkpoint_*.pth")):
        ckpt = load_checkpoint_file(str(f))  # raises on a truncated / corrupt file
        assert all(len(ckpt["logging"][k]) == ckpt["current_epoch"] for k in LOG_LISTS), f.name
        epochs[f.name] = ckpt["current_epoch"]
    if "checkpoint_final.pth" in epochs:
        assert epochs["checkpoint_final.pth"] == NUM_EPOCHS, "a final checkpoint must only exist for a finished run"
    return epochs


def test_sigkill_at_random_moments_and_mid_write_then_resume(tiny_dataset, tmp_path):
    root = tiny_dataset
    out = _output_folder(root, KILL_TRAINER)
    rng = random.Random(20261126)
    # first run fresh, then --c; kill at the first checkpoint write, twice at a random moment of a random epoch
    # (the 2nd or 3rd this process trains, so that resumes continue from mid-run checkpoints), and in the middle of
    # writing checkpoint_final.pth; the last --c runs to the end
    plan = [("write", "checkpoint_"), ("random", (rng.randint(2, 3), rng.uniform(0.0, 1.5))),
            ("random", (rng.randint(2, 3), rng.uniform(0.0, 1.5))), ("write", "checkpoint_final.pth"),
            ("finish", None)]
    kills, first_epochs = [], []
    for launch, (mode, arg) in enumerate(plan):
        stdout = tmp_path / f"launch{launch}.txt"
        final_before = (out / "checkpoint_final.pth").exists()
        process = _start(root, KILL_TRAINER, stdout, resume=launch > 0)
        if mode == "finish":
            assert process.wait(timeout=300) == 0, stdout.read_text()[-3000:]
            first_epochs.append(_epochs_started(stdout)[:1])
            break
        if mode == "write":  # the temporary file of atomic_write_path exists only while a write is under way
            reached = _wait_until(lambda prefix=arg: any(out.glob(f"{prefix}*.tmp-*")), process)
        else:
            epoch_in_launch, delay = arg
            reached = _wait_until(lambda log=stdout, k=epoch_in_launch: len(_epochs_started(log)) >= k, process)
            time.sleep(delay)
        alive = process.poll() is None
        if alive:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            kills.append(f"launch {launch}: {mode} {arg}")
        first_epochs.append(_epochs_started(stdout)[:1])
        if mode == "write":
            assert reached and alive, f"launch {launch} never wrote {arg}: " + stdout.read_text()[-3000:]
            assert any(out.glob(f"{arg}*.tmp-*")), "the kill must land during the write"
        epochs = _checkpoints_are_sound(out)
        if arg == "checkpoint_final.pth" and not final_before:
            assert "checkpoint_final.pth" not in epochs, "killed while writing it: no final checkpoint"
    assert len(kills) >= 3, kills
    assert any(e and e[0] > 0 for e in first_epochs[1:]), f"no run resumed mid-way: {first_epochs} {kills}"

    final = load_checkpoint_file(str(out / "checkpoint_final.pth"))
    assert final["current_epoch"] == NUM_EPOCHS, kills
    for k in LOG_LISTS:
        assert len(final["logging"][k]) == NUM_EPOCHS, (k, kills)
    stamps = final["logging"]["epoch_end_timestamps"]
    assert stamps == sorted(stamps), "each epoch is logged once, in order"
    assert not list(out.glob("*.tmp-*")), "writes of killed runs are cleaned up"
    assert not (out / "checkpoint_latest.pth").exists()  # nnU-Net removes it once the final one is written

    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(root / "preprocessed" / TINY_DATASET / f"{PLANS}.json"))
    network = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    load_pretrained_weights(network, str(out / "checkpoint_final.pth"))
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(network.state_dict()[key], final["network_weights"][key])


def test_fresh_run_sets_aside_an_old_final_and_a_crash_leaves_none(tiny_dataset, tmp_path):
    root = tiny_dataset
    trainer = "SpadePretrainTrainer_crashtest"  # os._exit(17) after the epoch NNUNET_SSL_TEST_CRASH_AFTER_EPOCH
    out = _output_folder(root, trainer)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"network_weights": {}, "previous_run": True}, str(out / "checkpoint_final.pth"))
    stdout = tmp_path / "crash.txt"
    process = _start(root, trainer, stdout, resume=False, NNUNET_SSL_TEST_CRASH_AFTER_EPOCH=0)
    assert process.wait(timeout=300) == 17, stdout.read_text()[-3000:]
    assert not (out / "checkpoint_final.pth").exists(), "a failed run must not leave a checkpoint_final.pth"
    stale = list(out.glob("checkpoint_final.pth.stale-*"))
    assert len(stale) == 1 and torch.load(stale[0], weights_only=False)["previous_run"]
    assert "moved the previous run's checkpoint_final.pth" in stdout.read_text()
    assert load_checkpoint_file(str(out / "checkpoint_latest.pth"))["current_epoch"] == 1
    assert os.path.isfile(out / "checkpoint_best.pth")


def test_finetuning_resumes_with_c_in_and_after_warm_up(tiny_dataset, tmp_path):
    """nnU-Net's own nnUNetTrainer_warmup cannot load its checkpoints under torch >= 2.6; ours resume in the right
    stage: the learning rates of a run that died in warm-up and again after it are those of an uninterrupted run."""
    root = tiny_dataset
    trainer = "nnUNetTrainerFinetune_crashtest"  # 5 epochs, 2 warm-up, checkpoint_latest.pth after every epoch
    out = _output_folder(root, trainer)

    def run(resume: bool, crash_after=None, name="run"):
        env = {} if crash_after is None else {"NNUNET_SSL_TEST_CRASH_AFTER_EPOCH": crash_after}
        stdout = tmp_path / f"{name}.txt"
        code = _start(root, trainer, stdout, resume=resume, **env).wait(timeout=300)
        assert code == (0 if crash_after is None else 17), stdout.read_text()[-3000:]
        return stdout.read_text()

    # the learning rates of an uninterrupted run, from nnU-Net's own schedulers
    from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    warmup, train = Lin_incr_LRScheduler(optimizer, 1e-2, 2), PolyLRScheduler_offset(optimizer, 1e-2, 5, 2)
    reference = []
    for epoch in range(5):
        (warmup if epoch < 2 else train).step(epoch)
        reference.append(optimizer.param_groups[0]["lr"])

    run(resume=False, crash_after=0, name="first")
    assert load_checkpoint_file(str(out / "checkpoint_latest.pth"))["current_epoch"] == 1
    resumed = run(resume=True, crash_after=2, name="resumed_in_warmup")
    assert "Initialized warmup_all optimizer" in resumed
    assert load_checkpoint_file(str(out / "checkpoint_latest.pth"))["current_epoch"] == 3
    resumed = run(resume=True, name="resumed_after_warmup")
    assert "Initialized train optimizer" in resumed and "warmup_all optimizer" not in resumed.split("Epoch 3")[0][-200:]
    final = load_checkpoint_file(str(out / "checkpoint_final.pth"))
    assert final["current_epoch"] == 5 and len(final["logging"]["train_losses"]) == 5
    assert final["logging"]["lrs"] == pytest.approx(reference, rel=1e-12)
    assert final["optimizer_state"]["state"], "the optimizer's momentum must survive the resumes"
