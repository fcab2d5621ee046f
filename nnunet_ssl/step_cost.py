"""``nnunet-ssl bench-speed``: per-iteration cost of pretraining trainers next to a stock nnUNetTrainer step.

All trainers are built on the same plans and configuration in one process and timed *interleaved* (one step of
each in turn, repeated), so machine noise hits them alike. Data loading is excluded from the step time (batches
are drawn before the clock starts); the loaders are timed separately. For pretraining trainers the share of the
step spent in pair selection + loss (``compute_loss``) is timed inside the same steps, and each goal of the issue
(step ratio, loss share, loader ratio) is reported as met or missed.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch

# goals of the issue that introduced bench-speed (same plans and batch size, interleaved in one run)
GOAL_STEP_RATIO = 2.2     # pretraining step <= 2.2 x a stock nnUNetTrainer step
GOAL_LOSS_SHARE = 0.05    # pair selection + loss (compute_loss) <= 5 % of a pretraining step
GOAL_LOADER_RATIO = 0.45  # two-view loader >= 0.45 x the standard loader's batches/s


# --cpu-fast compare: the CPU variants of a plugin trainer, as (cpu_bf16, cpu_channels_last, cpu_compile,
# cpu_channels_last_norm); "fp32" is the standard layout, the float32 default is "fp32-cl" (channels-last, instance
# norms that keep the layout), "fp32-cl-inorm" channels-last with torch's instance_norm (the default until
# 2026-12-04), "fp32-cl-gn" with group_norm
CPU_VARIANTS = {"fp32": (False, False, False, "precise"), "fp32-cl": (False, True, False, "precise"),
                "fp32-cl-inorm": (False, True, False, "torch"), "fp32-cl-gn": (False, True, False, "group_norm"),
                "fp32-compile": (False, False, True, "precise"), "fp32-cl-compile": (False, True, True, "precise"),
                "bf16": (True, True, False, "precise")}


def _build(trainer_name: str, dataset: str, configuration: str, plans: str, device: torch.device,
           cpu_bf16: bool | None = None, variant: tuple | None = None):
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_ssl.nnunet.cpu_fast import CPUFastPathMixin
    tr = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, False, device)
    if cpu_bf16 is not None and isinstance(tr, CPUFastPathMixin):
        tr.cpu_bf16 = cpu_bf16  # before on_train_start -> initialize, where the fast path is set up
    if variant is not None and isinstance(tr, CPUFastPathMixin):
        tr.cpu_bf16, tr.cpu_channels_last, tr.cpu_compile, tr.cpu_channels_last_norm = variant
    tr.num_epochs = max(tr.num_epochs, 1)
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    return tr


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _precision(tr, dev: torch.device) -> str:
    if dev.type == "cuda":
        return "amp-fp16"
    if getattr(tr, "cpu_fast_path", False):
        return "bf16"
    from torch._dynamo import OptimizedModule
    cl = getattr(tr, "cpu_channels_last_on", False)
    norm = {"torch": "-inorm", "group_norm": "-gn"}.get(tr.cpu_channels_last_norm, "") if cl else ""
    return "fp32" + ("-cl" if cl else "") + norm + (
        "-compile" if isinstance(getattr(tr, "network", None), OptimizedModule) else "")


def _is_pretraining_name(name: str) -> bool:
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS
    return name in PRETRAINING_TRAINERS


def _is_pretraining(tr) -> bool:
    from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer
    return isinstance(tr, ContrastivePretrainTrainer)


def _time_compute_loss(tr, dev: torch.device, sink: list[float]):
    """Wrap the trainer's compute_loss (pair selection + loss) so that each call's duration lands in ``sink``;
    synchronised on CUDA so the time is the loss's own, not the forward's queued kernels (the two extra
    synchronisations cost the step the overlap of the loss's kernel launches with the forward's kernels, so a
    pretraining step measures slightly longer on CUDA; on CPU they do nothing)."""
    original = tr.compute_loss

    def timed(outputs, batch):
        _sync(dev)
        t = time.perf_counter()
        result = original(outputs, batch)
        _sync(dev)
        sink.append(time.perf_counter() - t)
        return result

    tr.compute_loss = timed


def _data_loader(tr):
    aug = tr.dataloader_train
    return getattr(aug, "data_loader", None) or getattr(aug, "generator", None)


def _loader_single_process(loaders: dict[str, object], n: int) -> dict[str, float]:
    """Batches/s of each loader in this process, interleaved batch by batch (the trainer's own augmentation).
    Mean rate, not the median batch: nnU-Net's spatial augmentation runs on a random ~1/3 of the samples, so batch
    times are bimodal and the median jumps between the cheap and the expensive mode."""
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(n):
        for name, dl in loaders.items():
            t = time.perf_counter()
            dl.generate_train_batch()
            times[name].append(time.perf_counter() - t)
    return {k: len(v) / float(np.sum(v)) for k, v in times.items()}


def _loader_workers(dl, workers: int, n: int, pin_memory: bool) -> float:
    """Batches/s of ``dl`` behind nnU-Net's background augmenter with ``workers`` processes (as in
    nnUNetTrainer.get_dataloaders), in steady state: the batches made while the workers started and the first
    batch was awaited sit in the queue and are drained before the clock starts."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )
    num_cached = max(6, workers // 2)
    gen = NonDetMultiThreadedAugmenter(dl, None, workers, num_cached, None, pin_memory, 0.002)
    try:
        for _ in range(1 + num_cached + workers):
            next(gen)
        t = time.perf_counter()
        for _ in range(n):
            next(gen)
        return n / (time.perf_counter() - t)
    finally:
        gen._finish()


def _variant_runs(trainer: str, variant: str) -> bool:
    """Whether a CPU variant applies: bf16 only where the CPU has it; no compiled variant of a pretraining trainer
    (the pretraining engine's forward is its own: nothing for cpu_compile to compile)."""
    from nnunet_ssl.nnunet.cpu_fast import cpu_supports_bf16
    if variant == "bf16" and not cpu_supports_bf16():
        return False
    return not (CPU_VARIANTS[variant][2] and _is_pretraining_name(trainer))


def _references(labels, trainer_of: dict, precision: dict, reference: str) -> dict[str, str]:
    """Each run's reference: a run of the ``reference`` trainer at the same precision (else its first run: float32
    for bf16 runs of trainers that have no fast path, e.g. the stock nnUNetTrainer)."""
    first = [k for k in labels if trainer_of[k] == reference]
    return {k: next((r for r in first if precision[r] == precision[k]), first[0]) for k in labels}


def _speedups_vs_fp32(med: dict, trainer_of: dict) -> dict[str, float]:
    """Each run's speed-up over its trainer's ``fp32`` variant, where that ran."""
    return {k: med[f"{trainer_of[k]} [fp32]"] / t for k, t in med.items() if f"{trainer_of[k]} [fp32]" in med}


def _reported_cpu_flags() -> list[str]:
    return sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & _cpu_flags())


