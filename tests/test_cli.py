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


def _one_line_error(res, command, *fragments):
    assert res.returncode != 0, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"nnunet-ssl {command}: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def test_unknown_dataset_and_corrupt_checkpoints_fail_in_one_line(tmp_path, tiny_dataset):
    env = clean_env(tmp_path)
    for sub in ("raw", "preprocessed", "results"):
        (tmp_path / sub).mkdir()
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 8)
    nnunet_ssl = str(BIN / "nnunet-ssl")
    res = subprocess.run([nnunet_ssl, "check-weights", str(tmp_path / "x.pth"), "-d", "4"], env=env,
                         capture_output=True, text=True)
    _one_line_error(res, "check-weights", "dataset 4 is not known to nnU-Net", str(tmp_path / "raw"))
    res = subprocess.run([nnunet_ssl, "plan", "-d", "999"], env=env, capture_output=True, text=True)
    _one_line_error(res, "plan", "dataset 999 is not known to nnU-Net")
    # the same line from bench-speed's isolated processes (the message of the one that failed)
    res = subprocess.run([nnunet_ssl, "bench-speed", "-d", "999", "--cpu-fast", "fp32", "--isolate", "--rounds", "1"],
                         env=env, capture_output=True, text=True)
    _one_line_error(res, "bench-speed", "unknown dataset id 999")
    planned = clean_env(tiny_dataset)  # a planned and preprocessed dataset
    for cmd in (["check-weights", str(tmp_path / "junk.pth"), "-d", "993", "-p", "nnUNetPlansTiny"],
                ["inspect-embeddings", str(tmp_path / "junk.pth"), "-d", "993"],
                ["probe", str(tmp_path / "junk.pth"), "-d", "993"]):
        res = subprocess.run([nnunet_ssl, *cmd], env=planned, capture_output=True, text=True)
        _one_line_error(res, cmd[0], "truncated or corrupt")


@pytest.mark.slow
def test_demo_quick_runs_whole_pipeline(tmp_path):
    """The demo is one benchmark run (scratch and spade, one k, one seed) on the phantom it generates."""
    env = {k: v for k, v in clean_env(tmp_path).items() if not k.startswith("nnUNet_")}
    work = tmp_path / "demo"
    res = run([BIN / "nnunet-ssl", "demo", "--quick", "--work-dir", work], env, timeout=1200)
    assert "Test-set Dice" in res.stdout and "| scratch |" in res.stdout and "| spade |" in res.stdout
    report = json.loads((work / "demo_results.json").read_text())
    assert set(report["results"]) == {"scratch", "spade"}
    for r in report["results"].values():
        assert r["num_cases"] == 3 and 0 <= r["mean"] <= 1 and set(r["per_class"]) == {"1", "2", "3", "4"}
    assert not set(report["test_cases"]) & set(report["pool"])
    assert set(report["labeled_cases"]) <= set(report["pool"]) and len(report["labeled_cases"]) == 3
    assert (work / "demo_results.png").stat().st_size > 1000
    # the benchmark's layout: fold 0 pretrains on the pool only, fold 1 fine-tunes on the labelled cases
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset990_SSLPhantom" / "splits_final.json").read_text())
    assert sorted(splits[0]["train"]) == sorted(report["pool"]) and splits[1]["train"] == report["labeled_cases"]
    assert len(list((work / "cells").glob("*.json"))) == 2 and (work / "results.md").exists()


