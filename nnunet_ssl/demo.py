"""``nnunet-ssl demo``: the benchmark's pipeline, once, on a generated phantom dataset (or an existing dataset).

phantom -> ``nnunet-ssl benchmark`` with methods scratch and spade, one labelled-set size and one seed: plan +
preprocess the pool, Spade pretraining on all pool images, fine-tuning on k labelled pool cases from scratch and
from the pretrained weights (same trainer, same budget), nnUNetv2_predict on the held-out test cases, nnU-Net's
evaluation -> Dice table + plot. There is no second copy of that pipeline here: the demo is a benchmark run with the
``demo`` budget (``--quick``: the ``quick`` budget).

Test cases never enter pretraining or fine-tuning. Everything is written under ``--work-dir`` (its own
nnUNet_raw link folder, nnUNet_preprocessed and nnUNet_results), so an existing nnU-Net installation is only read.
Finished steps are skipped when the demo is run again with the same work dir.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

PHANTOM_ID = 990
PHANTOM_NAME = "SSLPhantom"
METHODS = ("scratch", "spade")

# --quick: the same pipeline at smoke scale (about two minutes on a 2-core CPU; numbers are meaningless)
QUICK = dict(budget="quick", num_train=10, num_test=3, labeled=3, phantom_shape=(32, 32, 32))


def _log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)


def run_demo(work_dir: str = "nnunet_ssl_demo", dataset: Optional[int] = None, labeled: int = 5,
             device: str = "cpu", configuration: str = "3d_fullres", budget: str = "demo", num_train: int = 40,
             num_test: int = 10, seed: int = 0, num_processes: int = 2, phantom_shape=(40, 40, 40)) -> Dict:
    from nnunet_ssl.benchmark import Settings, run_benchmark
    t0 = time.time()
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        from nnunet_ssl.phantom import make_phantom_dataset
        raw = work / "phantom_raw"
        ds_dir = raw / f"Dataset{PHANTOM_ID:03d}_{PHANTOM_NAME}"
        if not (ds_dir / "dataset.json").exists():
            _log(f"generating phantom dataset: {num_train} pool + {num_test} test cases -> {ds_dir}", t0)
            make_phantom_dataset(raw, PHANTOM_ID, PHANTOM_NAME, num_train=num_train, num_test=num_test,
                                 shape=phantom_shape, seed=seed)
        os.environ["nnUNet_raw"] = str(raw)
        dataset = PHANTOM_ID
    elif not os.environ.get("nnUNet_raw"):
        raise SystemExit("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (the folder with "
                         "DatasetXXX_Name) to run the demo on an existing dataset")
    from nnunet_ssl.benchmark import find_raw_dataset
    ds_dir = find_raw_dataset(str(dataset))
    # the dataset's labelled imagesTs is the test set where it has one, else a seeded hold-out of imagesTr
    has_test = (ds_dir / "imagesTs").is_dir() and (ds_dir / "labelsTs").is_dir()
    settings = Settings(dataset=str(dataset), work_dir=str(work), methods=METHODS, labeled=(labeled,), seeds=(seed,),
                        budget=budget, device=device, configuration=configuration,
                        test_raw=str(ds_dir) if has_test else None, split_seed=seed, num_processes=num_processes)
    rows = run_benchmark(settings)
    split = json.loads((work / "split.json").read_text())
    from nnunet_ssl.benchmark import labelled_cases, BUDGETS
    labeled_cases, _ = labelled_cases(split["pool"], seed, labeled, BUDGETS[budget].num_val)
    dataset_json = json.loads((ds_dir / "dataset.json").read_text())
    label_names = {str(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    results = {r["method"]: {"mean": r["mean_dice"], "num_cases": r["num_test"],
                             "per_class": {k[5:]: v for k, v in r.items() if k.startswith("dice_")},
                             "pretrain_s": r["pretrain_s"], "finetune_s": r["finetune_s"]} for r in rows}
    report = {"dataset": ds_dir.name, "configuration": configuration, "budget": budget, "labeled": labeled,
              "labeled_cases": labeled_cases, "test_cases": split["test"], "pool": split["pool"],
              "pretrain_trainer": next(r["pretrain_trainer"] for r in rows if r["method"] == "spade"),
              "finetune_trainer": rows[0]["finetune_trainer"], "device": device, "precision": rows[0]["precision"],
              "results": results, "wall_time_s": round(time.time() - t0, 1)}
    table = format_table(results, label_names)
    (work / "demo_results.json").write_text(json.dumps(report, indent=1))
    (work / "demo_results.md").write_text(table + "\n")
    plot_results(results, label_names, work / "demo_results.png",
                 f"{ds_dir.name}: {labeled} labelled cases, {len(split['test'])} test cases")
    print(f"\nTest-set Dice (nnU-Net evaluation, {len(split['test'])} held-out cases, {labeled} labelled for "
          f"fine-tuning):")
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
