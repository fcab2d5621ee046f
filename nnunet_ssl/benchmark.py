"""``nnunet-ssl benchmark``: label efficiency of the pretraining methods on a labelled nnU-Net raw dataset.

Protocol (fixed by seeds, every step through nnU-Net's own commands):

1. split the dataset's cases into a *pool* and a *test* set (``--test-fraction`` of the cases, seeded by
   ``--split-seed``; with ``--test-raw`` the test set is a separate labelled folder and every case is pool). Only
   pool cases are linked into the benchmark's own ``nnUNet_raw``, so test cases are never preprocessed, pretrained
   on, fine-tuned on or used for any selection;
2. pretrain each method once on all pool images (labels unused);
3. for every seed and every k in ``--labeled``: fine-tune on k labelled pool cases (the first k of the seed's
   permutation of the pool, so the k=5 cases are part of the k=20 cases), with the same fine-tuning trainer and
   budget for every method; ``scratch`` is the identical run without pretrained weights, ``scratch_long`` the
   same from scratch for as many iterations as pretraining + fine-tuning;
4. predict the test cases with ``nnUNetv2_predict`` (checkpoint_final, no TTA) and score them with nnU-Net's
   evaluation (Dice per class and mean).

Every finished piece (preprocessing, a pretraining, a fine-tuning, a prediction, a scored cell) is kept in the
work dir, so an interrupted benchmark continues where it stopped; interrupted trainings continue with ``--c``.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ssl import pipeline

def _methods() -> Dict[str, Optional[str]]:
    """method -> pretraining trainer (base name; the budget's suffix is appended), None for the from-scratch rows.
    Pretraining methods are the registered trainers that declare ``benchmark_name`` themselves (not inherited)."""
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS
    rows: Dict[str, Optional[str]] = {"scratch": None, "scratch_long": None, "stock": None}
    for name, cls in PRETRAINING_TRAINERS.items():
        if "benchmark_name" in vars(cls) and cls.benchmark_name:
            rows[cls.benchmark_name] = name
    return rows


METHODS = _methods()
PRECISIONS = ("auto", "fp32", "bf16")
# the headline protocol: paired comparisons at k = 2, 5, 10 over 5 seeds
DEFAULT_METHODS = ("scratch", "scratch_long", "stock", "simclr", "recon", "spade", "spade_queue", "spade_soft",
                   "spade_recon")
DEFAULT_LABELED = (2, 5, 10)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Budget:
    """Trainers and plans of one benchmark scale. Iteration counts live in the trainer classes."""
    name: str
    planner: str
    plans: str
    pretrain_suffix: str        # appended to the method's pretraining trainer (its budget preset)
    finetune_trainer: str
    finetune_long_trainer: str  # scratch_long: iterations = pretraining + fine-tuning
    finetune_pretrained_trainer: str  # pretrained starts: their recipe, as many iterations as finetune_trainer
    stock_trainer: str = "nnUNetTrainerWallClock"  # stock nnU-Net for the training time of the scratch run
    max_test: Optional[int] = None  # cap on scored test cases (quick only)
    num_val: int = 3            # pool cases nnU-Net validates on during fine-tuning (monitoring only)


BUDGETS = {
    # standard nnU-Net plans and schedules (GPU)
    "gpu": Budget("gpu", "ExperimentPlanner", "nnUNetPlans", "", "nnUNetTrainerFinetune",
                  "nnUNetTrainerFinetune_long", "nnUNetTrainerPretrainedFinetune"),
    # small network (nnUNetPlannerCPUWide: 8-64 features, batch 2, patch <= 50k voxels, nnU-Net's topology rules),
    # fixed iterations: pretraining 1000, fine-tuning 3000 (where scratch is near convergence: 4000 vs 3000 +0.003
    # Dice on pool validation, 5 seeds), scratch_long 4000. (4-32 features lost a class in a third of its runs; 8-64 learned
    # both classes in every pool-validation run, BENCHMARKS.md.) Pretrained starts: the best recipe measured on pool
    # validation cases so far, which is the from-scratch one (peak lr 1e-2; 1e-3 with 10 % warm-up learned too slowly)
    "cpu": Budget("cpu", "nnUNetPlannerCPUWide", "nnUNetPlansCPUWide", "_cpu", "nnUNetTrainerFinetune_cpu_120ep",
                  "nnUNetTrainerFinetune_cpu_160ep", "nnUNetTrainerFinetune_cpu_120ep"),
    # nnunet-ssl demo on its phantom (40 pool cases of 40^3): nnUNetPlannerSmall (8-64 features, patch 40^3),
    # pretraining 1000 iterations, fine-tuning 1000 (scratch_long 2000)
    "demo": Budget("demo", "nnUNetPlannerSmall", "nnUNetPlansSmall", "_cpu", "nnUNetTrainerFinetune_cpu",
                   "nnUNetTrainerFinetune_cpu_80ep", "nnUNetTrainerFinetune_cpu"),
    # smoke scale: checks the whole protocol end to end in minutes; its numbers mean nothing
    "quick": Budget("quick", "nnUNetPlannerTiny", "nnUNetPlansTiny", "_smoke", "nnUNetTrainerFinetune_smoke",
                    "nnUNetTrainerFinetune_smoke_long", "nnUNetTrainerPretrainedFinetune_smoke", max_test=10,
                    num_val=2),
}

CSV_FIELDS = ["method", "variant", "labeled", "seed", "precision", "budget", "plans", "dataset", "pretrain_trainer",
              "finetune_trainer", "pretrain_iterations", "finetune_iterations", "total_iterations", "num_test",
              "mean_dice", "pretrain_s", "finetune_s", "predict_s"]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


INVESTIGATION_TRAINERS = Path(__file__).resolve().parents[1] / "benchmarks" / "investigation"


def trainer_class(name: str):
    """A plugin trainer, or one nnU-Net finds (its own, or in a folder of nnUNet_extTrainer, e.g. the repository's
    benchmarks/investigation variants)."""
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS
    known = {**PRETRAINING_TRAINERS, **SEGMENTATION_TRAINERS}
    if name in known:
        return known[name]
    import contextlib
    import io
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise SystemExit(f"unknown trainer {name!r}: neither a plugin trainer ({', '.join(known)}) nor found by "
                         f"nnU-Net; investigation variants need nnUNet_extTrainer={INVESTIGATION_TRAINERS}") from None


def iterations(trainer: str) -> int:
    cls = trainer_class(trainer)
    return int(cls.num_epochs) * int(cls.num_iterations_per_epoch)


def trainer_settings(trainer: str) -> Dict[str, str]:
    """What a trainer declares as class attributes (its own and its bases' outside nnU-Net, which sets its own in
    ``__init__``), as reprs: two runs of one trainer name are comparable only while these agree."""
    if not trainer:
        return {}
    out: Dict[str, str] = {}
    for klass in reversed(trainer_class(trainer).__mro__):
        if klass.__module__.split(".")[0] in ("nnunetv2", "builtins"):
            continue
        out.update({k: repr(v) for k, v in vars(klass).items() if not k.startswith("_")
                    and isinstance(v, (int, float, str, bool, tuple, dict, type(None)))})
    return out


# class attributes that change what is logged, plotted or saved when, or how a step is computed with the same
# numbers (memory layout, compilation: tests/test_cpu_fast.py; the nearest-voxel search:
# tests/test_core_correspondence.py), never what is trained; and instance slots that classes declare as None
NOT_TRAINING_SETTINGS = frozenset({"benchmark_name", "logged_terms", "progress_plot_every", "save_every",
                                   "host_only_batch_keys", "cpu_channels_last", "cpu_compile", "cpu_channels_last_norm",
                                   "local_match_search",
                                   "global_queue", "queue", "step_generator"})


def changed_settings(recorded: Dict[str, str], now: Dict[str, str]) -> str:
    """The training settings both records hold with different values, as 'name recorded -> now'. A setting added
    since the record keeps the behaviour the record ran with (a new option's default is off), so it is no change."""
    return ", ".join(f"{k} {recorded[k]} -> {now[k]}" for k in sorted(set(recorded) & set(now) - NOT_TRAINING_SETTINGS)
                     if recorded[k] != now[k])


def check_reused_pretraining(checkpoint: Path, trainer: str, record: dict, settings: Dict[str, str]) -> None:
    """A pretraining kept in the work dir must come from the trainer as it is declared now (a changed default,
    e.g. a queue switched on, would otherwise hand over a checkpoint of the old method under the same name).
    ``record``: its pretrain_time.json, whose "settings" are the trainer's at pretraining time; a run from before
    that record is checked against the ``ssl_method`` of its checkpoint (the engine's and budget's settings).
    ``settings``: the trainer's settings now (``trainer_settings(trainer)``)."""
    recorded = record.get("settings")
    if recorded is None:
        import torch
        recorded = {k: v for k, v in (torch.load(checkpoint, map_location="cpu", weights_only=False)
                                      .get("ssl_method") or {}).items() if k != "trainer"}
    changed = changed_settings(recorded, settings)
    if changed:
        raise SystemExit(f"{checkpoint} was pretrained by {trainer} with other settings than it declares now "
                         f"({changed}): delete {checkpoint.parent} to pretrain again, or use another --work-dir")


def pretrain_trainer_of(method: str, budget: Budget, overrides: Optional[Dict[str, str]] = None) -> str:
    """The method's pretraining trainer: an override (``--pretrain-trainer M=T``) or its base name + budget suffix."""
    if not METHODS[method]:
        return ""
    return (overrides or {}).get(method) or METHODS[method] + budget.pretrain_suffix


def finetune_trainer_of(method: str, budget: Budget, finetune_trainer: Optional[str] = None,
                        pretrained_finetune_trainer: Optional[str] = None) -> str:
    """Fine-tuning trainer of a method's cells: from-scratch recipe (``scratch``), pretrained-start recipe (every
    pretraining method), the long from-scratch run (``scratch_long``) or stock nnU-Net (``stock``)."""
    if method == "scratch_long":
        return budget.finetune_long_trainer
    if method == "stock":
        return budget.stock_trainer
    if METHODS[method]:
        return pretrained_finetune_trainer or budget.finetune_pretrained_trainer
    return finetune_trainer or budget.finetune_trainer


def check_budget(budget: Budget, methods: Sequence[str], finetune_trainer: Optional[str] = None,
                 pretrain_trainers: Optional[Dict[str, str]] = None,
                 pretrained_finetune_trainer: Optional[str] = None) -> Dict[str, int]:
    """Iterations of every trainer of the run; pretrained starts fine-tune as long as ``scratch``, and
    scratch_long runs as long as pretraining + fine-tuning."""
    ft = iterations(finetune_trainer or budget.finetune_trainer)
    pre = {m: iterations(pretrain_trainer_of(m, budget, pretrain_trainers)) for m in methods if METHODS[m]}
    its = {"finetune": ft, **{f"pretrain_{m}": n for m, n in pre.items()}}
    if pre:
        ft_pre_trainer = pretrained_finetune_trainer or budget.finetune_pretrained_trainer
        ft_pre = iterations(ft_pre_trainer)
        if ft_pre != ft:
            raise SystemExit(f"budget {budget.name!r}: pretrained starts fine-tune {ft_pre} iterations "
                             f"({ft_pre_trainer}) but scratch {ft}; the comparison needs equal fine-tuning lengths")
    if "scratch_long" in methods:
        long = iterations(budget.finetune_long_trainer)
        want = sorted({ft + n for n in pre.values()} or {long})
        if want != [long]:
            raise SystemExit(f"budget {budget.name!r}: {budget.finetune_long_trainer} runs {long} iterations but "
                             f"pretraining + fine-tuning run {want}; give scratch_long a matching trainer (or leave "
                             f"scratch_long out of --methods when trainers are overridden)")
        its["finetune_long"] = long
    if "stock" in methods and "scratch" not in methods:
        raise SystemExit("--methods: 'stock' trains for the time its 'scratch' cell took; add 'scratch'")
    return its


def cell_variant(method: str, finetune_trainer: Optional[str], pretrain_trainers: Dict[str, str],
                 pretrained_finetune_trainer: Optional[str] = None) -> str:
    """'' for the budget's own trainers, else the overriding trainer names (part of the cell's name)."""
    parts = []
    if METHODS[method] and method in pretrain_trainers:
        parts.append(pretrain_trainers[method])
    if METHODS[method] and pretrained_finetune_trainer:
        parts.append(pretrained_finetune_trainer)
    if method == "scratch" and finetune_trainer:
        parts.append(finetune_trainer)
    return "+".join(parts)


def display_name(row: dict) -> str:
    return f"{row['method']} [{row['variant']}]" if row.get("variant") else row["method"]


def _order(row: dict) -> Tuple:
    return (*_setup(row), list(METHODS).index(row["method"]), row.get("variant", ""))


# ---------------------------------------------------------------------------------------------- data
def find_raw_dataset(dataset: str) -> Path:
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise SystemExit("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (the folder holding "
                         "DatasetXXX_Name)")
    raw = Path(raw)
    pattern = f"Dataset{int(dataset):03d}_*" if str(dataset).isdigit() else str(dataset)
    matches = sorted(p for p in raw.glob(pattern) if (p / "dataset.json").exists())
    if not matches:
        raise SystemExit(f"dataset {dataset} not found in nnUNet_raw={raw}: expected a folder {pattern} with a "
                         f"dataset.json")
    return matches[0]


def _test_folders(test_raw: Path) -> Tuple[Path, Path]:
    for im, lb in (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr")):
        if (test_raw / im).is_dir() and (test_raw / lb).is_dir():
            return test_raw / im, test_raw / lb
    raise SystemExit(f"--test-raw {test_raw}: expected imagesTs/ + labelsTs/ (or imagesTr/ + labelsTr/) inside")


def prepare_data(work: Path, src: Path, test_raw: Optional[Path], split_seed: int, test_fraction: float,
                 max_test: Optional[int]) -> dict:
    """Pool-only raw dataset + linked test cases in the work dir; the split is fixed once per work dir."""
    dataset_json = json.loads((src / "dataset.json").read_text())
    fe, n_ch = dataset_json["file_ending"], len(dataset_json["channel_names"])
    cases = pipeline.case_ids(src / "imagesTr", fe)
    if not cases:
        raise SystemExit(f"{src / 'imagesTr'} holds no images named CASE_0000{fe}")
    if test_raw is not None:
        test_images, test_labels = _test_folders(Path(test_raw))
        pool, test = cases, pipeline.case_ids(test_images, fe)
        if not test:
            raise SystemExit(f"--test-raw: {test_images} holds no images named CASE_0000{fe}")
    else:
        test_images, test_labels = src / "imagesTr", src / "labelsTr"
        rng = random.Random(split_seed)
        test = sorted(rng.sample(cases, max(1, round(test_fraction * len(cases)))))
        pool = [c for c in cases if c not in set(test)]
    if max_test is not None:
        test = test[:max_test]
    split = {"dataset": src.name, "pool": pool, "test": test, "split_seed": split_seed,
             "test_source": str(Path(test_raw).resolve()) if test_raw else "hold-out of imagesTr"}
    split_file = work / "split.json"
    if split_file.exists():
        old = json.loads(split_file.read_text())
        if old != split:
            raise SystemExit(f"{work} holds a benchmark with another dataset/split (different --split-seed, "
                             f"--test-fraction, --test-raw or budget); use a new --work-dir")
    raw_ds = work / "nnUNet_raw" / src.name
    if not (raw_ds / "dataset.json").exists() or not split_file.exists():
        pipeline.link_cases(pool, src / "imagesTr", src / "labelsTr", raw_ds / "imagesTr", raw_ds / "labelsTr", fe,
                            n_ch)
        pipeline.link_cases(test, test_images, test_labels, work / "test" / "images", work / "test" / "labels", fe,
                            n_ch)
        (raw_ds / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(pool)}, indent=1))
        split_file.write_text(json.dumps(split, indent=1))
    return {**split, "raw_dataset": raw_ds, "dataset_json": dataset_json}


def fold_of(work: Path, seed: int, k: int) -> int:
    """Stable fold number per (seed, k) (0 is pretraining); new combinations are appended."""
    path = work / "folds.json"
    folds = json.loads(path.read_text()) if path.exists() else []
    key = [seed, k]
    if key not in folds:
        folds.append(key)
        path.write_text(json.dumps(folds))
    return folds.index(key) + 1


def write_splits(work: Path, preprocessed_ds: Path, pool: List[str], num_val: int) -> None:
    """splits_final.json: fold 0 pretrains on the whole pool; fold i fine-tunes on k cases of seed s."""
    folds = json.loads((work / "folds.json").read_text()) if (work / "folds.json").exists() else []
    entries = [{"train": sorted(pool), "val": sorted(random.Random(0).sample(pool, min(num_val, len(pool))))}]
    for seed, k in folds:
        labeled, val = labelled_cases(pool, seed, k, num_val)
        entries.append({"train": labeled, "val": val})
    pipeline.write_splits(preprocessed_ds, entries)


def labelled_cases(pool: List[str], seed: int, k: int, num_val: int) -> Tuple[List[str], List[str]]:
    """First k of the seed's permutation of the pool (nested in k); validation: the permutation's last cases."""
    if k + num_val > len(pool):
        raise SystemExit(f"the pool has {len(pool)} cases: too few for {k} labelled + {num_val} validation cases")
    perm = random.Random(1000 + seed).sample(pool, len(pool))
    return sorted(perm[:k]), sorted(perm[-num_val:])


# ---------------------------------------------------------------------------------------------- runs
def _precision_env(precision: str) -> Dict[str, str]:
    return {} if precision == "auto" else {"NNUNET_SSL_CPU_BF16": "1" if precision == "bf16" else "0"}


def resolved_precision(precision: str, device: str) -> str:
    """What 'auto' means on this machine: bf16 on a CPU with native bf16, else fp32 (AMP on CUDA)."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "amp"
    try:
        from nnunet_ssl.nnunet.cpu_fast import cpu_supports_bf16
    except ImportError:
        return "fp32"
    return "bf16" if device == "cpu" and cpu_supports_bf16() else "fp32"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@dataclass
class Settings:
    dataset: str
    work_dir: str
    methods: Tuple[str, ...]
    labeled: Tuple[int, ...]
    seeds: Tuple[int, ...]
    budget: str
    precision: str = "auto"
    device: str = "cpu"
    configuration: str = "3d_fullres"
    test_raw: Optional[str] = None
    test_fraction: float = 0.25
    split_seed: int = 0
    num_processes: int = 2
    finetune_trainer: Optional[str] = None              # instead of the budget's (investigations)
    planner: Optional[str] = None                       # instead of the budget's (its plans name follows)
    pretrained_finetune_trainer: Optional[str] = None   # instead of the budget's, for pretrained starts
    cells_dir: Optional[str] = None                     # finished cells (default WORK/cells); may be in a repository
    jobs: int = 1                                       # cells trained side by side
    prepare_only: bool = False                          # stop after the split (e.g. to tune on the pool's raw folder)
    report_only: bool = False                           # rewrite results.* from the kept cells, train nothing
    pretrain_trainers: Tuple[Tuple[str, str], ...] = ()  # (method, trainer) instead of the budget's


def cells_dir_of(s: "Settings") -> Path:
    d = Path(s.cells_dir).resolve() if s.cells_dir else Path(s.work_dir).resolve() / "cells"
    d.mkdir(parents=True, exist_ok=True)
    return d


def finished_run(checkpoint: Path, trainer: str) -> Tuple[int, float]:
    """(iterations, training seconds) of a finished run, from one read of its checkpoint_final: iterations are the
    class budget, or for a wall-clock trainer the epochs it ran (nnU-Net stores the number of finished epochs in
    checkpoint_final's current_epoch); seconds are the sum of its epochs' durations in nnU-Net's log."""
    import torch

    from nnunet_ssl.trainers.stock import nnUNetTrainerWallClock, training_seconds
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cls = trainer_class(trainer)
    its = int(ckpt["current_epoch"]) * int(cls.num_iterations_per_epoch) \
        if issubclass(cls, nnUNetTrainerWallClock) else iterations(trainer)
    return its, training_seconds(ckpt["logging"])


def with_planner(budget: Budget, planner: Optional[str]) -> Budget:
    """The budget with another planner (and that planner's plans name), e.g. a wider network."""
    if not planner:
        return budget
    from dataclasses import replace

    from nnunet_ssl.nnunet.planning import find_planner
    try:
        cls = find_planner(planner)
    except ValueError as e:
        raise SystemExit(f"--planner: {e}")
    return replace(budget, planner=planner, plans=getattr(cls, "default_plans_name", "nnUNetPlans"))


def run_benchmark(s: Settings) -> List[dict]:
    t_start = time.time()
    budget = with_planner(BUDGETS[s.budget], s.planner)
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if s.precision not in PRECISIONS:
        raise SystemExit(f"--precision must be one of {', '.join(PRECISIONS)}")
    overrides = dict(s.pretrain_trainers)
    for m, t in overrides.items():
        if m not in METHODS or not METHODS[m]:
            raise SystemExit(f"--pretrain-trainer {m}={t}: {m!r} is not a pretraining method; choose from "
                             f"{', '.join(k for k, v in METHODS.items() if v)}")
        trainer_class(t)
    for t in (s.finetune_trainer, s.pretrained_finetune_trainer):
        if t:
            trainer_class(t)
    its = check_budget(budget, s.methods, s.finetune_trainer, overrides, s.pretrained_finetune_trainer)
    work = Path(s.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = find_raw_dataset(s.dataset)
    data = prepare_data(work, src, Path(s.test_raw) if s.test_raw else None, s.split_seed, s.test_fraction,
                        budget.max_test)
    pool, test, ds_name = data["pool"], data["test"], src.name
    if s.prepare_only:
        _log(f"split written: {len(pool)} pool cases in {data['raw_dataset']}, {len(test)} test cases in "
             f"{work / 'test'}; nothing trained (--prepare-only)")
        return []
    # cells kept outside the work dir (--cells-dir) must come from the same split: its fingerprint is in every cell
    import hashlib
    split_id = hashlib.sha1(json.dumps([ds_name, sorted(pool), sorted(test)]).encode()).hexdigest()[:12]
    if s.report_only:
        cells_dir = cells_dir_of(s)
        files = sorted(cells_dir.glob("*.json"))
        if not files:
            raise SystemExit(f"--report-only: no finished cells in {cells_dir}; run the benchmark (or name the "
                             f"folder that keeps them with --cells-dir)")
        rows = [json.loads(f.read_text()) for f in files]
        for f, row in zip(files, rows):
            check_split(f, row, split_id)
        write_reports(work, data["dataset_json"], s, rows)
        _log(f"{len(rows)} kept cells of {cells_dir} reported in {work / 'results.md'}, "
             f"{work / 'results.csv'}, {work / 'results.png'}; nothing trained (--report-only)")
        return rows
    dataset_id = ds_name[len("Dataset"):len("Dataset") + 3]
    precision = resolved_precision(s.precision, s.device)
    _log(f"benchmark on {ds_name}: pool {len(pool)} cases (pretraining; labelled subsets drawn from it), "
         f"test {len(test)} cases (scored only); budget {budget.name}, precision {precision}, device {s.device}")
    _log("iterations: " + ", ".join(f"{k} {v}" for k, v in its.items()))

    raw, preprocessed = work / "nnUNet_raw", work / "nnUNet_preprocessed"
    preprocessed.mkdir(exist_ok=True)
    pre_ds = preprocessed / ds_name
    if not (pre_ds / f"{budget.plans}_{s.configuration}").is_dir() or not (pre_ds / f"{budget.plans}.json").exists():
        _log(f"planning ({budget.planner}) + preprocessing {s.configuration} of the pool "
             f"(log: {work / 'logs' / 'plan.log'})")
        import contextlib
        os.environ.update({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed)})
        from nnunet_ssl.nnunet.planning import plan_and_preprocess
        (work / "logs").mkdir(exist_ok=True)
        with open(work / "logs" / "plan.log", "w") as log, contextlib.redirect_stdout(log):
            plans_id = plan_and_preprocess(int(dataset_id), budget.planner, [s.configuration], s.num_processes)
        if plans_id != budget.plans:
            raise SystemExit(f"planner {budget.planner} wrote plans {plans_id!r}, expected {budget.plans!r}")

    # METHODS order: a scratch cell always comes before the stock cell that needs its training time
    methods = sorted(dict.fromkeys(s.methods), key=list(METHODS).index)
    cells = [(seed, k, m) for seed in s.seeds for k in sorted(s.labeled) for m in methods]
    for seed, k, _ in cells:
        fold_of(work, seed, k)
    write_splits(work, pre_ds, pool, budget.num_val)
    # a cell's identity: the budget (+ an explicit precision, + a planner override). With --precision auto the same
    # command continues on any CPU, with or without bf16 (each cell records the precision it ran in)
    tag = budget.name + (f"_{s.precision}" if s.precision != "auto" else "") + (f"_{budget.plans}" if s.planner else "")
    da = os.environ.get("nnUNet_n_proc_DA", "0" if s.device == "cpu" else "8")
    # the models are scored on the test set by nnUNetv2_predict; nnU-Net's final validation of the few monitoring
    # cases would only add ~10 s per cell
    env_extra = {"nnUNet_n_proc_DA": da, "NNUNET_SSL_SKIP_FINAL_VALIDATION": "1", **_precision_env(s.precision)}
    env = lambda results: pipeline.nnunet_env(raw, preprocessed, results, env_extra)  # noqa: E731
    cell_dir = cells_dir_of(s)
    jobs = max(1, int(s.jobs))
    if jobs > 1:
        # cells run side by side: each training gets its share of the cores (nnUNetv2_train would take them all,
        # see cpu_fast.apply_thread_limit), and one cell's data loading overlaps the other's compute
        share = str(max(1, (os.cpu_count() or 1) // jobs))
        env_extra.setdefault("OMP_NUM_THREADS", share)
        env_extra.setdefault("NNUNET_SSL_NUM_THREADS", share)
    pretrain_locks = {m: threading.Lock() for m in s.methods}
    scratch_done = {(seed, k): threading.Event() for seed, k, _ in cells}
    if "scratch" not in s.methods:
        for e in scratch_done.values():
            e.set()
    report_lock = threading.Lock()

    def run_cell(i: int, seed: int, k: int, method: str) -> dict:
        try:
            return _cell(i, seed, k, method)
        finally:
            if method == "scratch":
                scratch_done[(seed, k)].set()

    def _cell(i: int, seed: int, k: int, method: str) -> dict:
        variant = cell_variant(method, s.finetune_trainer, overrides, s.pretrained_finetune_trainer)
        name = f"{method}@{variant}" if variant else method  # folders, logs and cell files of this cell
        cell_file = cell_dir / f"{tag}__{name}__k{k}__s{seed}.json"
        label = f"[{i}/{len(cells)}] {name} k={k} seed={seed}"
        if cell_file.exists():
            row = json.loads(cell_file.read_text())
            check_split(cell_file, row, split_id)
            want = (pretrain_trainer_of(method, budget, overrides),
                    finetune_trainer_of(method, budget, s.finetune_trainer, s.pretrained_finetune_trainer))
            if (row["pretrain_trainer"], row["finetune_trainer"]) != want:
                raise SystemExit(f"{cell_file} was trained with {row['pretrain_trainer'] or 'no pretraining'} + "
                                 f"{row['finetune_trainer']}, this run would use {want[0] or 'no pretraining'} + "
                                 f"{want[1]} (the budget changed?): move the cell away or use another --cells-dir")
            # same trainer names, other lengths: a trainer's budget was changed since the cell was scored (stock's
            # iterations follow the wall clock)
            lengths = {"pretrained": (row.get("pretrain_iterations"), want[0])}
            if method != "stock":
                lengths["fine-tuned"] = (row.get("finetune_iterations"), want[1])
            for done, (had, trainer) in lengths.items():
                now = iterations(trainer) if trainer else 0
                if had is not None and had != now:
                    raise SystemExit(f"{cell_file} {done} {had} iterations, {trainer} now runs {now}: move the cell "
                                     f"away or use another --cells-dir")
            # same names and lengths, other settings (cells from before this record carry none)
            for key, trainer in zip(("pretrain_settings", "finetune_settings"), want):
                changed = changed_settings(row.get(key) or {}, trainer_settings(trainer))
                if changed:
                    raise SystemExit(f"{cell_file} was scored with {trainer} declaring other settings than now "
                                     f"({changed}): move the cell away or use another --cells-dir")
            _log(f"{label}: done before (mean Dice {row['mean_dice']:.4f})")
            return row
        times = {"pretrain_s": 0.0, "finetune_s": 0.0, "predict_s": 0.0}
        weights, pre_trainer, pre_record, pre_settings = None, "", {}, {}
        if METHODS[method]:
            pre_trainer = pretrain_trainer_of(method, budget, overrides)
            pre_results = work / "results" / tag / "pretrain"
            pre_out = pre_results / ds_name / f"{pre_trainer}__{budget.plans}__{s.configuration}" / "fold_0"
            weights = pre_out / "checkpoint_final.pth"
            times_file = pre_out.parent / "pretrain_time.json"
            pre_settings = trainer_settings(pre_trainer)
            with pretrain_locks[method]:  # one pretraining per method, however many cells wait for it
                if weights.exists():
                    pre_record = json.loads(times_file.read_text()) if times_file.exists() else {}
                    check_reused_pretraining(weights, pre_trainer, pre_record, pre_settings)
                else:
                    _log(f"{label}: pretraining {pre_trainer} on {len(pool)} pool images")
                    took = pipeline.train(dataset_id, s.configuration, 0, pre_trainer, budget.plans,
                                          env(pre_results), work / "logs" / tag / f"pretrain_{method}.log",
                                          f"pretrain {method}", s.device, output_folder=pre_out)
                    # run: an id of this pretraining, which its fine-tunings record (a pretraining done again after
                    # a refusal must not hand its name to fine-tunings of the old one)
                    pre_record = {"pretrain_s": round(took, 1), "settings": pre_settings, "run": uuid.uuid4().hex}
                    _atomic_json(times_file, pre_record)
            times["pretrain_s"] = pre_record.get("pretrain_s", 0.0)
        ft_trainer = finetune_trainer_of(method, budget, s.finetune_trainer, s.pretrained_finetune_trainer)
        results = work / "results" / tag / name
        ft_env = env(results)
        if method == "stock":  # stock nnU-Net gets the training time of the scratch run with the same cases
            from nnunet_ssl.trainers import stock
            scratch_done[(seed, k)].wait()
            ref = cell_dir / f"{tag}__scratch__k{k}__s{seed}.json"
            ref_s = json.loads(ref.read_text()).get("train_s") if ref.exists() else None
            if not ref_s:
                raise SystemExit(f"{label}: needs the training time of {ref.name}, which is missing; run 'scratch' "
                                 f"for this k and seed first (same --work-dir)")
            ft_env[stock.WALL_SECONDS] = str(ref_s)
        fold = fold_of(work, seed, k)
        ft_out = results / ds_name / f"{ft_trainer}__{budget.plans}__{s.configuration}" / f"fold_{fold}"
        ft_time_file = ft_out / "finetune_time.json"
        ft_settings = trainer_settings(ft_trainer)
        pretrained_from = pre_record.get("run") if weights else None
        if (ft_out / "checkpoint_final.pth").exists():  # a kept fine-tuning: of the trainer as declared now, from
            kept = json.loads(ft_time_file.read_text()) if ft_time_file.exists() else {}  # this pretraining?
            changed = changed_settings(kept.get("settings", {}), ft_settings)
            if changed:
                raise SystemExit(f"{ft_out} was fine-tuned by {ft_trainer} with other settings than it declares "
                                 f"now ({changed}): delete that folder to fine-tune again, or use another --work-dir")
            if kept.get("pretrained_from") and kept["pretrained_from"] != pretrained_from:
                raise SystemExit(f"{ft_out} was fine-tuned from an earlier pretraining of {pre_trainer} than the one in "
                                 f"{weights.parent}: delete that folder to fine-tune again, or use another --work-dir")
        else:
            _log(f"{label}: fine-tuning {ft_trainer} on {k} labelled cases"
                 + (f" from {pre_trainer}" if weights else " from scratch"))
            took = pipeline.train(dataset_id, s.configuration, fold, ft_trainer, budget.plans, ft_env,
                                  work / "logs" / tag / f"ft_{name}_k{k}_s{seed}.log", f"{name} k={k} s={seed}",
                                  s.device, weights, output_folder=ft_out)
            _atomic_json(ft_time_file, {"finetune_s": round(took, 1), "settings": ft_settings,
                                        "pretrained_from": pretrained_from})
        # wall time of the (last) fine-tuning invocation; 0 where a run from before this record was reused
        times["finetune_s"] = json.loads(ft_time_file.read_text())["finetune_s"] if ft_time_file.exists() else 0.0
        pred = work / "predictions" / tag / f"{name}_k{k}_s{seed}"
        shutil.rmtree(pred, ignore_errors=True)  # a prediction is cheap: never trust a partial folder
        _log(f"{label}: predicting {len(test)} test cases")
        times["predict_s"] = round(pipeline.predict(
            work / "test" / "images", pred, int(dataset_id), s.configuration, fold, ft_trainer, budget.plans,
            env(results), work / "logs" / tag / f"predict_{name}_k{k}_s{seed}.log", f"predict {name}",
            s.device), 1)
        ft_iterations, ft_seconds = finished_run(ft_out / "checkpoint_final.pth", ft_trainer)
        scores = pipeline.evaluate(work / "test" / "labels", pred, raw / ds_name / "dataset.json",
                                   pre_ds / f"{budget.plans}.json", s.num_processes)
        row = {"method": method, "variant": variant, "labeled": k, "seed": seed, "precision": precision, "setup": tag,
               "split_id": split_id,
               "budget": budget.name, "plans": budget.plans,
               "dataset": ds_name, "pretrain_trainer": pre_trainer, "finetune_trainer": ft_trainer,
               "pretrain_iterations": iterations(pre_trainer) if pre_trainer else 0,
               "finetune_iterations": ft_iterations, "train_s": round(ft_seconds, 1),
               "num_test": scores["num_cases"], "mean_dice": scores["mean"], "per_case": scores["per_case"],
               **{f"dice_{c}": d for c, d in scores["per_class"].items()}, **times}
        row["total_iterations"] = row["pretrain_iterations"] + row["finetune_iterations"]
        row.update(pretrain_settings=pre_settings, finetune_settings=ft_settings)
        _atomic_json(cell_file, row)
        _log(f"{label}: mean Dice {row['mean_dice']:.4f}  ({time.time() - t_start:.0f} s elapsed)")
        with report_lock:
            write_reports(work, data["dataset_json"], s)
        return row

    if jobs == 1:
        rows = [run_cell(i, *c) for i, c in enumerate(cells, 1)]
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as pool_of_jobs:
            futures = [pool_of_jobs.submit(run_cell, i, *c) for i, c in enumerate(cells, 1)]
            rows = [f.result() for f in futures]
    write_reports(work, data["dataset_json"], s)
    _log(f"done in {time.time() - t_start:.0f} s: {work / 'results.md'}, {work / 'results.csv'}, "
         f"{work / 'results.png'}")
    return rows


# ---------------------------------------------------------------------------------------------- reports
def load_rows(cells_dir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(cells_dir).glob("*.json"))]


def check_split(cell_file: Path, row: dict, split_id: str) -> None:
    """A kept cell must have been scored on this run's pool/test split (its fingerprint is in every cell)."""
    if row.get("split_id", split_id) != split_id:
        raise SystemExit(f"{cell_file} was scored on another pool/test split (split {row['split_id']}, this "
                         f"run {split_id}): use another --cells-dir for this dataset or split")


def write_reports(work: Path, dataset_json: dict, s: Settings, rows: Optional[List[dict]] = None) -> None:
    """results.csv/.md/.png of the kept cells (``rows`` where the caller has read them already)."""
    rows = load_rows(cells_dir_of(s)) if rows is None else rows
    if not rows:
        return
    class_cols = sorted({k for r in rows for k in r if k.startswith("dice_")}, key=lambda c: int(c[5:]))
    fields = CSV_FIELDS + ["train_s"] + class_cols
    with open(work / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (*_order(r), r["labeled"], r["seed"])):
            w.writerow(r)
    names = {str(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    (work / "results.md").write_text(markdown_table(rows, class_cols, names))
    plot(rows, work / "results.png", rows[0]["dataset"])


Setup = Tuple[str, str, str]  # (budget, precision or 'auto', plans): cells are compared only within one set-up
REFERENCES = ("scratch", "scratch_long")
FAIL_BELOW = 0.5  # a run "loses a class" when a class scores below this test Dice


def _setup(row: dict) -> Setup:
    if "setup" in row:  # --precision auto: cells of bf16 and fp32 machines belong to one set-up
        explicit = row["setup"].split("_")[1] if row["setup"].split("_")[1:2] in (["fp32"], ["bf16"]) else "auto"
        return row["budget"], explicit, row.get("plans", "")
    return row["budget"], row["precision"], row.get("plans", "")


def _groups(rows: List[dict]) -> Dict[Setup, Dict[str, Dict[int, Dict[int, dict]]]]:
    """set-up -> method [variant] -> k -> seed -> row, methods in METHODS order."""
    out: Dict[Setup, Dict[str, Dict[int, Dict[int, dict]]]] = {}
    for r in sorted(rows, key=_order):
        out.setdefault(_setup(r), {}).setdefault(display_name(r), {}).setdefault(r["labeled"], {})[r["seed"]] = r
    return out


def _fmt_ci(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _span(cells: Dict[int, dict], key: str) -> str:
    """One value of ``key`` over a row's cells, or its range where they differ: ``stock`` trains for the minutes of
    each seed's scratch cell, so its iterations vary with the machine and what else ran on it."""
    values = sorted({int(r[key]) for r in cells.values()})
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _min_class(row: dict) -> float:
    vals = [v for k, v in row.items() if k.startswith("dice_") and v == v]
    return min(vals) if vals else float("nan")


def markdown_table(rows: List[dict], class_cols: List[str], names: Dict[str, str]) -> str:
    from nnunet_ssl.stats import mean_ci, paired_difference
    lines = [f"Test-set Dice on {rows[0]['dataset']} ({rows[0]['num_test']} test cases); nnU-Net's evaluation. "
             f"Dice: mean over seeds and test cases with its 95 % bootstrap CI. Δ: paired difference to the "
             f"reference run with the same seed (same labelled cases) on the same test cases, mean [95 % CI] "
             f"(bootstrap over seeds and test cases), then the number of seeds it wins. 'lost': runs with a class "
             f"below {FAIL_BELOW} Dice.", ""]
    for (budget, prec, plans), methods in _groups(rows).items():
        ran = sorted({r["precision"] for by_k in methods.values() for cells in by_k.values() for r in cells.values()})
        lines += [f"### budget {budget}, precision {prec} (cells ran in {', '.join(ran)})"
                  + (f", plans {plans}" if plans else ""), "",
                  "| method | k | seeds | iterations (pretrain + fine-tune) | Dice | Δ scratch | wins | "
                  "Δ scratch_long | wins | lost |", "|---" * 10 + "|"]
        for method, by_k in methods.items():
            for k in sorted(by_k):
                cells = by_k[k]
                its = f"{_span(cells, 'pretrain_iterations')} + {_span(cells, 'finetune_iterations')}"
                dice = _fmt_ci(*mean_ci(list(cells.values())))
                diffs = []
                for ref in REFERENCES:
                    d = None if method == ref or ref not in methods else \
                        paired_difference(cells, methods[ref].get(k, {}))
                    diffs += [f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", f"{d.wins}/{d.n_seeds}"] if d \
                        else ["–", "–"]
                lost = sum(_min_class(r) < FAIL_BELOW for r in cells.values())
                lines.append(f"| {method} | {k} | {len(cells)} | {its} | {dice} | " + " | ".join(diffs)
                             + f" | {lost}/{len(cells)} |")
        lines.append("")
    lines += ["Per class (mean over seeds):", "",
              "| budget | precision | method | k | " + " | ".join(names.get(c[5:], c[5:]) for c in class_cols) + " |",
              "|---" * (4 + len(class_cols)) + "|"]
    for (budget, prec, _), methods in _groups(rows).items():
        for method, by_k in methods.items():
            for k in sorted(by_k):
                vals = [statistics.mean(r.get(c, float("nan")) for r in by_k[k].values()) for c in class_cols]
                lines.append(f"| {budget} | {prec} | {method} | {k} | " + " | ".join(f"{v:.3f}" for v in vals)
                             + " |")
    pre = {}
    for r in rows:
        if r["pretrain_trainer"]:
            pre[(r["budget"], r["precision"], r["pretrain_trainer"])] = r["pretrain_s"]
    ft = [r["finetune_s"] for r in rows if r["finetune_s"]]
    lines += ["", "Wall times: " + ", ".join(f"pretraining {t} [{b}, {p}] {v:.0f} s" for (b, p, t), v in pre.items())
              + (f"; fine-tuning {min(ft):.0f}–{max(ft):.0f} s per run" if ft else "") + "."]
    return "\n".join(lines) + "\n"


def row_styles(n: int):
    """(colour, line style, marker) for n plot rows, no two alike: matplotlib's default cycle repeats its colours
    after ten rows, so longer tables take tab20's colours and then change line style and marker."""
    import matplotlib
    colors = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    lines, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    for i in range(n):
        j = i // len(colors)
        yield colors[i % len(colors)], lines[j % len(lines)], markers[(j // len(lines) + j) % len(markers)]


def plot(rows: List[dict], path: Path, title: str) -> List[str]:
    """Left: Dice against k with 95 % CI bands; right: paired difference to scratch with its CI band. Returns the
    legend's entries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_ssl.stats import mean_ci, paired_difference
    groups = _groups(rows)
    several = len(groups) > 1
    styles = row_styles(sum(len(methods) for methods in groups.values()))
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (budget, prec, plans), methods in groups.items():
        for method, by_k in methods.items():
            label = f"{method} ({budget}, {prec}, {plans})" if several else method
            ks = sorted(by_k)
            stats = [mean_ci(list(by_k[k].values())) for k in ks]
            color, linestyle, marker = next(styles)
            ax.plot(ks, [m for m, _, _ in stats], marker=marker, linestyle=linestyle, color=color, label=label)
            ax.fill_between(ks, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], color=color, alpha=0.15,
                            linewidth=0)
            if method == "scratch" or "scratch" not in methods:
                continue
            dk = [(k, paired_difference(by_k[k], methods["scratch"].get(k, {}))) for k in ks]
            dk = [(k, d) for k, d in dk if d is not None]
            if dk:
                ax_d.plot([k for k, _ in dk], [d.mean for _, d in dk], marker=marker, linestyle=linestyle,
                          color=color, label=label)
                ax_d.fill_between([k for k, _ in dk], [d.low for _, d in dk], [d.high for _, d in dk],
                                  color=color, alpha=0.15, linewidth=0)
    ks_all = sorted({r["labeled"] for r in rows})
    for a in (ax, ax_d):
        a.set_xscale("log")
        a.set_xticks(ks_all, [str(k) for k in ks_all])
        a.set_xticks([], minor=True)  # the log axis' own minor labels would sit between the k values
        a.set_xlabel("labelled cases for fine-tuning")
    ax.set_ylabel("mean test Dice (95 % CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax_d.axhline(0.0, color="black", linewidth=0.8)
    ax_d.set_ylabel("Dice − scratch, paired (95 % CI)")
    ax_d.set_title("difference to scratch")
    handles, labels = ax.get_legend_handles_labels()  # every row (the difference panel has no 'scratch')
    if handles:
        ax_d.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


def _method_trainer(arg: str) -> Tuple[str, str]:
    method, sep, trainer = arg.partition("=")
    if not sep or not method or not trainer:
        raise SystemExit(f"--pretrain-trainer {arg!r}: expected METHOD=TRAINER, e.g. spade=SpadePretrainTrainer_cpu")
    return method, trainer


def main_benchmark(args) -> int:
    budget = "quick" if args.quick else args.budget
    methods = tuple(args.methods) if args.methods else DEFAULT_METHODS
    labeled = tuple(args.labeled) if args.labeled else ((5,) if args.quick else DEFAULT_LABELED)
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else DEFAULT_SEEDS)
    s = Settings(dataset=str(args.d), work_dir=args.work_dir, methods=methods, labeled=labeled, seeds=seeds,
                 budget=budget, precision=args.precision, device=args.device, configuration=args.c,
                 test_raw=args.test_raw, test_fraction=args.test_fraction, split_seed=args.split_seed,
                 num_processes=args.np, finetune_trainer=args.finetune_trainer, planner=args.planner,
                 pretrained_finetune_trainer=args.pretrained_finetune_trainer, cells_dir=args.cells_dir,
                 jobs=args.jobs, prepare_only=args.prepare_only, report_only=args.report_only,
                 pretrain_trainers=tuple(_method_trainer(a) for a in args.pretrain_trainer or ()))
    if s.prepare_only and s.report_only:
        raise SystemExit("--prepare-only and --report-only exclude each other: the first trains nothing and reports "
                         "nothing, the second reports the kept cells")
    work = Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not s.report_only:  # a report of kept cells leaves the settings of the run that made them
        (work / "settings.json").write_text(json.dumps({**asdict(s), "argv": sys.argv}, indent=1))
    run_benchmark(s)
    if not s.prepare_only:
        print((work / "results.md").read_text())
    return 0