def test_bench_speed_goals_are_judged_against_the_issue_thresholds():
    from nnunet_ssl.step_cost import _goals, format_report
    report = {
        "device": "cpu", "dataset": "1", "configuration": "3d_fullres", "plans": "p", "iterations": 3,
        "date": "2026-11-26", "reference": "nnUNetTrainer", "loader_workers": 2,
        "trainer": {"nnUNetTrainer": "nnUNetTrainer", "Spade [fp32]": "Spade", "Spade [bf16]": "Spade"},
        "precision": {"nnUNetTrainer": "fp32", "Spade [fp32]": "fp32", "Spade [bf16]": "bf16"},
        "batch_size": {"nnUNetTrainer": 2, "Spade [fp32]": 2, "Spade [bf16]": 2},
        "step_s_median": {"nnUNetTrainer": 1.0, "Spade [fp32]": 2.3, "Spade [bf16]": 1.1},
        "step_ratio_vs_reference": {"nnUNetTrainer": 1.0, "Spade [fp32]": 2.3, "Spade [bf16]": 1.1},
        "loss_s_median": {"Spade [fp32]": 0.1, "Spade [bf16]": 0.1},
        "loss_share_of_step": {"Spade [fp32]": 0.04, "Spade [bf16]": 0.09},
        "loader_batches_per_s": {"nnUNetTrainer": 10.0, "Spade": 5.0},
        "loader_batches_per_s_workers": {"nnUNetTrainer": 20.0, "Spade": 8.0},
        "peak_mem_mib": None, "peak_mem_ratio_vs_reference": None}
    report["goals"] = _goals(report)
    step, loss = "step <= 2.2 x nnUNetTrainer", "pair selection + loss <= 5% of the step"
    loader = "two-view loader >= 0.45 x standard loader"
    assert {(g["run"], g["goal"]): g["met"] for g in report["goals"]} == {
        ("Spade [fp32]", step): False, ("Spade [fp32]", loss): True,
        ("Spade [bf16]", step): True, ("Spade [bf16]", loss): False,
        ("Spade", f"{loader} (single process)"): True, ("Spade", f"{loader} (2 workers)"): False}
    text = format_report(report)
    assert "MISSED  Spade [fp32]: step <= 2.2 x nnUNetTrainer (measured 2.30)" in text
    assert "met     Spade: two-view loader >= 0.45 x standard loader (single process) (measured 0.50)" in text


def test_isolated_bench_speed_alternates_configurations_and_takes_medians_over_rounds():
    from nnunet_ssl.step_cost import _isolated_report, _run_rounds, format_report
    steps = {("Stock", "fp32"): [1.0, 1.2, 1.1], ("Spade", "fp32"): [2.0, 2.4, 2.2],
             ("Spade", "fp32-cl"): [1.0, 1.5, 1.1]}
    calls = []

    def one_process(name, variant, rnd):  # what _run_in_process returns: that process's bench_speed report
        calls.append((name, variant, rnd))
        label = name if name == "Stock" else f"{name} [{variant}]"
        t = steps[(name, variant)][rnd]
        return {"device": "cpu", "step_s_median": {label: t}, "trainer": {label: name}, "batch_size": {label: 2},
                "precision": {label: "fp32" if name == "Stock" else variant}, "first_step_s": {label: 0.5},
                "loss_s_median": {} if name == "Stock" else {label: t / 10}, "loader_workers": 0,
                "loader_batches_per_s": {name: 10.0 + rnd}, "loader_batches_per_s_workers": {},
                "cpu_allocator": "C library defaults" if variant == "fp32" else "freed memory kept for reuse"}
    configs = [("Stock", "fp32"), ("Stock", "fp32-cl"), ("Spade", "fp32"), ("Spade", "fp32-cl")]
    runs = _run_rounds(configs, 3, one_process)
    # each round in order; a stock trainer (one label, no variant) runs once per round
    assert calls == [(n, v, r) for r in range(3) for n, v in configs if (n, v) != ("Stock", "fp32-cl")]
    r = _isolated_report(runs, ["Stock", "Spade"], 3, "4", "3d_fullres", "p", 40, 0)
    assert r["step_s_rounds"] == {"Stock": [1.0, 1.2, 1.1], "Spade [fp32]": [2.0, 2.4, 2.2],
                                  "Spade [fp32-cl]": [1.0, 1.5, 1.1]}
    assert r["step_s_median"] == {"Stock": 1.1, "Spade [fp32]": 2.2, "Spade [fp32-cl]": 1.1}
    assert r["speedup_vs_fp32"] == {"Spade [fp32]": 1.0, "Spade [fp32-cl]": pytest.approx(2.0)}
    assert r["step_ratio_vs_reference"]["Spade [fp32]"] == pytest.approx(2.0)
    assert r["loss_share_of_step"] == {"Spade [fp32]": pytest.approx(0.1), "Spade [fp32-cl]": pytest.approx(0.1)}
    assert r["loader_batches_per_s"] == {"Stock": 11.0, "Spade": 11.0}
    assert r["cpu_allocator"]["Spade [fp32]"] == "C library defaults"
    text = format_report(r)
    assert "one process per trainer and variant, 3 rounds alternating" in text
    assert "Spade [fp32-cl] 1.0000 / 1.5000 / 1.1000" in text and "MISSED  Spade [fp32-cl]: pair selection" in text


