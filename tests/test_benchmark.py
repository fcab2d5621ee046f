"""nnunet-ssl benchmark: the protocol's splits and budgets, the reports, and one small run end to end."""
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, clean_env, run
from nnunet_ssl import benchmark as bm
from nnunet_ssl.phantom import make_phantom_dataset


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("bench") / "raw"
    make_phantom_dataset(raw, 990, "SSLPhantom", num_train=12, num_test=3, shape=(32, 32, 32), seed=0)
    return raw


def test_holdout_split_is_seeded_disjoint_and_pool_only(phantom_raw, tmp_path):
    src = phantom_raw / "Dataset990_SSLPhantom"
    a = bm.prepare_data(tmp_path / "a", src, None, split_seed=3, test_fraction=0.25, max_test=None)
    b = bm.prepare_data(tmp_path / "b", src, None, split_seed=3, test_fraction=0.25, max_test=None)
    c = bm.prepare_data(tmp_path / "c", src, None, split_seed=4, test_fraction=0.25, max_test=None)
    assert a["test"] == b["test"] and a["test"] != c["test"]
    assert len(a["test"]) == 3 and len(a["pool"]) == 9 and not set(a["test"]) & set(a["pool"])
    # only pool cases reach the benchmark's nnUNet_raw, so nnU-Net never preprocesses a test case
    linked = sorted(p.name for p in (tmp_path / "a" / "nnUNet_raw" / src.name / "labelsTr").iterdir())
    assert linked == [f"{c}.nii.gz" for c in a["pool"]]
    assert json.loads((tmp_path / "a" / "nnUNet_raw" / src.name / "dataset.json").read_text())["numTraining"] == 9
    assert sorted(p.name for p in (tmp_path / "a" / "test" / "labels").iterdir()) == \
        [f"{c}.nii.gz" for c in a["test"]]
    # the same work dir refuses another split instead of mixing results
    with pytest.raises(SystemExit, match="another dataset/split"):
        bm.prepare_data(tmp_path / "a", src, None, split_seed=4, test_fraction=0.25, max_test=None)


def test_test_raw_makes_every_case_pool(phantom_raw, tmp_path):
    src = phantom_raw / "Dataset990_SSLPhantom"
    d = bm.prepare_data(tmp_path, src, src, split_seed=0, test_fraction=0.25, max_test=None)
    assert len(d["pool"]) == 12 and d["test"] == ["phantom_012", "phantom_013", "phantom_014"]
    with pytest.raises(SystemExit, match="imagesTs/ \\+ labelsTs/"):
        bm.prepare_data(tmp_path / "x", src, tmp_path / "nowhere", split_seed=0, test_fraction=0.25, max_test=None)


def test_labelled_subsets_nested_in_k_and_disjoint_from_validation():
    pool = [f"c{i:03d}" for i in range(40)]
    for seed in (0, 1):
        l5, v5 = bm.labelled_cases(pool, seed, 5, 3)
        l20, v20 = bm.labelled_cases(pool, seed, 20, 3)
        assert set(l5) <= set(l20) and v5 == v20 and not set(v20) & set(l20)
    assert bm.labelled_cases(pool, 0, 5, 3)[0] != bm.labelled_cases(pool, 1, 5, 3)[0]
    with pytest.raises(SystemExit, match="too few"):
        bm.labelled_cases(pool, 0, 38, 3)


def test_fold_numbers_are_stable_when_settings_grow(tmp_path):
    assert bm.fold_of(tmp_path, 0, 5) == 1
    assert bm.fold_of(tmp_path, 0, 20) == 2
    assert bm.fold_of(tmp_path, 1, 5) == 3
    assert bm.fold_of(tmp_path, 0, 20) == 2  # a rerun with other --labeled/--seeds keeps finished folds


@pytest.mark.parametrize("budget", list(bm.BUDGETS))
def test_scratch_long_matches_pretraining_plus_finetuning(budget):
    its = bm.check_budget(bm.BUDGETS[budget], list(bm.METHODS))
    pre = {v for k, v in its.items() if k.startswith("pretrain_")}
    assert len(pre) == 1 and its["finetune_long"] == its["finetune"] + pre.pop()


