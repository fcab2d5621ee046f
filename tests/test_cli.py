"""The nnunet-ssl command line: clear errors, and the demo pipeline end to end at smoke scale."""
import json
import subprocess

import pytest

from conftest import BIN, clean_env, run


def test_plan_rejects_unknown_planner(tmp_path):
    env = clean_env(tmp_path)
    res = subprocess.run([str(BIN / "nnunet-ssl"), "plan", "-d", "1", "-pl", "NoSuchPlanner"], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "unknown planner 'NoSuchPlanner'" in res.stderr
    assert "nnUNetPlannerSmall" in res.stderr


def test_plan_requires_nnunet_paths(tmp_path):
    env = {k: v for k, v in clean_env(tmp_path).items() if k != "nnUNet_raw"}
    res = subprocess.run([str(BIN / "nnunet-ssl"), "plan", "-d", "1"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "nnUNet_raw not set" in res.stderr


def test_demo_on_unknown_dataset_fails_clearly(tmp_path):
    (tmp_path / "raw").mkdir()
    res = subprocess.run([str(BIN / "nnunet-ssl"), "demo", "--dataset", "123", "--work-dir", str(tmp_path / "w")],
                         env=clean_env(tmp_path), capture_output=True, text=True)
    assert res.returncode != 0 and "dataset 123 not found" in res.stderr


@pytest.mark.slow
def test_demo_quick_runs_whole_pipeline(tmp_path):
    env = {k: v for k, v in clean_env(tmp_path).items() if not k.startswith("nnUNet_")}
    work = tmp_path / "demo"
    res = run([BIN / "nnunet-ssl", "demo", "--quick", "--work-dir", work], env, timeout=1200)
    assert "Test-set Dice" in res.stdout and "| scratch |" in res.stdout and "| spade |" in res.stdout
    report = json.loads((work / "demo_results.json").read_text())
    assert set(report["results"]) == {"scratch", "spade"}
    for r in report["results"].values():
        assert r["num_cases"] == 3 and 0 <= r["mean"] <= 1 and set(r["per_class"]) == {"1", "2", "3", "4"}
    assert not set(report["test_cases"]) & set(report["labeled_cases"])
    assert (work / "demo_results.png").stat().st_size > 1000
    # pretraining never saw the test cases: its split is the pool only
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset990_SSLPhantom" / "splits_final.json").read_text())
    assert not set(splits[1]["train"]) & set(report["test_cases"])
    # a second run reuses every finished step
    again = run([BIN / "nnunet-ssl", "demo", "--quick", "--work-dir", work], env, timeout=600)
    assert "pretraining already done" in again.stdout


@pytest.mark.slow
@pytest.mark.realdata
def test_demo_on_existing_dataset_holds_out_test_cases(tmp_path):
    """`demo --dataset 4` on real MSD Hippocampus (no labelled imagesTs): a seeded 25 % hold-out is the test set
    and never enters pretraining or fine-tuning."""
    from conftest import HIPPOCAMPUS
    if not (HIPPOCAMPUS / "dataset.json").exists():
        pytest.skip("../shared/data/Dataset004_Hippocampus is not available")
    env = {k: v for k, v in clean_env(tmp_path).items() if not k.startswith("nnUNet_")}
    env["nnUNet_raw"] = str(HIPPOCAMPUS.parent)
    work = tmp_path / "demo"
    res = run([BIN / "nnunet-ssl", "demo", "--quick", "--dataset", "4", "--work-dir", work], env, timeout=1500)
    report = json.loads((work / "demo_results.json").read_text())
    assert report["dataset"] == "Dataset004_Hippocampus" and len(report["test_cases"]) == 50
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset004_Hippocampus" / "splits_final.json").read_text())
    test = set(report["test_cases"])
    assert not test & set(splits[0]["train"]) and not test & set(splits[1]["train"]) and not test & set(
        splits[1]["val"])
    assert len(splits[1]["train"]) == 150
    for r in report["results"].values():
        assert r["num_cases"] == 50 and set(r["per_class"]) == {"1", "2"}
    assert "| spade |" in res.stdout
    # the user's nnU-Net folders were only read: nothing was written next to the raw data
    assert not (HIPPOCAMPUS / "splits_final.json").exists()
