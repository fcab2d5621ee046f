"""The user's workflow through the real nnU-Net commands, in a clean environment (no nnUNet_extTrainer set):
plan -> SpadePretrainTrainer -> fine-tune with stock -pretrained_weights -> nnUNetv2_predict -> nnU-Net evaluation.
Plain U-Net plans (plugin's tiny planner) and nnU-Net's residual-encoder plans (nnUNetPlannerResEncM)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import BIN, clean_env, phantom_workspace, run

pytestmark = pytest.mark.slow
DATASET = 991


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    phantom_workspace(root, DATASET, "E2E", num_train=8, num_test=2, shape=(32, 32, 32), seed=3)
    return root


def _network_keys(root, plans_name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = root / "preprocessed" / "Dataset991_E2E"
    pm = PlansManager(str(pre / f"{plans_name}.json"))
    cm = pm.get_configuration("3d_fullres")
    lm = pm.get_label_manager(json.loads((pre / "dataset.json").read_text()))
    return nnUNetTrainer.build_network_architecture(pm, cm, 1, lm.num_segmentation_heads, True)


# plain plans: the whole workflow, fine-tuned and predicted by stock nnU-Net without the plugin; residual-encoder
# plans: pretraining and the hand-off into nnU-Net's ResEnc network (fine-tuning and prediction with a plugin
# trainer at inference are covered by the PDCR tests)
@pytest.mark.parametrize("planner,plans_name,finetune_trainer,plugin_at_inference", [
    ("nnUNetPlannerTiny", "nnUNetPlansTiny", "nnUNetTrainer_1epoch", False),
    ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", None, None),
])
def test_pretrain_finetune_predict_evaluate(workspace, planner, plans_name, finetune_trainer, plugin_at_inference):
    root = workspace
    env = clean_env(root)
    run([BIN / "nnunet-ssl", "plan", "-d", DATASET, "-pl", planner, "-c", "3d_fullres"], env)
    assert (root / "preprocessed" / "Dataset991_E2E" / f"{plans_name}.json").exists()

    # --- pretraining, found through the start-up hook
    res = run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "all", "-tr", "SpadePretrainTrainer_smoke",
               "-p", plans_name, "-device", "cpu"], env)
    assert "Using trainer 'SpadePretrainTrainer_smoke'" in res.stdout
    out = root / "results" / "Dataset991_E2E" / f"SpadePretrainTrainer_smoke__{plans_name}__3d_fullres" / "fold_all"
    ckpt_file = out / "checkpoint_final.pth"
    assert ckpt_file.exists() and (out / "progress.png").exists()
    assert not (out / "validation").exists(), "segmentation validation must be skipped for pretraining"
    assert not list(out.glob("*.tmp-*")), "no temporary checkpoint files may be left behind"
    log = next(out.glob("training_log_*.txt")).read_text()
    assert "global" in log and "local" in log and "Epoch time" in log

    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert all(v.device.type == "cpu" for v in weights.values())
    net = _network_keys(root, plans_name)
    assert set(weights) == set(net.state_dict()), "hand-off must be the full U-Net, heads excluded"
    assert ckpt["ssl_heads"] and not any(k.startswith("heads") for k in weights)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["train_global"]) == 2

    # the hand-off resets each conv block's output channels to He initialisation's scale (same function)
    from nnunet_ssl.nnunet.weight_scale import HE_CHANNEL_NORM, scale_invariant_convs
    convs = scale_invariant_convs(net)
    assert convs
    for w_keys, _ in convs:
        norms = weights[w_keys[0]].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, HE_CHANNEL_NORM))
        assert all(torch.equal(weights[k], weights[w_keys[0]]) for k in w_keys)

    # stock loader: every key but the seg layers is transferred unchanged
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    load_pretrained_weights(net, str(ckpt_file))
    sd = net.state_dict()
    for k, v in weights.items():
        if ".seg_layers." not in k:
            assert torch.equal(sd[k], v), k

    if finetune_trainer is None:
        return
    # --- fine-tuning with stock -pretrained_weights
    res = run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", finetune_trainer, "-p", plans_name,
               "-device", "cpu", "-pretrained_weights", ckpt_file], env)
    assert "Loading pretrained weights from file" in res.stdout
    ft_dir = root / "results" / "Dataset991_E2E" / f"{finetune_trainer}__{plans_name}__3d_fullres"
    assert (ft_dir / "fold_0" / "checkpoint_final.pth").exists()
    # Fine-tuning learned: its epoch's mean training loss (nnU-Net's Dice + CE over 250 iterations) ends far below
    # the hand-off's own. Measured on the 2-core development CPU (2026-12-02): 0.21-0.33 in four fine-tunings,
    # 2.25 with the learning rate held at 0 (weights stay the hand-off's). A stuck or diverging fine-tuning fails
    # here. The predicted test Dice is no such signal: after one epoch the argmax of the largest structure was
    # 0.0 in one of those four runs, and 0.19 with the learning rate held at 0.
    ft_log = torch.load(ft_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert len(ft_log["train_losses"]) == 1 and ft_log["train_losses"][0] < 1.0, \
        f"fine-tuning did not learn: mean training loss {ft_log['train_losses']}"

    # --- prediction + nnU-Net's own evaluation; with a stock trainer the plugin is not needed at inference
    pred = root / f"pred_{plans_name}"
    penv = env if plugin_at_inference else clean_env(root, NNUNET_SSL_NO_AUTOREGISTER="1")
    run([BIN / "nnUNetv2_predict", "-i", root / "raw" / "Dataset991_E2E" / "imagesTs", "-o", pred, "-d", DATASET,
         "-c", "3d_fullres", "-f", "0", "-tr", finetune_trainer, "-p", plans_name, "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"], penv)
    run([BIN / "nnUNetv2_evaluate_folder", root / "raw" / "Dataset991_E2E" / "labelsTs", pred,
         "-djfile", ft_dir / "dataset.json", "-pfile", ft_dir / "plans.json"], env)
    summary = json.loads((pred / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    dice = {label: m["Dice"] for label, m in summary["mean"].items()}
    assert set(dice) == {"1", "2", "3", "4"} and all(0.0 <= d <= 1.0 for d in dice.values()), dice


def test_pretraining_resumes_after_a_crash(workspace):
    """A run killed after epoch 0 resumes with --c: network, heads, optimizer, epoch and logs are restored and the
    remaining epochs run."""
    import subprocess
    root = workspace
    ext = Path(__file__).parent / "ext_trainers"
    env = clean_env(root, nnUNet_extTrainer=ext)
    if not (root / "preprocessed" / "Dataset991_E2E" / "nnUNetPlansTiny.json").exists():
        run([BIN / "nnunet-ssl", "plan", "-d", DATASET, "-pl", "nnUNetPlannerTiny"], env)
    cmd = [str(c) for c in [BIN / "nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", "SpadePretrainTrainer_crashtest",
                            "-p", "nnUNetPlansTiny", "-device", "cpu"]]
    crashed = subprocess.run(cmd, env={**env, "NNUNET_SSL_TEST_CRASH_AFTER_EPOCH": "0"}, capture_output=True,
                             text=True)
    assert crashed.returncode == 17, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    out = root / "results" / "Dataset991_E2E" / "SpadePretrainTrainer_crashtest__nnUNetPlansTiny__3d_fullres" / "fold_0"
    latest = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and not (out / "checkpoint_final.pth").exists()
    # checkpoints that resume training keep the trained scales (the optimizer's momentum matches them)
    w = latest["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"]
    assert not torch.allclose(w.flatten(1).norm(dim=1), torch.full((w.shape[0],), 2 ** 0.5), atol=1e-3)
    res = run(cmd + ["--c"], env)
    assert "Epoch 1" in res.stdout and "Epoch 2" in res.stdout and "Epoch 0\n" not in res.stdout
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    log = final["logging"]
    assert len(log["train_losses"]) == 3 and log["train_losses"][0] == latest["logging"]["train_losses"][0]
    assert len(log["train_global"]) == 3 and set(final["ssl_heads"]) == set(latest["ssl_heads"])


def test_2d_multichannel_pretraining_hands_off(tmp_path):
    """2d configuration, two input channels: pretraining runs and its weights load into the 2d segmentation net."""
    phantom_workspace(tmp_path, 992, "TwoChannel", num_train=4, num_test=1, shape=(16, 32, 32),
                      num_channels=2, seed=5)
    env = clean_env(tmp_path)
    run([BIN / "nnunet-ssl", "plan", "-d", 992, "-pl", "nnUNetPlannerTiny", "-c", "2d"], env)
    run([BIN / "nnUNetv2_train", 992, "2d", "all", "-tr", "SpadePretrainTrainer_smoke", "-p", "nnUNetPlansTiny",
         "-device", "cpu"], env)
    ckpt = tmp_path / "results" / "Dataset992_TwoChannel" / "SpadePretrainTrainer_smoke__nnUNetPlansTiny__2d" / \
        "fold_all" / "checkpoint_final.pth"
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(tmp_path / "preprocessed" / "Dataset992_TwoChannel" / "nnUNetPlansTiny.json"))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 2, 5, True)
    load_pretrained_weights(net, str(ckpt))
    w = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    assert w["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 2  # two input channels
    assert torch.equal(net.state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
                       w["encoder.stages.0.0.convs.0.conv.weight"])