def _row(method, seed, per_case, variant="", k=5):
    mean = float(np.mean([np.mean(v) for v in per_case.values()]))
    return {"method": method, "variant": variant, "labeled": k, "seed": seed, "precision": "fp32", "budget": "cpu",
            "plans": "P", "dataset": "DatasetX", "pretrain_trainer": "S_cpu" if bm.METHODS[method] else "",
            "finetune_trainer": "F", "pretrain_iterations": 10 if bm.METHODS[method] else 0,
            "finetune_iterations": 20, "total_iterations": 20, "num_test": len(per_case), "mean_dice": mean,
            "per_case": per_case, "dice_1": float(np.mean([v[0] for v in per_case.values()])),
            "dice_2": float(np.mean([v[1] for v in per_case.values()])), "pretrain_s": 1.0, "finetune_s": 2.0,
            "predict_s": 3.0}


def test_reports_paired_differences_ci_wins_and_lost_classes(tmp_path):
    (tmp_path / "cells").mkdir()
    scratch = [{"c1": [0.8, 0.6], "c2": [0.7, 0.3]}, {"c1": [0.6, 0.6], "c2": [0.6, 0.6]}]
    spade = [{"c1": [0.9, 0.7], "c2": [0.8, 0.6]}, {"c1": [0.7, 0.6], "c2": [0.5, 0.6]}]
    rows = [_row("scratch", s, pc) for s, pc in enumerate(scratch)] + \
        [_row("spade", s, pc) for s, pc in enumerate(spade)]
    for i, r in enumerate(rows):
        (tmp_path / "cells" / f"{i}.json").write_text(json.dumps(r))
    s = bm.Settings("990", str(tmp_path), ("scratch", "spade"), (5,), (0, 1), "cpu")
    bm.write_reports(tmp_path, {"labels": {"background": 0, "a": 1, "b": 2}}, s)
    md = (tmp_path / "results.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| spade | 5 |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    # per case mean over classes: scratch (0.7, 0.5 | 0.6, 0.6), spade (0.8, 0.7 | 0.65, 0.55)
    assert cols[2] == "2" and cols[3] == "10 + 20"
    assert cols[4].startswith("0.675 [")
    assert cols[5].startswith("+0.075 [") and cols[6] == "1/2"  # seed 0 wins (+0.15), seed 1 ties (0.0)
    assert cols[7] == "–" and cols[9] == "0/2"  # no scratch_long cells; every spade class mean >= 0.6
    scratch_line = next(ln for ln in md.splitlines() if ln.startswith("| scratch | 5 |"))
    assert scratch_line.rstrip().endswith("| 1/2 |")  # scratch seed 0 lost class b on average (0.45 < 0.5)
    assert "| a | b |" in md
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and [r["method"] for r in table] == ["scratch", "scratch", "spade", "spade"]
    assert float(table[3]["dice_2"]) == pytest.approx(0.6)
    assert (tmp_path / "results.png").stat().st_size > 1000
    # the legend names every row, scratch included (it has no line in the difference panel)
    assert bm.plot(bm.load_rows(tmp_path / "cells"), tmp_path / "p.png", "t") == ["scratch", "spade"]


@pytest.mark.parametrize("n", [1, 10, 11, 20, 21, 90])
def test_plot_rows_never_share_a_style(n):
    styles = list(bm.row_styles(n))
    assert len(styles) == n and len(set(styles)) == n
    if n <= 20:  # up to twenty rows differ by colour alone (solid lines), as the eye reads them first
        assert len({c for c, _, _ in styles}) == n and {ls for _, ls, _ in styles} == {"-"}


def test_auto_precision_cells_of_bf16_and_fp32_machines_form_one_setup(tmp_path):
    (tmp_path / "cells").mkdir()
    for i, (method, seed, prec) in enumerate((("scratch", 0, "bf16"), ("scratch", 1, "fp32"), ("spade", 0, "bf16"),
                                              ("spade", 1, "fp32"))):
        row = {**_row(method, seed, {"c": [0.5 + 0.1 * i, 0.6]}), "precision": prec, "setup": "cpu"}
        (tmp_path / "cells" / f"{i}.json").write_text(json.dumps(row))
    bm.write_reports(tmp_path, {"labels": {"background": 0, "a": 1, "b": 2}},
                     bm.Settings("990", str(tmp_path), ("scratch", "spade"), (5,), (0, 1), "cpu"))
    md = (tmp_path / "results.md").read_text()
    assert md.count("### budget cpu") == 1 and "cells ran in bf16, fp32" in md
    assert next(ln for ln in md.splitlines() if ln.startswith("| spade | 5 |")).split("|")[3].strip() == "2"


def test_iterations_column_gives_the_range_where_cells_differ(tmp_path):
    # stock nnU-Net trains for the minutes of each seed's scratch cell: its iterations differ between seeds
    (tmp_path / "cells").mkdir()
    for i, (method, seed, its) in enumerate((("scratch", 0, 20), ("scratch", 1, 20), ("stock", 0, 1325),
                                             ("stock", 1, 3600), ("stock", 2, 1800))):
        row = {**_row(method, seed, {"c": [0.6, 0.6]}), "pretrain_iterations": 0, "finetune_iterations": its}
        (tmp_path / "cells" / f"{i}.json").write_text(json.dumps(row))
    bm.write_reports(tmp_path, {"labels": {"background": 0, "a": 1, "b": 2}},
                     bm.Settings("990", str(tmp_path), ("scratch", "stock"), (5,), (0, 1, 2), "cpu"))
    lines = (tmp_path / "results.md").read_text().splitlines()
    column = {m: next(ln for ln in lines if ln.startswith(f"| {m} | 5 |")).split("|")[4].strip()
              for m in ("scratch", "stock")}
    assert column == {"scratch": "0 + 20", "stock": "0 + 1325–3600"}


def test_trainer_overrides_name_their_cells_and_report_apart(tmp_path, monkeypatch):
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS
    assert "SpadePretrainTrainer_cpu_80ep" not in PRETRAINING_TRAINERS  # investigation variants are not the product
    with pytest.raises(SystemExit, match="nnUNet_extTrainer="):
        bm.trainer_class("SpadePretrainTrainer_cpu_80ep")
    monkeypatch.setenv("nnUNet_extTrainer", str(bm.INVESTIGATION_TRAINERS))
    assert bm.trainer_class("SpadePretrainTrainer_cpu_80ep").num_epochs == 80
    over = {"spade": "SpadePretrainTrainer_cpu_t03"}
    assert bm.cell_variant("scratch", None, over) == ""  # scratch cells are shared with the default run
    assert bm.cell_variant("spade", None, over) == "SpadePretrainTrainer_cpu_t03"
    assert bm.cell_variant("spade", "nnUNetTrainerFinetune_cpu_80ep_lr3e3", over,
                           "nnUNetTrainerPretrainedFinetune_cpu") == \
        "SpadePretrainTrainer_cpu_t03+nnUNetTrainerPretrainedFinetune_cpu"
    assert bm.cell_variant("scratch", "nnUNetTrainerFinetune_cpu_80ep_lr3e3", over) == \
        "nnUNetTrainerFinetune_cpu_80ep_lr3e3"
    assert bm.cell_variant("scratch_long", "nnUNetTrainerFinetune_cpu_80ep_lr3e3", {}) == ""
    budget = bm.BUDGETS["cpu"]
    assert bm.finetune_trainer_of("spade", budget) == budget.finetune_pretrained_trainer
    assert bm.finetune_trainer_of("scratch", budget) == budget.finetune_trainer
    assert bm.finetune_trainer_of("stock", budget) == "nnUNetTrainerWallClock"
    its = bm.check_budget(budget, ["scratch", "spade"], None, {"spade": "SpadePretrainTrainer_cpu_80ep"})
    assert its == {"finetune": 3000, "pretrain_spade": 2000}
    with pytest.raises(SystemExit, match="scratch_long"):  # 2000 + 2000 != 3000
        bm.check_budget(budget, ["scratch_long", "spade"], None, {"spade": "SpadePretrainTrainer_cpu_80ep"})
    with pytest.raises(SystemExit, match="equal fine-tuning lengths"):
        bm.check_budget(budget, ["scratch", "spade"], None, {}, "nnUNetTrainerPretrainedFinetune_smoke")
    with pytest.raises(SystemExit, match="add 'scratch'"):
        bm.check_budget(budget, ["stock"], None, {})
    with pytest.raises(SystemExit, match="METHOD=TRAINER"):
        bm._method_trainer("SpadePretrainTrainer_cpu_t03")

    (tmp_path / "cells").mkdir()
    for i, (variant, d) in enumerate((("", 0.5), ("SpadePretrainTrainer_cpu_t03", 0.9))):
        (tmp_path / "cells" / f"{i}.json").write_text(json.dumps(_row("spade", 0, {"c": [d, d]}, variant)))
    bm.write_reports(tmp_path, {"labels": {"background": 0, "a": 1}},
                     bm.Settings("990", str(tmp_path), ("spade",), (5,), (0,), "cpu"))
    md = (tmp_path / "results.md").read_text()
    assert "| spade | 5 | 1 | 10 + 20 | 0.500 [0.500, 0.500] |" in md
    assert "| spade [SpadePretrainTrainer_cpu_t03] | 5 | 1 | 10 + 20 | 0.900 [0.900, 0.900] |" in md


def test_prepare_only_writes_the_split_and_trains_nothing(phantom_raw, tmp_path):
    env = clean_env(tmp_path, nnUNet_raw=phantom_raw)
    res = run([BIN / "nnunet-ssl", "benchmark", "-d", "990", "--work-dir", tmp_path / "w", "--prepare-only"], env)
    assert "nothing trained" in res.stdout
    assert len(list((tmp_path / "w" / "nnUNet_raw" / "Dataset990_SSLPhantom" / "labelsTr").iterdir())) == 9
    assert not (tmp_path / "w" / "nnUNet_preprocessed").exists() and not (tmp_path / "w" / "cells").exists()


def test_report_only_rewrites_the_results_from_kept_cells_and_trains_nothing(phantom_raw, tmp_path):
    env = clean_env(tmp_path, nnUNet_raw=phantom_raw)
    cells = tmp_path / "cells"
    cmd = [BIN / "nnunet-ssl", "benchmark", "-d", "990", "--work-dir", tmp_path / "w", "--cells-dir", cells,
           "--report-only"]
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "no finished cells" in res.stderr
    cells.mkdir(exist_ok=True)
    for seed, d in enumerate((0.6, 0.8)):
        (cells / f"s{seed}.json").write_text(json.dumps(_row("scratch", seed, {"c1": [d, d], "c2": [d, d]})))
    res = run(cmd, env)
    assert "nothing trained" in res.stdout and "| scratch | 5 |" in res.stdout
    md = (tmp_path / "w" / "results.md").read_text()
    assert "| scratch | 5 | 2 |" in md and (tmp_path / "w" / "results.png").stat().st_size > 1000
    assert not (tmp_path / "w" / "nnUNet_preprocessed").exists() and not (tmp_path / "w" / "nnUNet_results").exists()
    # cells of another split are refused, not mixed into the report
    (cells / "other.json").write_text(json.dumps({**_row("scratch", 2, {"c1": [0.1, 0.1]}), "split_id": "0123456789ab"}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "other.json was scored on another pool/test split (split 0123456789ab, this run" in res.stderr


@pytest.mark.realdata
def test_hippocampus_hold_out_is_seeded_and_never_in_the_pool(tmp_path):
    """On real MSD Hippocampus (no labelled imagesTs): the default split holds out a seeded 25 % of imagesTr as the
    test set; the pool-only raw folder (what pretraining and fine-tuning see) has the other 150 cases and none of
    the test cases, and the user's raw folder is only read."""
    from conftest import HIPPOCAMPUS
    if not (HIPPOCAMPUS / "dataset.json").exists():
        pytest.skip("../shared/data/Dataset004_Hippocampus is not available")
    env = clean_env(tmp_path, nnUNet_raw=HIPPOCAMPUS.parent)
    run([BIN / "nnunet-ssl", "benchmark", "-d", "4", "--work-dir", tmp_path / "w", "--prepare-only"], env)
    split = json.loads((tmp_path / "w" / "split.json").read_text())
    assert len(split["test"]) == 50 and len(split["pool"]) == 150 and not set(split["test"]) & set(split["pool"])
    pool_raw = tmp_path / "w" / "nnUNet_raw" / "Dataset004_Hippocampus"
    assert sorted(p.name[:-7] for p in (pool_raw / "labelsTr").iterdir()) == sorted(split["pool"])
    assert sorted(p.name[:-7] for p in (tmp_path / "w" / "test" / "labels").iterdir()) == sorted(split["test"])
    again = tmp_path / "again"
    run([BIN / "nnunet-ssl", "benchmark", "-d", "4", "--work-dir", again, "--prepare-only"], env)
    assert json.loads((again / "split.json").read_text()) == split  # seeded: the same split every time
    assert not (HIPPOCAMPUS / "splits_final.json").exists()


def test_unknown_method_and_dataset_fail_clearly(tmp_path):
    env = clean_env(tmp_path)
    (tmp_path / "raw").mkdir()
    res = subprocess.run([str(BIN / "nnunet-ssl"), "benchmark", "-d", "990", "--methods", "mae",
                          "--work-dir", str(tmp_path / "w")], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "unknown method(s) mae" in res.stderr
    res = subprocess.run([str(BIN / "nnunet-ssl"), "benchmark", "-d", "123", "--work-dir", str(tmp_path / "w")],
                         env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "dataset 123 not found" in res.stderr


def test_changed_trainer_settings_are_named_and_a_stale_pretraining_is_refused(tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("nnUNet_extTrainer", str(bm.INVESTIGATION_TRAINERS))
    plain, moco = bm.trainer_settings("SpadePretrainTrainer_cpu"), bm.trainer_settings("SpadePretrainTrainer_cpu_moco")
    assert plain["global_queue_size"] == "0" and plain["r_neg"] == "0.3" and plain["num_epochs"] == "40"
    assert bm.changed_settings(plain, moco) == \
        "global_queue_size 0 -> 256, momentum 0.999 -> 0.99, use_momentum_encoder False -> True"
    # a setting added since a record was written keeps the behaviour the record ran with; logging is no setting
    assert bm.changed_settings({k: v for k, v in plain.items() if k != "r_neg"}, plain) == ""
    assert bm.changed_settings({**plain, "logged_terms": "('global',)"}, plain) == ""
    # nor is how the same pairs are searched: a pretraining with the distance matrix is reused by the window's run
    brute = bm.trainer_settings("SpadePretrainTrainer_cpu_brute")
    assert brute["local_match_search"] == "'brute'" and plain["local_match_search"] == "'auto'"
    assert bm.changed_settings(brute, plain) == ""
    assert bm.changed_settings({**plain, "cpu_channels_last_norm": "'torch'"}, plain) == ""  # same step, other kernel
    assert bm.trainer_settings("nnUNetTrainerFinetune_cpu_120ep_lr3e3")["initial_lr"] == "0.003"

    # a pretraining kept in a work dir is checked against the settings its pretrain_time.json records, or, for a
    # run from before that record, against the ssl_method of its checkpoint (engine and budget settings, same reprs)
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"ssl_method": {"trainer": "SpadePretrainTrainer_cpu", **plain}}, ckpt)
    spade_now = lambda: bm.trainer_settings("SpadePretrainTrainer_cpu")  # noqa: E731 (read after the patch below)
    for record in ({"settings": plain}, {}):
        bm.check_reused_pretraining(ckpt, "SpadePretrainTrainer_cpu", record, spade_now())
    monkeypatch.setattr(bm.trainer_class("SpadePretrainTrainer_cpu"), "global_queue_size", 64)  # a new default
    for record in ({"settings": plain}, {}):
        with pytest.raises(SystemExit, match=r"with other settings than it declares now \(global_queue_size 0 -> 64\)"
                                             r": delete .* to pretrain again"):
            bm.check_reused_pretraining(ckpt, "SpadePretrainTrainer_cpu", record, spade_now())
    # the record covers what ssl_method leaves out: settings of mixins outside the engine, e.g. the masking
    recon = bm.trainer_settings("MaskedReconPretrainTrainer_cpu")
    torch.save({"ssl_method": {"trainer": "MaskedReconPretrainTrainer_cpu"}}, ckpt)
    with pytest.raises(SystemExit, match=r"\(mask_ratio 0.3 -> 0.6\)"):
        bm.check_reused_pretraining(ckpt, "MaskedReconPretrainTrainer_cpu", {"settings": {**recon, "mask_ratio": "0.3"}},
                                    recon)


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(phantom_raw, tmp_path):
    """Smoke scale, scratch vs spade, scored on the dataset's imagesTs through --test-raw; a rerun recomputes
    nothing but a lost cell's prediction and score, redone from the kept fine-tuned model."""
    env = {k: v for k, v in clean_env(tmp_path).items() if k not in ("nnUNet_preprocessed", "nnUNet_results")}
    env["nnUNet_raw"] = str(phantom_raw)
    work = tmp_path / "w"
    # two cells side by side; 'stock' listed first still waits for the training time of its 'scratch' cell
    cmd = [BIN / "nnunet-ssl", "benchmark", "-d", "990", "--quick", "--methods", "stock", "scratch", "spade",
           "--labeled", "3", "--seeds", "0", "--test-raw", phantom_raw / "Dataset990_SSLPhantom",
           "--work-dir", work, "--precision", "fp32", "--jobs", "2"]
    first = run(cmd, env, timeout=1200)
    assert "seed=0: pretraining SpadePretrainTrainer_smoke" in first.stdout and "seed=0: fine-tuning" in first.stdout
    with open(work / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("scratch", "0"), ("spade", "0"), ("stock", "0")]
    for r in rows:
        assert r["num_test"] == "3" and 0 <= float(r["mean_dice"]) <= 1 and r["budget"] == "quick"
        assert {"dice_1", "dice_2", "dice_3", "dice_4"} <= set(r)
    cells = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (work / "cells").glob("*.json")}
    assert sorted(cells["spade"]["per_case"]) == ["phantom_012.nii.gz", "phantom_013.nii.gz", "phantom_014.nii.gz"]
    assert all(len(v) == 4 for v in cells["spade"]["per_case"].values())  # one Dice per class
    # stock nnU-Net trained for scratch's training time, in epochs of 25 iterations
    assert cells["scratch"]["train_s"] > 0 and cells["stock"]["finetune_trainer"] == "nnUNetTrainerWallClock"
    assert cells["stock"]["finetune_iterations"] % 25 == 0 and cells["stock"]["train_s"] >= cells["scratch"]["train_s"]
    assert cells["spade"]["finetune_trainer"] == "nnUNetTrainerPretrainedFinetune_smoke"
    assert cells["spade"]["pretrain_settings"] == bm.trainer_settings("SpadePretrainTrainer_smoke")
    assert cells["scratch"]["finetune_settings"]["num_epochs"] == "2" and cells["scratch"]["pretrain_settings"] == {}
    # --jobs 2: every training ran on its share of the cores (nnU-Net would take them all)
    share = max(1, (os.cpu_count() or 1) // 2)
    for log in ("ft_scratch_k3_s0.log", "ft_stock_k3_s0.log", "ft_spade_k3_s0.log", "pretrain_spade.log"):
        assert f"torch threads capped at {share}" in next((work / "logs").glob(f"*/{log}")).read_text(), log
    spade = next(r for r in rows if r["method"] == "spade")
    assert spade["pretrain_iterations"] == "4" and spade["total_iterations"] == "8"
    # the pretraining fold is the pool, which is every imagesTr case and no test case
    splits = json.loads((work / "nnUNet_preprocessed" / "Dataset990_SSLPhantom" / "splits_final.json").read_text())
    assert len(splits[0]["train"]) == 12 and all(len(s["train"]) == 3 for s in splits[1:])
    assert (work / "results.png").exists() and "| quick | fp32 | spade |" in (work / "results.md").read_text()

    lost = next((work / "cells").glob("*spade__k3__s0.json"))
    lost.unlink()
    again = run(cmd, env, timeout=600)
    assert again.stdout.count("done before") == 2 and "predicting" in again.stdout
    assert "seed=0: fine-tuning" not in again.stdout and "seed=0: pretraining" not in again.stdout
    assert lost.exists()
    assert Path(work / "results.csv").read_text().count("\n") == 4
    # a kept cell trained with other trainers (the budget changed) or on another split (a --cells-dir shared by
    # mistake) is refused, not mixed in
    scratch_cell = next((work / "cells").glob("*__scratch__k3__s0.json"))
    kept = json.loads(scratch_cell.read_text())
    scratch_cell.write_text(json.dumps({**kept, "finetune_trainer": "nnUNetTrainerFinetune_cpu_80ep"}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "was trained with no pretraining + nnUNetTrainerFinetune_cpu_80ep" in res.stderr
    scratch_cell.write_text(json.dumps({**kept, "finetune_iterations": 2000}))  # same trainer, other length
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "fine-tuned 2000 iterations" in res.stderr
    scratch_cell.write_text(json.dumps(kept))
    spade_kept = json.loads(lost.read_text())
    lost.write_text(json.dumps({**spade_kept, "pretrain_iterations": 999}))  # a pretraining budget changed
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "pretrained 999 iterations" in res.stderr
    lost.write_text(json.dumps(spade_kept))
    # same trainers and lengths, but a setting changed since the cell was scored
    scratch_cell.write_text(json.dumps({**kept, "finetune_settings": {**kept["finetune_settings"],
                                                                      "initial_lr": "0.5"}}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "declaring other settings than now (initial_lr 0.5 -> 0.01)" in res.stderr
    # ... and a kept fine-tuned model whose trainer changed since is not scored again under the new settings
    scratch_cell.unlink()
    time_file = next(work.glob("results/*/scratch/*/nnUNetTrainerFinetune_smoke__*/fold_*/finetune_time.json"))
    timing = json.loads(time_file.read_text())
    time_file.write_text(json.dumps({**timing, "settings": {**timing["settings"], "num_epochs": "7"}}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "with other settings than it declares now (num_epochs 7 -> 2)" in res.stderr
    time_file.write_text(json.dumps(timing))
    # a kept fine-tuning of an earlier pretraining (the method was pretrained again since) is not scored as one of
    # the new pretraining
    lost.unlink()
    pre_record = next(work.glob("results/*/pretrain/*/SpadePretrainTrainer_smoke__*/pretrain_time.json"))
    record = json.loads(pre_record.read_text())
    assert len(record["run"]) == 32 and record["settings"] == bm.trainer_settings("SpadePretrainTrainer_smoke")
    pre_record.write_text(json.dumps({**record, "run": "0" * 32}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "was fine-tuned from an earlier pretraining of SpadePretrainTrainer_smoke" \
        in res.stderr
    pre_record.write_text(json.dumps(record))
    lost.write_text(json.dumps(spade_kept))
    scratch_cell.write_text(json.dumps({**kept, "split_id": "0123456789ab"}))
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "scored on another pool/test split" in res.stderr


def test_methods_register_themselves_by_benchmark_name():
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS
    assert bm.METHODS["spade"] == "SpadePretrainTrainer" and bm.METHODS["spade_recon"] == "SpadeReconPretrainTrainer"
    assert list(bm.METHODS)[:3] == ["scratch", "scratch_long", "stock"]
    # every method's budget variants exist and carry its row name; only base trainers declare one
    for method, base in bm.METHODS.items():
        if base:
            for suffix in ("", "_cpu", "_smoke"):
                assert PRETRAINING_TRAINERS[base + suffix].benchmark_name == method
    assert set(bm.DEFAULT_METHODS) <= set(bm.METHODS)
    # the command's help (kept free of the trainers' imports) names the real default rows and the others
    from nnunet_ssl.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.choices and "benchmark" in a.choices).choices["benchmark"]
    help_text = next(a.help for a in sub._actions if "--methods" in a.option_strings)
    default, _, others = help_text.removeprefix("default: ").partition(" (also: ")
    assert default.split() == list(bm.DEFAULT_METHODS)
    assert sorted(others.rstrip(")").split()) == sorted(set(bm.METHODS) - set(bm.DEFAULT_METHODS))
