"""Resident memory of a training process over many steps, each on a fresh batch from the trainer's own loader (loaded
in the process, as with ``nnUNet_n_proc_DA=0``): what keeping freed memory (``cpu_fast.keep_freed_memory``) costs.

    nnUNet_preprocessed=... nnUNet_results=/tmp/r nnUNet_n_proc_DA=0 NNUNET_SSL_CPU_MALLOC=0|1 \\
        python benchmarks/timing/memory_over_steps.py -d 4 -p nnUNetPlansCPUWide --trainer nnUNetTrainerFinetune_cpu_80ep
"""
import argparse
import resource
import time

import torch

from nnunet_ssl.step_cost import CPU_VARIANTS, _build


def resident_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-d", required=True)
    ap.add_argument("-p", default="nnUNetPlans")
    ap.add_argument("--trainer", default="nnUNetTrainerFinetune_cpu_80ep")
    ap.add_argument("--variant", default="fp32-cl", choices=sorted(CPU_VARIANTS))
    ap.add_argument("--steps", type=int, default=1000)
    a = ap.parse_args()
    tr = _build(a.trainer, a.d, "3d_fullres", a.p, torch.device("cpu"), variant=CPU_VARIANTS[a.variant])
    start = time.perf_counter()
    for i in range(a.steps):
        tr.train_step(next(tr.dataloader_train))
        if (i + 1) % max(a.steps // 5, 1) == 0:
            print(f"step {i + 1}: resident {resident_mib()} MiB, peak "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB, {time.perf_counter() - start:.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
