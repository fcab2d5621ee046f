"""``nnunet-ssl demo``: the whole workflow on a generated phantom dataset (or an existing nnU-Net dataset).

phantom -> plan + preprocess (small CPU network) -> Spade pretraining on all pool images -> fine-tuning on a few
labelled cases, from scratch and from the pretrained weights, with the same trainer and budget -> nnUNetv2_predict
on held-out test cases -> nnU-Net's evaluation -> Dice table + plot.

Test cases never enter pretraining or fine-tuning. Everything is written under ``--work-dir`` (its own
nnUNet_preprocessed / nnUNet_results), so an existing nnU-Net installation is only read, never modified.
Finished steps are skipped when the demo is run again with the same work dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Dict, Optional

from nnunet_ssl import pipeline

PHANTOM_ID = 990
PHANTOM_NAME = "SSLPhantom"

# --quick: the same pipeline at smoke-test scale (about a minute on a 2-core CPU; numbers are meaningless)
QUICK = dict(planner="nnUNetPlannerTiny", pretrain_trainer="SpadePretrainTrainer_smoke",
             finetune_trainer="nnUNetTrainerFinetune_smoke", num_train=10, num_test=3, labeled=3, num_val=2,
             phantom_shape=(32, 32, 32))


def _log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)


def run_demo(work_dir: str = "nnunet_ssl_demo", dataset: Optional[int] = None, labeled: int = 5,
             num_val: int = 3, device: str = "cpu", configuration: str = "3d_fullres",
             planner: str = "nnUNetPlannerSmall", pretrain_trainer: str = "SpadePretrainTrainer_cpu",
             finetune_trainer: str = "nnUNetTrainerFinetune_cpu", num_train: int = 40, num_test: int = 10,
             test_fraction: float = 0.25, seed: int = 0, num_processes: int = 2,
             phantom_shape=(40, 40, 40)) -> Dict:
    t0 = time.time()
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    preprocessed = work / "nnUNet_preprocessed"
    preprocessed.mkdir(exist_ok=True)
    env_extra = {"nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0" if device == "cpu" else "8")}

    # ---- data
    if dataset is None:
        from nnunet_ssl.phantom import make_phantom_dataset
        raw = work / "nnUNet_raw"
        ds_dir = raw / f"Dataset{PHANTOM_ID:03d}_{PHANTOM_NAME}"
        if not (ds_dir / "dataset.json").exists():
            _log(f"generating phantom dataset: {num_train} pool + {num_test} test cases -> {ds_dir}", t0)
            make_phantom_dataset(raw, PHANTOM_ID, PHANTOM_NAME, num_train=num_train, num_test=num_test,
                                 shape=phantom_shape, seed=seed)
        dataset = PHANTOM_ID
    else:
        raw_env = os.environ.get("nnUNet_raw")
        if not raw_env:
            raise SystemExit("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (the folder with "
                             "DatasetXXX_Name) to run the demo on an existing dataset")
        raw = Path(raw_env)
        matches = sorted(raw.glob(f"Dataset{int(dataset):03d}_*"))
        if not matches:
            raise SystemExit(f"dataset {dataset} not found in nnUNet_raw={raw}: expected a folder "
                             f"Dataset{int(dataset):03d}_<name>")
        ds_dir = matches[0]
    dataset_json = json.loads((ds_dir / "dataset.json").read_text())
    fe = dataset_json["file_ending"]
    n_ch = len(dataset_json["channel_names"])
    env = lambda results: pipeline.nnunet_env(raw, preprocessed, work / results, env_extra)  # noqa: E731

    # ---- test split: the dataset's labelled imagesTs, else a seeded hold-out of imagesTr
    pool = pipeline.case_ids(ds_dir / "imagesTr", fe)
    ts_cases = pipeline.case_ids(ds_dir / "imagesTs", fe) if (ds_dir / "imagesTs").is_dir() else []
    if ts_cases and (ds_dir / "labelsTs").is_dir():
        test, test_images, test_labels = ts_cases, ds_dir / "imagesTs", ds_dir / "labelsTs"
        src_images, src_labels = ds_dir / "imagesTs", ds_dir / "labelsTs"
    else:
        rng = random.Random(seed)
        test = sorted(rng.sample(pool, max(1, round(test_fraction * len(pool)))))
        pool = [c for c in pool if c not in test]
        src_images, src_labels = ds_dir / "imagesTr", ds_dir / "labelsTr"
    test_images, test_labels = work / "test" / "images", work / "test" / "labels"
    pipeline.link_cases(test, src_images, src_labels, test_images, test_labels, fe, n_ch)
    if labeled + num_val > len(pool):
        raise SystemExit(f"the pool has {len(pool)} cases: too few for {labeled} labelled + {num_val} validation "
                         f"cases; lower --labeled")
    rng = random.Random(seed + 1)
    shuffled = rng.sample(pool, len(pool))
    labeled_cases, val_cases = sorted(shuffled[:labeled]), sorted(shuffled[labeled:labeled + num_val])
    _log(f"dataset {ds_dir.name}: pool {len(pool)} cases (pretraining), {labeled} labelled for fine-tuning, "
         f"{num_val} validation, {len(test)} test cases (never trained on)", t0)

    # ---- plan + preprocess (own nnUNet_preprocessed; the user's is never touched)
    plans_id = {"nnUNetPlannerSmall": "nnUNetPlansSmall", "nnUNetPlannerTiny": "nnUNetPlansTiny"}.get(planner)
    plans_file = preprocessed / ds_dir.name / f"{plans_id}.json" if plans_id else None
    if plans_file is None or not plans_file.exists() or not (preprocessed / ds_dir.name /
                                                             f"{plans_id}_{configuration}").is_dir():
        _log(f"planning ({planner}) and preprocessing {configuration} (log: {work / 'logs' / 'plan.log'}) ...", t0)
        os.environ.update({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed)})
        from nnunet_ssl.nnunet.planning import plan_and_preprocess
        (work / "logs").mkdir(exist_ok=True)
        with open(work / "logs" / "plan.log", "w") as log, contextlib.redirect_stdout(log):
            plans_id = plan_and_preprocess(dataset, planner, [configuration], num_processes)
        plans_file = preprocessed / ds_dir.name / f"{plans_id}.json"
    # fold 0: fine-tuning on the labelled cases; fold 1: pretraining on the whole pool (labels unused)
    pipeline.write_splits(preprocessed / ds_dir.name, [{"train": labeled_cases, "val": val_cases},
                                                       {"train": sorted(pool), "val": val_cases}])

    # ---- pretraining
    pre_out = work / "results_pretrain" / ds_dir.name / f"{pretrain_trainer}__{plans_id}__{configuration}" / "fold_1"
    ckpt = pre_out / "checkpoint_final.pth"
    times = {}
    if not ckpt.exists():
        _log(f"pretraining: nnUNetv2_train {dataset} {configuration} 1 -tr {pretrain_trainer} -p {plans_id}", t0)
        times["pretrain_s"] = pipeline.train(dataset, configuration, 1, pretrain_trainer, plans_id,
                                             env("results_pretrain"), work / "logs" / "pretrain.log", "pretrain",
                                             device, output_folder=pre_out)
    else:
        _log(f"pretraining already done: {ckpt}", t0)

    # ---- fine-tuning, prediction, evaluation
    results = {}
    for variant, weights in (("scratch", None), ("spade", ckpt)):
        res_dir = f"results_{variant}"
        out = work / res_dir / ds_dir.name / f"{finetune_trainer}__{plans_id}__{configuration}" / "fold_0"
        if not (out / "checkpoint_final.pth").exists():
            _log(f"fine-tuning [{variant}] on {labeled} labelled cases: nnUNetv2_train {dataset} {configuration} 0 "
                 f"-tr {finetune_trainer} -p {plans_id}" + (f" -pretrained_weights {weights}" if weights else ""), t0)
            times[f"finetune_{variant}_s"] = pipeline.train(dataset, configuration, 0, finetune_trainer, plans_id,
                                                            env(res_dir), work / "logs" / f"finetune_{variant}.log",
                                                            variant, device, pretrained_weights=weights,
                                                            output_folder=out)
        pred = work / "predictions" / variant
        if not (pred / "summary.json").exists():
            _log(f"predicting {len(test)} test cases [{variant}] with nnUNetv2_predict", t0)
            pipeline.predict(test_images, pred, dataset, configuration, 0, finetune_trainer, plans_id, env(res_dir),
                             work / "logs" / f"predict_{variant}.log", f"predict {variant}", device)
            results[variant] = pipeline.evaluate(test_labels, pred, ds_dir / "dataset.json", plans_file)
        else:
            summary = json.loads((pred / "summary.json").read_text())
            results[variant] = {"mean": summary["foreground_mean"]["Dice"],
                                "per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
                                "num_cases": len(summary["metric_per_case"])}

    label_names = {str(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    report = {"dataset": ds_dir.name, "configuration": configuration, "plans": plans_id, "labeled": labeled,
              "labeled_cases": labeled_cases, "test_cases": test, "pretrain_trainer": pretrain_trainer,
              "finetune_trainer": finetune_trainer, "device": device, "results": results, "step_times_s": times,
              "wall_time_s": round(time.time() - t0, 1)}
    table = format_table(results, label_names)
    (work / "demo_results.json").write_text(json.dumps(report, indent=1))
    (work / "demo_results.md").write_text(table + "\n")
    plot_results(results, label_names, work / "demo_results.png",
                 f"{ds_dir.name}: {labeled} labelled cases, {len(test)} test cases")
    _log("done", t0)
    print("\nTest-set Dice (nnU-Net evaluation, " + f"{len(test)} held-out cases, {labeled} labelled for fine-tuning):")
    print(table)
    print(f"\nresults: {work / 'demo_results.json'}, plot: {work / 'demo_results.png'}; "
          f"wall time {time.time() - t0:.0f} s")
    return report


def format_table(results: Dict[str, dict], label_names: Dict[str, str]) -> str:
    labels = sorted({k for r in results.values() for k in r["per_class"]}, key=lambda s: int(s) if s.isdigit() else s)
    head = "| init | mean Dice | " + " | ".join(label_names.get(k, k) for k in labels) + " |"
    sep = "|---" * (len(labels) + 2) + "|"
    rows = [f"| {name} | {r['mean']:.4f} | " + " | ".join(f"{r['per_class'].get(k, float('nan')):.4f}"
                                                           for k in labels) + " |"
            for name, r in results.items()]
    return "\n".join([head, sep] + rows)


def plot_results(results: Dict[str, dict], label_names: Dict[str, str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = sorted({k for r in results.values() for k in r["per_class"]}, key=lambda s: int(s) if s.isdigit() else s)
    x = np.arange(len(labels) + 1)
    w = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(1.6 * len(x) + 2, 4))
    for i, (name, r) in enumerate(results.items()):
        vals = [r["mean"]] + [r["per_class"].get(k, np.nan) for k in labels]
        ax.bar(x + (i - (len(results) - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(x, ["mean"] + [label_names.get(k, k) for k in labels])
    ax.set_ylim(0, 1); ax.set_ylabel("Dice (test)"); ax.set_title(title); ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
