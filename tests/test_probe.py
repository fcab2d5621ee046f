"""nnunet-ssl probe: hypercolumn alignment, and the command on a phantom dataset."""
import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from conftest import BIN, clean_env, phantom_workspace, run
from nnunet_ssl.probe import hypercolumns


def test_hypercolumns_take_the_feature_centred_nearest_each_voxel():
    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, [2, 3, 4], torch.nn.Conv3d, 3, [1, (1, 2, 2), 2], 1, 3, [1, 1],
                        norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU).eval()
    vol = torch.randn(1, 9, 13, 11)  # not divisible by the strides: padded, then cropped back
    cols = hypercolumns(net, vol)
    assert cols.shape == (2 + 3 + 4, 9, 13, 11)
    padded = torch.nn.functional.pad(vol[None], (0, 1, 0, 3, 0, 1))  # to multiples of the total stride (2, 4, 4)
    with torch.no_grad():
        skips = net.encoder(padded[:, :, :, :, :])
    # stage 2 has stride (2, 4, 4): voxel (5, 6, 9) reads feature (round(5/2), round(6/4), round(9/4)) = (2, 2, 2)
    # (ties round to even, as torch.round does)
    assert torch.allclose(cols[5:, 5, 6, 9], skips[2][0, :, 2, 2, 2], atol=1e-6)
    assert torch.allclose(cols[2:5, 3, 7, 1], skips[1][0, :, 3, 4, 0], atol=1e-6)  # stride (1, 2, 2)
    assert torch.allclose(cols[:2, 8, 12, 10], skips[0][0, :, 8, 12, 10], atol=1e-6)


def test_probe_scores_unlabelled_training_cases_never_the_labelled_ones():
    from nnunet_ssl.probe import select_cases
    train = [f"case_{i:02d}" for i in range(12)][::-1]  # order in the file must not matter
    labelled, val = select_cases(train, ["v1", "v0"], labeled=4, seed=3)
    assert len(labelled) == 4 and set(labelled) <= set(train) and val == ["v0", "v1"]
    same, scored = select_cases(train, ["v1", "v0"], labeled=4, seed=3, score_unlabeled=5)
    assert same == labelled  # the labelled cases do not depend on what is scored
    assert scored == sorted(set(train) - set(labelled))[:5]
    assert select_cases(train, [], 4, 3, val_cases=2, score_unlabeled=8)[1] == scored[:2]
    with pytest.raises(SystemExit, match="--score-unlabeled 9: fold 0 has only 8 training cases besides the 4"):
        select_cases(train, [], 4, 3, score_unlabeled=9)
    with pytest.raises(SystemExit, match="--labeled 13: fold 0 has only 12"):
        select_cases(train, [], 13, 3)


@pytest.mark.slow
def test_probe_command_same_weights_as_reference_score_the_same(tmp_path):
    phantom_workspace(tmp_path, 994, "Probe", num_train=6, num_test=1, shape=(32, 32, 32), seed=2)
    env = clean_env(tmp_path)
    run([BIN / "nnunet-ssl", "plan", "-d", 994, "-pl", "nnUNetPlannerTiny", "-c", "3d_fullres"], env)
    pre = tmp_path / "preprocessed" / "Dataset994_Probe"
    cases = sorted(p.stem for p in (pre / "nnUNetPlansTiny_3d_fullres").glob("*.pkl"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:4], "val": cases[4:]}]))
    plans = json.loads((pre / "nnUNetPlansTiny.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    # a checkpoint holding exactly the probe's random reference network (seed 0): both must score the same
    from nnunet_ssl.probe import _network
    ckpt = {"init_args": {"plans": plans, "configuration": "3d_fullres", "dataset_json": dataset_json}}
    net = _network(ckpt, True, 0)[0]
    torch.save({**ckpt, "network_weights": net.state_dict()}, tmp_path / "ckpt.pth")
    res = run([BIN / "nnunet-ssl", "probe", tmp_path / "ckpt.pth", "-d", 994, "--labeled", 3, "--steps", 50,
               "--json", tmp_path / "probe.json"], env)
    r = json.loads((tmp_path / "probe.json").read_text())
    assert len(r["train_cases"]) == 3 and set(r["train_cases"]) <= set(cases[:4]) and r["val_cases"] == cases[4:]
    assert r["pretrained"]["mean_dice"] == pytest.approx(r["random"]["mean_dice"])
    assert 0 < r["pretrained"]["mean_dice"] <= 1 and r["pretrained"]["features"] == sum(
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"])
    assert "linear-probe Dice" in res.stdout
    # scoring on the fold's unlabelled training case instead of its validation cases
    res = run([BIN / "nnunet-ssl", "probe", tmp_path / "ckpt.pth", "-d", 994, "--labeled", 3, "--steps", 50,
               "--score-unlabeled", 1, "--no-random", "--json", tmp_path / "probe1.json"], env)
    r1 = json.loads((tmp_path / "probe1.json").read_text())
    assert r1["train_cases"] == r["train_cases"] and r1["val_cases"] == sorted(set(cases[:4]) - set(r["train_cases"]))
    assert "random" not in r1 and "on 1 unlabelled training cases" in res.stdout
    # bad input: one line, non-zero exit
    import subprocess
    bad = subprocess.run([str(BIN / "nnunet-ssl"), "probe", str(tmp_path / "ckpt.pth"), "-d", "994", "-f", "3"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "fold 3 is not in" in bad.stderr and "Traceback" not in bad.stderr
