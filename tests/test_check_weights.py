"""Cross-dataset transfer: the fixed-architecture planner and `nnunet-ssl check-weights`."""
import subprocess

import pytest
import torch

from conftest import BIN, clean_env, phantom_workspace, run
from nnunet_ssl.nnunet.weights import compare_state_dicts, explain


def test_compare_and_explain_on_hand_built_networks():
    src = {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(8, 1, 3, 3, 3),
           "decoder.seg_layers.0.weight": torch.zeros(3, 8, 1, 1, 1), "extra": torch.zeros(1)}
    tgt = {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(8, 2, 3, 3, 3),
           "encoder.stages.1.0.convs.0.conv.weight": torch.zeros(16, 8, 3, 3, 3),
           "decoder.seg_layers.0.weight": torch.zeros(5, 8, 1, 1, 1)}
    r = compare_state_dicts(src, tgt)
    assert not r["ok"] and r["missing"] == ["encoder.stages.1.0.convs.0.conv.weight"]
    assert r["mismatched"] == [("encoder.stages.0.0.convs.0.conv.weight", (8, 1, 3, 3, 3), (8, 2, 3, 3, 3))]
    assert r["unused"] == ["extra"] and r["fresh"] == ["decoder.seg_layers.0.weight"]
    text = "\n".join(explain(r))
    assert "input channels differs: checkpoint 1, network 2" in text and "do not exist in the checkpoint" in text
    ok = compare_state_dicts({k: v for k, v in tgt.items()}, tgt)
    assert ok["ok"] and explain(ok)[0].startswith("OK: all 2 U-Net tensors")


@pytest.mark.slow
def test_fixed_planner_makes_datasets_exchange_weights(tmp_path):
    phantom_workspace(tmp_path, 995, "A", num_train=3, num_test=1, shape=(40, 40, 40), seed=1)
    phantom_workspace(tmp_path, 996, "B", num_train=3, num_test=1, shape=(24, 48, 32),
                      spacing=(2.0, 1.0, 1.0), seed=2)
    env = clean_env(tmp_path)
    for d in (995, 996):
        for pl in ("nnUNetPlannerFixed", "nnUNetPlannerTiny"):
            run([BIN / "nnunet-ssl", "plan", "-d", d, "-pl", pl, "-c"], env)  # plans only, no preprocessing
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(tmp_path / "preprocessed" / "Dataset995_A" / "nnUNetPlansFixed.json"))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 5, True)
    ckpt = tmp_path / "a.pth"
    torch.save({"network_weights": net.state_dict()}, ckpt)
    ok = run([BIN / "nnunet-ssl", "check-weights", ckpt, "-d", 996, "-p", "nnUNetPlansFixed"], env)
    assert ok.stdout.startswith("OK: all")
    bad = subprocess.run([str(BIN / "nnunet-ssl"), "check-weights", str(ckpt), "-d", "996", "-p",
                          "nnUNetPlansTiny"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout.startswith("INCOMPATIBLE") and "widths" in bad.stdout
    missing = subprocess.run([str(BIN / "nnunet-ssl"), "check-weights", str(ckpt), "-d", "996", "-p", "NoPlans"],
                             env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "NoPlans.json does not exist" in missing.stderr