def bench_speed(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                trainers: Sequence[str] = ("nnUNetTrainer", "SpadePretrainTrainer"), iterations: int = 10,
                warmup: int = 2, device: str = "cpu", cpu_bf16: str = "auto", workers: int = 0,
                loader_batches: int | None = None, cpu_fast: Sequence[str] = (), allocator: str = "run") -> dict:
    """``cpu_bf16``: 'auto' (each trainer's own setting), 'on'/'off' (forced for the plugin's trainers), 'compare'
    (each plugin trainer twice, float32 and bf16, all interleaved). ``cpu_fast``: CPU variants of each plugin trainer
    (names of CPU_VARIANTS; bf16 only where the CPU has it), all interleaved; a compiled variant's compilation
    happens in its warm-up steps and is reported as ``first_step_s``. ``workers`` > 0 also times the loaders behind
    nnU-Net's NonDetMultiThreadedAugmenter with that many processes. On CPU the process keeps freed memory for
    reuse (cpu_fast.keep_freed_memory, as the plugin's CPU trainings do; ``NNUNET_SSL_CPU_MALLOC=0``: glibc's
    defaults), for every trainer and variant of the run alike; the report says which. ``allocator='trainer'``: the
    trainers' own choice instead, as in their training runs (one process per trainer: ``bench_speed_isolated``)."""
    from nnunet_ssl.nnunet.cpu_fast import ENV_VAR, CPUFastPathMixin, freed_memory_kept, keep_freed_memory
    dev = torch.device(device)
    if dev.type == "cpu" and allocator == "run":
        keep_freed_memory()
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    results_tmp = tempfile.mkdtemp(prefix="nnunet_ssl_bench_")
    os.environ["nnUNet_results"] = results_tmp  # benchmark runs must not touch real results
    if cpu_bf16 != "auto":
        os.environ.pop(ENV_VAR, None)  # the explicit choice of this run wins over the environment
    setting = {"auto": None, "on": True, "off": False, "compare": False}[cpu_bf16]
    built: dict[str, object] = {}  # label -> trainer
    trainer_of: dict[str, str] = {}
    for name in trainers:
        if cpu_fast and dev.type == "cpu":
            probe = None
            for v in cpu_fast:
                if not _variant_runs(name, v):
                    continue
                t = _build(name, dataset, configuration, plans, dev, variant=CPU_VARIANTS[v])
                if not isinstance(t, CPUFastPathMixin):  # stock trainers have one variant: float32
                    probe = t
                    break
                built[f"{name} [{v}]"], trainer_of[f"{name} [{v}]"] = t, name
            if probe is not None:
                built[name], trainer_of[name] = probe, name
            continue
        tr = _build(name, dataset, configuration, plans, dev, setting)
        variants = [(tr, False)]
        if cpu_bf16 == "compare" and dev.type == "cpu" and isinstance(tr, CPUFastPathMixin):
            variants.append((_build(name, dataset, configuration, plans, dev, True), True))
        for t, _ in variants:  # labelled by number format; the report's "precision" also names the layout
            label = f"{name} [{_precision(t, dev).replace('fp32-cl', 'fp32')}]" if cpu_bf16 == "compare" else name
            built[label], trainer_of[label] = t, name
    labels = list(built)
    precision = {k: _precision(tr, dev) for k, tr in built.items()}
    batches = {k: [next(tr.dataloader_train) for _ in range(warmup + iterations)] for k, tr in built.items()}
    times: dict[str, list[float]] = {k: [] for k in labels}
    first_step: dict[str, float] = {}
    loss_times: dict[str, list[float]] = {k: [] for k in labels if _is_pretraining(built[k])}
    peak: dict[str, float] = {}
    for i in range(warmup + iterations):
        if i == warmup:  # time compute_loss only in the timed iterations
            for k, sink in loss_times.items():
                _time_compute_loss(built[k], dev, sink)
        for k, tr in built.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(dev)
            t = time.perf_counter()
            tr.train_step(batches[k][i])
            _sync(dev)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
            elif i == 0:
                first_step[k] = time.perf_counter() - t  # includes torch.compile's compilation
            if dev.type == "cuda":
                peak[k] = max(peak.get(k, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ref = _references(labels, trainer_of, precision, trainers[0])
    # loaders: one per trainer (precision does not change them)
    n = loader_batches or max(20, 2 * iterations)  # loader batches are cheap; their times vary with augmentation
    loaders = {}
    for k in labels:
        if trainer_of[k] not in loaders and _data_loader(built[k]) is not None:
            loaders[trainer_of[k]] = _data_loader(built[k])
    loader = _loader_single_process(loaders, n)
    loader_workers = {name: _loader_workers(dl, workers, n, dev.type == "cuda") for name, dl in loaders.items()} \
        if workers > 0 else {}
    report = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                           f"{torch.get_num_threads()} threads)",
        "dataset": dataset, "configuration": configuration, "plans": plans, "iterations": iterations,
        "reference": trainers[0], "trainer": trainer_of, "precision": precision,
        "batch_size": {k: int(tr.batch_size) for k, tr in built.items()},
        "step_s_median": med, "first_step_s": first_step, "step_ratio_vs_reference": {k: med[k] / med[ref[k]] for k in labels},
        "loss_s_median": {k: float(np.median(v)) for k, v in loss_times.items()},
        "loss_share_of_step": {k: float(np.median(v)) / med[k] for k, v in loss_times.items()},
        "loader_batches_per_s": loader, "loader_workers": workers,
        "loader_batches_per_s_workers": loader_workers,
        "peak_mem_mib": peak or None,
        "peak_mem_ratio_vs_reference": {k: peak[k] / peak[ref[k]] for k in labels} if peak else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    if dev.type == "cpu":
        report["cpu_allocator"] = "freed memory kept for reuse" if freed_memory_kept() else "C library defaults"
    if cpu_fast:
        report["speedup_vs_fp32"] = _speedups_vs_fp32(med, trainer_of)
        report["cpu_flags"] = _reported_cpu_flags()
    if cpu_bf16 == "compare":
        report["bf16_speedup"] = {
            name: med[f"{name} [fp32]"] / med[f"{name} [bf16]"] for name in trainers if f"{name} [bf16]" in med}
    report["goals"] = _goals(report)
    for tr in built.values():  # stop background augmentation workers
        for gen in (tr.dataloader_train, tr.dataloader_val):
            if hasattr(gen, "_finish"):
                gen._finish()
    return report


# in a process of its own the float32 path before the CPU work ("fp32", standard layout) runs as it did then, with the
# C library's allocator defaults (NNUNET_SSL_CPU_MALLOC=0); every other configuration keeps its trainer's own choice
_ISOLATED_ENV = {"fp32": {"NNUNET_SSL_CPU_MALLOC": "0"}}


_BAD_INPUT_EXIT = 3  # an isolated configuration's exit status for bad input (its one-line message on stderr)


def _run_isolated(spec: str) -> None:
    """One configuration of ``bench_speed_isolated`` in this fresh process; spec: JSON of bench_speed's keyword
    arguments and ``out``, where the report goes."""
    import sys

    from nnunet_ssl.cli import bad_input_message
    kw = json.loads(spec)
    out = kw.pop("out")
    try:
        report = bench_speed(**kw, allocator="trainer")
    except Exception as error:
        message = bad_input_message(error)
        if message is None:
            raise
        sys.stderr.write(message + "\n")
        sys.exit(_BAD_INPUT_EXIT)
    with open(out, "w") as f:
        json.dump(report, f)


def _run_rounds(configs, rounds: int, run_one) -> dict[str, list[dict]]:
    """Every (trainer, variant) of ``configs`` once per round, in order (a stock trainer, found to have no variants,
    once per round); ``run_one(name, variant, round)`` gives a configuration's report. Returns each label's reports,
    by round."""
    stock: set[str] = set()
    runs: dict[str, list[dict]] = {}
    for rnd, (i, (name, v)) in itertools.product(range(rounds), enumerate(configs)):
        if name in stock and any(c == name for c, _ in configs[:i]):
            continue
        r = run_one(name, v, rnd)
        (label,) = r["step_s_median"]
        if label == name:
            stock.add(name)
        runs.setdefault(label, []).append(r)
    return runs


def _run_in_process(name: str, variant: str, rnd: int, folder: str, common: dict, workers: int) -> dict:
    """One configuration's bench_speed report from a fresh Python process (``_run_isolated``)."""
    import subprocess
    import sys
    out = os.path.join(folder, f"{name}_{variant}_round{rnd}.json")
    spec = dict(common, trainers=[name], cpu_fast=[variant], workers=workers if rnd == 0 else 0, out=out)
    proc = subprocess.run([sys.executable, "-c", "import sys; from nnunet_ssl.step_cost import _run_isolated; "
                           "_run_isolated(sys.argv[1])", json.dumps(spec)],
                          env={**os.environ, **_ISOLATED_ENV.get(variant, {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        if proc.returncode == _BAD_INPUT_EXIT:
            from nnunet_ssl.nnunet.input_checks import BadInputError
            raise BadInputError(last)
        raise RuntimeError(f"bench-speed of {name} [{variant}] in its own process failed (exit {proc.returncode}): "
                           f"{last}")
    with open(out) as f:
        return json.load(f)


def bench_speed_isolated(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                         trainers: Sequence[str] = ("nnUNetTrainer", "SpadePretrainTrainer"), iterations: int = 10,
                         warmup: int = 2, workers: int = 0, loader_batches: int | None = None,
                         cpu_fast: Sequence[str] = ("fp32", "fp32-cl"), rounds: int = 2) -> dict:
    """``bench_speed`` with ``cpu_fast`` on CPU, each trainer and variant in a process of its own, as in its training
    run: the allocator setting (process-wide), the heap and oneDNN's caches are its own, where in one process they are
    shared. The configurations alternate within each of ``rounds`` rounds, so that slow drifts of the machine hit
    them alike; a configuration's step and loss times are the medians over rounds of its processes' medians (each
    round's in ``step_s_rounds`` / ``loss_s_rounds``). ``fp32``, the float32 path before the CPU work, runs with the
    C library's allocator defaults, as it did then; the plugin's other variants keep freed memory, as their training
    runs do; stock trainers keep what nnU-Net has (nothing changed)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    unknown = [v for v in cpu_fast if v not in CPU_VARIANTS]
    if unknown or not cpu_fast:
        raise ValueError(f"cpu_fast: name one or more of {', '.join(CPU_VARIANTS)} (got {list(cpu_fast)})")
    configs = [(name, v) for name in trainers for v in cpu_fast if _variant_runs(name, v)]
    common = dict(dataset=dataset, configuration=configuration, plans=plans, iterations=iterations, warmup=warmup,
                  device="cpu", loader_batches=loader_batches)
    with tempfile.TemporaryDirectory(prefix="nnunet_ssl_bench_isolated_") as folder:
        runs = _run_rounds(configs, rounds, lambda name, v, rnd: _run_in_process(name, v, rnd, folder, common,
                                                                                 workers))
    return _isolated_report(runs, trainers, rounds, dataset, configuration, plans, iterations, workers)


def _isolated_report(runs: dict[str, list[dict]], trainers: Sequence[str], rounds: int, dataset: str,
                     configuration: str, plans: str, iterations: int, workers: int) -> dict:
    """bench_speed's report from the isolated processes' reports (``runs``: label -> reports, by round)."""
    labels = list(runs)
    one = {k: v[0] for k, v in runs.items()}
    trainer_of = {k: one[k]["trainer"][k] for k in labels}
    precision = {k: one[k]["precision"][k] for k in labels}
    step_rounds = {k: [r["step_s_median"][k] for r in v] for k, v in runs.items()}
    loss_rounds = {k: [r["loss_s_median"][k] for r in v] for k, v in runs.items() if k in one[k]["loss_s_median"]}
    med = {k: float(np.median(v)) for k, v in step_rounds.items()}
    loss = {k: float(np.median(v)) for k, v in loss_rounds.items()}
    ref = _references(labels, trainer_of, precision, trainers[0])
    loader: dict[str, list[float]] = {}
    loader_workers: dict[str, list[float]] = {}
    for v in runs.values():
        for r in v:
            for name, rate in r["loader_batches_per_s"].items():
                loader.setdefault(name, []).append(rate)
            for name, rate in r["loader_batches_per_s_workers"].items():
                loader_workers.setdefault(name, []).append(rate)
    report = {
        "device": one[labels[0]]["device"], "dataset": dataset, "configuration": configuration, "plans": plans,
        "iterations": iterations, "mode": "one process per trainer and variant, "
                                             + (f"{rounds} rounds alternating" if rounds > 1 else "1 round"),
        "reference": trainers[0], "trainer": trainer_of, "precision": precision,
        "batch_size": {k: one[k]["batch_size"][k] for k in labels},
        "step_s_median": med, "step_s_rounds": step_rounds,
        "first_step_s": {k: one[k]["first_step_s"][k] for k in labels},
        "step_ratio_vs_reference": {k: med[k] / med[ref[k]] for k in labels},
        "loss_s_median": loss, "loss_s_rounds": loss_rounds,
        "loss_share_of_step": {k: loss[k] / med[k] for k in loss},
        "loader_batches_per_s": {k: float(np.median(v)) for k, v in loader.items()}, "loader_workers": workers,
        "loader_batches_per_s_workers": {k: float(np.median(v)) for k, v in loader_workers.items()},
        "peak_mem_mib": None, "peak_mem_ratio_vs_reference": None,
        "cpu_allocator": {k: one[k]["cpu_allocator"] for k in labels},
        "speedup_vs_fp32": _speedups_vs_fp32(med, trainer_of), "cpu_flags": _reported_cpu_flags(),
        "date": time.strftime("%Y-%m-%d"),
    }
    report["goals"] = _goals(report)
    return report


def _cpu_flags() -> set:
    from nnunet_ssl.nnunet.cpu_fast import cpu_flags
    return cpu_flags()


def _goals(r: dict) -> list[dict]:
    """Each goal of the issue, per pretraining run (the runs whose compute_loss was timed): value, met."""
    goals = []
    standard = r["reference"]
    pretraining = list(r["loss_share_of_step"])
    reference_is_stock = not any(r["trainer"][k] == standard for k in pretraining)
    for k in pretraining:
        if reference_is_stock:
            ratio = r["step_ratio_vs_reference"][k]
            goals.append({"run": k, "goal": f"step <= {GOAL_STEP_RATIO} x {standard}", "value": ratio,
                          "met": ratio <= GOAL_STEP_RATIO})
        share = r["loss_share_of_step"][k]
        goals.append({"run": k, "goal": f"pair selection + loss <= {GOAL_LOSS_SHARE:.0%} of the step",
                      "value": share, "met": share <= GOAL_LOSS_SHARE})
    if reference_is_stock:
        for name in dict.fromkeys(r["trainer"][k] for k in pretraining):
            for mode, rates in (("single process", r["loader_batches_per_s"]),
                                (f"{r['loader_workers']} workers", r["loader_batches_per_s_workers"])):
                if name in rates and standard in rates:
                    ratio = rates[name] / rates[standard]
                    goals.append({"run": name, "goal": f"two-view loader >= {GOAL_LOADER_RATIO} x standard loader "
                                  f"({mode})", "value": ratio, "met": ratio >= GOAL_LOADER_RATIO})
    return goals


def format_report(r: dict) -> str:
    nan = float("nan")
    peak = r.get("peak_mem_mib") or {}
    lines = [(f"device: {r['device']}; {r['dataset']} {r['configuration']} {r['plans']}; {r['iterations']} timed "
              f"iterations (median), {r.get('mode', 'trainers interleaved')}; data loading excluded from the step"
              + (f"; CPU allocator: {r['cpu_allocator']}" if isinstance(r.get("cpu_allocator"), str) else "")
              + f"; {r['date']}"), "",
             (f"| run | precision | batch (cases) | step [s] | x {r['reference']}"
              + (" (same variant; speed-ups below)" if r.get("speedup_vs_fp32") else "") + " | selection + loss [s] | share of "
              "step | peak memory [MiB] | x memory |"), "|---|---|---|---|---|---|---|---|---|"]
    for k, v in r["step_s_median"].items():
        mem = f"{peak[k]:.0f} | {r['peak_mem_ratio_vs_reference'][k]:.2f}" if k in peak else "n/a | n/a"
        loss = f"{r['loss_s_median'][k]:.4f} | {r['loss_share_of_step'][k]:.1%}" if k in r["loss_s_median"] \
            else "- | -"
        lines.append(f"| {k} | {r['precision'][k]} | {r['batch_size'][k]} | {v:.4f} | "
                     f"{r['step_ratio_vs_reference'][k]:.2f} | {loss} | {mem} |")
    if r.get("speedup_vs_fp32"):
        lines += ["", f"CPU flags: {', '.join(r.get('cpu_flags', [])) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}; "
                  "speed-up over the same trainer's float32 step (first step, with any compilation, in s): " + ", ".join(
                      f"{k} {v:.2f}x ({r['first_step_s'].get(k, float('nan')):.1f} s)"
                      for k, v in r["speedup_vs_fp32"].items())]
    if isinstance(r.get("cpu_allocator"), dict):
        lines += ["", "CPU allocator of each process: " + ", ".join(f"{k}: {v}" for k, v in r["cpu_allocator"].items())]
    if r.get("step_s_rounds"):
        lines += ["", "step [s] per round: " + ", ".join(
            f"{k} {' / '.join(f'{t:.4f}' for t in v)}" for k, v in r["step_s_rounds"].items())]
    if r.get("bf16_speedup"):
        lines += ["", "bf16 speed-up (fp32 step / bf16 step): " + ", ".join(
            f"{k} {v:.2f}x" for k, v in r["bf16_speedup"].items())]
    workers = r["loader_workers"]
    lines += ["", f"| loader of | single process [batches/s] | {workers} workers [batches/s] |", "|---|---|---|"]
    for k, v in r["loader_batches_per_s"].items():
        lines.append(f"| {k} | {v:.2f} | {r['loader_batches_per_s_workers'].get(k, nan):.2f} |")
    if r["goals"]:
        lines += ["", "goals:"]
        for g in r["goals"]:
            value = f"{g['value']:.1%}" if "%" in g["goal"] else f"{g['value']:.2f}"
            lines.append(f"  {'met   ' if g['met'] else 'MISSED'}  {g['run']}: {g['goal']} (measured {value})")
    return "\n".join(lines)


def main_bench(args) -> int:
    cpu_fast = tuple(CPU_VARIANTS) if args.cpu_fast == ["compare"] else tuple(args.cpu_fast or ())
    unknown = [v for v in cpu_fast if v not in CPU_VARIANTS]
    if unknown:
        raise SystemExit(f"--cpu-fast {' '.join(unknown)}: choose from compare, {', '.join(CPU_VARIANTS)}")
    if args.isolate:
        if args.device != "cpu" or not cpu_fast or args.cpu_bf16 != "auto":
            raise SystemExit("--isolate times CPU variants: use it with --device cpu and --cpu-fast, "
                             "without --cpu-bf16")
        r = bench_speed_isolated(str(args.d), args.c, args.p, args.tr, args.iterations, workers=args.workers,
                                 cpu_fast=cpu_fast, rounds=args.rounds)
    else:
        r = bench_speed(str(args.d), args.c, args.p, args.tr, args.iterations, device=args.device,
                        cpu_bf16=args.cpu_bf16, workers=args.workers, cpu_fast=cpu_fast)
    print(format_report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
