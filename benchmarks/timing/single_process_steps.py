"""Training steps as a training process sees them: each (trainer, CPU variant, allocator) in a process of its own,
the processes alternating over rounds. ``nnunet-ssl bench-speed`` interleaves all trainers in one process, which is
the fairer comparison of arithmetic but not of memory: there, the process's allocator has already grown around all
of them, so what a lone training process pays for fresh pages (``cpu_fast.keep_freed_memory``) does not show.

Each process builds its trainer (``step_cost._build``), draws 6 batches, and times 3 x 30 steps over them (median
of the last 25 of each 30; data loading excluded), with the minor page faults per step. A configuration is
``TRAINER:VARIANT:MALLOC`` (VARIANT of ``step_cost.CPU_VARIANTS``, MALLOC 0 = glibc's defaults, 1 = freed memory
kept, the default); ratios are against the first configuration.

    nnUNet_preprocessed=... nnUNet_n_proc_DA=0 nnUNet_extTrainer=benchmarks/investigation \\
        python benchmarks/timing/single_process_steps.py -d 4 -p nnUNetPlansCPUWide --rounds 2 \\
        nnUNetTrainerFinetune_cpu_80ep:fp32:0 nnUNetTrainerFinetune_cpu_80ep:fp32-cl:1
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def one_process(dataset: str, plans: str, trainer: str, variant: str) -> dict:
    import torch

    from nnunet_ssl.step_cost import CPU_VARIANTS, _build
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_ssl_steps_")
    tr = _build(trainer, dataset, "3d_fullres", plans, torch.device("cpu"), variant=CPU_VARIANTS[variant])
    batches = [next(tr.dataloader_train) for _ in range(6)]
    medians, faults = [], []
    for _ in range(3):
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(30):
            t = time.perf_counter()
            tr.train_step(batches[i % 6])
            times.append(time.perf_counter() - t)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
        medians.append(float(np.median(times[5:])))
    return {"step_s": medians, "page_faults_per_step": faults}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-d", required=True)
    ap.add_argument("-p", default="nnUNetPlans")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("configs", nargs="+", help="TRAINER:VARIANT:MALLOC")
    a = ap.parse_args()
    if a.child:
        trainer, variant = a.configs[0].split(":")[:2]
        print("RESULT " + json.dumps(one_process(a.d, a.p, trainer, variant)))
        return
    results = {c: [] for c in a.configs}
    for r in range(a.rounds):
        for c in a.configs:
            trainer, variant, malloc = c.split(":")
            env = dict(os.environ, NNUNET_SSL_CPU_MALLOC=malloc)
            out = subprocess.run([sys.executable, __file__, "--child", "-d", a.d, "-p", a.p, c], env=env,
                                 capture_output=True, text=True, check=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results[c].append(res)
            print(f"round {r + 1} {c}: steps {' '.join(f'{s * 1e3:.1f}' for s in res['step_s'])} ms, "
                  f"page faults / step {' '.join(f'{f:.0f}' for f in res['page_faults_per_step'])}", flush=True)
    first = a.configs[0]
    ref = np.median([s for res in results[first] for s in res["step_s"]])
    print(f"\n| trainer : variant : malloc | step [ms], median of {a.rounds} x 3 | x {first} |\n|---|---|---|")
    for c, rs in results.items():
        med = np.median([s for res in rs for s in res["step_s"]])
        print(f"| {c} | {med * 1e3:.1f} | {ref / med:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
