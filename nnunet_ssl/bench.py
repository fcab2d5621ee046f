"""``nnunet-ssl bench-speed``: per-iteration cost of pretraining trainers next to a stock nnUNetTrainer step.

All trainers are built on the same plans and configuration in one process and timed *interleaved* (one step of
each in turn, repeated), so machine noise hits them alike. Data loading is excluded from the step time (batches
are drawn before the clock starts); the loaders are timed separately.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Dict, List, Sequence

import numpy as np
import torch


def _build(trainer_name: str, dataset: str, configuration: str, plans: str, device: torch.device):
    from nnunetv2.run.run_training import get_trainer_from_args
    tr = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, False, device)
    tr.num_epochs = max(tr.num_epochs, 1)
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    return tr


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_speed(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                trainers: Sequence[str] = ("nnUNetTrainer", "SpadePretrainTrainer"), iterations: int = 10,
                warmup: int = 2, device: str = "cpu") -> Dict:
    dev = torch.device(device)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    results_tmp = tempfile.mkdtemp(prefix="nnunet_ssl_bench_")
    os.environ["nnUNet_results"] = results_tmp  # benchmark runs must not touch real results
    built = {name: _build(name, dataset, configuration, plans, dev) for name in trainers}
    batches = {name: [next(tr.dataloader_train) for _ in range(warmup + iterations)] for name, tr in built.items()}
    times: Dict[str, List[float]] = {name: [] for name in trainers}
    peak: Dict[str, float] = {}
    for i in range(warmup + iterations):
        for name, tr in built.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(dev)
            t = time.perf_counter()
            tr.train_step(batches[name][i])
            _sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
    # loader throughput (single process, the trainer's own augmentation)
    loader = {}
    for name, tr in built.items():
        aug = tr.dataloader_train
        dl = getattr(aug, "data_loader", None) or getattr(aug, "generator", None)
        if dl is None:
            continue
        t = time.perf_counter()
        n = max(3, iterations // 2)
        for _ in range(n):
            dl.generate_train_batch()
        loader[name] = n / (time.perf_counter() - t)
    base = trainers[0]
    med = {k: float(np.median(v)) for k, v in times.items()}
    report = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                           f"{torch.get_num_threads()} threads)",
        "dataset": dataset, "configuration": configuration, "plans": plans, "iterations": iterations,
        "batch_size": {k: int(tr.batch_size) for k, tr in built.items()},
        "step_s_median": med, "step_ratio_vs_" + base: {k: med[k] / med[base] for k in med},
        "loader_batches_per_s": loader,
        "peak_mem_mib": peak or None,
        "date": time.strftime("%Y-%m-%d"),
    }
    for tr in built.values():  # stop background augmentation workers
        for gen in (tr.dataloader_train, tr.dataloader_val):
            if hasattr(gen, "_finish"):
                gen._finish()
    return report


def format_report(r: Dict) -> str:
    base = next(iter(r["step_s_median"]))
    lines = [f"device: {r['device']}; {r['dataset']} {r['configuration']} {r['plans']}; {r['iterations']} timed "
             f"iterations (median), {r['date']}", "", "| trainer | batch (cases) | step [s] | x stock | loader [batches/s] |",
             "|---|---|---|---|---|"]
    for k, v in r["step_s_median"].items():
        lines.append(f"| {k} | {r['batch_size'][k]} | {v:.3f} | {v / r['step_s_median'][base]:.2f} | "
                     f"{r['loader_batches_per_s'].get(k, float('nan')):.2f} |")
    return "\n".join(lines)


def main_bench(args) -> int:
    r = bench_speed(str(args.d), args.c, args.p, args.tr, args.iterations, device=args.device)
    print(format_report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
