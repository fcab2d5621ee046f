"""Fine-tuning trainers through the real nnUNetv2_train: the pretrained-start recipe and the wall-clock stock row."""
from pathlib import Path

import pytest
import torch

from conftest import BIN, TINY_DATASET, TINY_DATASET_ID, clean_env, run

pytestmark = pytest.mark.slow


def _fresh_weights(root, path):
    """A full-network checkpoint as a pretraining run hands it over (here: a random network of the same plans)."""
    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = root / "preprocessed" / TINY_DATASET
    pm = PlansManager(str(pre / "nnUNetPlansTiny.json"))
    lm = pm.get_label_manager(json.loads((pre / "dataset.json").read_text()))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1,
                                                   lm.num_segmentation_heads, True)
    torch.save({"network_weights": net.state_dict()}, path)
    return net.state_dict()


def test_pretrained_recipe_runs_its_phases_and_freezes_the_encoder(tiny_dataset, tmp_path):
    root = tiny_dataset
    env = clean_env(root, nnUNet_results=tmp_path / "results", NNUNET_SSL_SKIP_FINAL_VALIDATION=1)
    start = _fresh_weights(root, tmp_path / "start.pth")
    res = run([BIN / "nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr",
               "nnUNetTrainerPretrainedFinetune_smoke", "-p", "nnUNetPlansTiny", "-device", "cpu",
               "-pretrained_weights", tmp_path / "start.pth"], env)
    assert "Using trainer 'nnUNetTrainerPretrainedFinetune_smoke'" in res.stdout
    out = tmp_path / "results" / TINY_DATASET / "nnUNetTrainerPretrainedFinetune_smoke__nnUNetPlansTiny__3d_fullres" \
        / "fold_all"
    log = next(out.glob("training_log_*.txt")).read_text()
    phases = [line.split("fine-tuning phase ")[1].split(",")[0] for line in log.splitlines()
              if "fine-tuning phase" in line]
    assert phases == ["probe", "decoder", "warmup", "decay"]
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    lrs = final["logging"]["lrs"]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3])  # probe at the peak, 1-epoch warm-ups reach the peak
    moved = {k for k, v in final["network_weights"].items() if not torch.equal(v, start[k])}
    assert any(".seg_layers." in k for k in moved) and any(k.startswith("encoder.") for k in moved)


def test_wall_clock_stock_trainer_stops_on_time_with_a_time_poly_schedule(tiny_dataset, tmp_path):
    root = tiny_dataset
    cmd = [BIN / "nnUNetv2_train", TINY_DATASET_ID, "3d_fullres", "all", "-tr", "nnUNetTrainerWallClock_test",
           "-p", "nnUNetPlansTiny", "-device", "cpu"]
    env = clean_env(root, nnUNet_results=tmp_path / "results", NNUNET_SSL_SKIP_FINAL_VALIDATION=1,
                    nnUNet_extTrainer=Path(__file__).parent / "ext_trainers")
    import subprocess
    bad = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "set NNUNET_SSL_WALL_SECONDS to a positive number" in bad.stdout + bad.stderr
    budget = 12  # seconds; a busy machine's first epoch can take several
    run(cmd, {**env, "NNUNET_SSL_WALL_SECONDS": str(budget)})
    out = tmp_path / "results" / TINY_DATASET / "nnUNetTrainerWallClock_test__nnUNetPlansTiny__3d_fullres" / "fold_all"
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = final["logging"]
    from nnunet_ssl.trainers.stock import training_seconds
    n = len(logging["epoch_end_timestamps"])
    assert n >= 2 and training_seconds(logging) >= budget
    from nnunet_ssl.benchmark import finished_run  # the benchmark's record of what the stock row trained
    assert final["current_epoch"] == n and finished_run(out / "checkpoint_final.pth", "nnUNetTrainerWallClock") \
        == (n * 25, training_seconds(logging))
    # the epoch before the last started inside the budget: the loop stopped at the first epoch start past it
    durations = [e - s for s, e in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]
    assert sum(durations[:-1]) < budget
    lrs = logging["lrs"]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))
    # (the refused first call left a log of its own in the same folder)
    assert any(f"wall-clock budget {budget} s used" in p.read_text() for p in out.glob("training_log_*.txt"))