@pytest.mark.slow
def test_bench_speed_reports_loss_share_loaders_and_cpu_bf16(tmp_path):
    env = clean_env(tmp_path)
    from nnunet_ssl.phantom import make_phantom_dataset
    make_phantom_dataset(tmp_path / "raw", 994, "Bench", num_train=6, num_test=0, shape=(24, 24, 24), seed=5)
    run([BIN / "nnunet-ssl", "plan", "-d", 994, "-pl", "nnUNetPlannerTiny", "-c", "3d_fullres"], env)
    out = tmp_path / "bench.json"
    res = run([BIN / "nnunet-ssl", "bench-speed", "-d", 994, "-p", "nnUNetPlansTiny", "-tr", "nnUNetTrainer",
               "SpadePretrainTrainer", "--iterations", 1, "--workers", 1, "--cpu-bf16", "compare", "--json", out], env)
    r = json.loads(out.read_text())
    # the stock trainer has no fast path: it runs once, in float32, and is the reference of both Spade runs (whose
    # float32 run is in the plugin's default channels-last layout)
    assert r["precision"] == {"nnUNetTrainer [fp32]": "fp32", "SpadePretrainTrainer [fp32]": "fp32-cl",
                              "SpadePretrainTrainer [bf16]": "bf16"}
    assert set(r["loss_share_of_step"]) == {"SpadePretrainTrainer [fp32]", "SpadePretrainTrainer [bf16]"}
    assert all(0 < v < 1 for v in r["loss_share_of_step"].values())
    assert r["bf16_speedup"]["SpadePretrainTrainer"] > 0
    for rates in (r["loader_batches_per_s"], r["loader_batches_per_s_workers"]):
        assert set(rates) == {"nnUNetTrainer", "SpadePretrainTrainer"} and all(v > 0 for v in rates.values())
    assert len(r["goals"]) == 6 and "goals:" in res.stdout and "1 workers [batches/s]" in res.stdout

    # --isolate: each trainer and variant in a process of its own (rounds: the test above); the old float32 path
    # with the C library's allocator defaults and the default variant keeping freed memory can only both hold in two
    # processes
    res = run([BIN / "nnunet-ssl", "bench-speed", "-d", 994, "-p", "nnUNetPlansTiny", "-tr", "nnUNetTrainer",
               "SpadePretrainTrainer", "--iterations", 1, "--cpu-fast", "fp32", "fp32-cl", "--isolate", "--rounds", 1,
               "--json", out], env)
    r = json.loads(out.read_text())
    spade = ["SpadePretrainTrainer [fp32]", "SpadePretrainTrainer [fp32-cl]"]
    assert list(r["step_s_rounds"]) == ["nnUNetTrainer"] + spade
    assert all(len(v) == 1 and min(v) > 0 for v in r["step_s_rounds"].values())
    assert r["cpu_allocator"] == {"nnUNetTrainer": "C library defaults", spade[0]: "C library defaults",
                                  spade[1]: "freed memory kept for reuse"}
    assert set(r["loss_s_rounds"]) == set(spade) and all(0 < v < 1 for v in r["loss_share_of_step"].values())
    assert r["speedup_vs_fp32"][spade[1]] == pytest.approx(r["step_s_median"][spade[0]] / r["step_s_median"][spade[1]])
    assert "one process per trainer and variant, 1 round;" in res.stdout and "goals:" in res.stdout
