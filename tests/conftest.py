import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "Dataset004_Hippocampus"
# the cores each pytest-xdist worker may use: under `-n 2` on 2 cores, two trainings that each take every core
# (nnUNetv2_train sets torch's threads to the CPU count) spin against each other, and their steps run several times
# slower than with one thread each (cpu_fast.apply_thread_limit)
THREADS = str(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def clean_env(root: Path, **extra) -> dict:
    """The environment a user has: nnU-Net paths set, no nnUNet_extTrainer (the plugin's hook must add it)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer" and not k.startswith("NNUNET_SSL")}
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false",
                "OMP_NUM_THREADS": THREADS, "NNUNET_SSL_NUM_THREADS": THREADS})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=900, cwd=None):
    """Run a real command; on failure show its output."""
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed with {res.returncode}:\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def phantom_workspace(root: Path, dataset_id: int, name: str, **phantom) -> Path:
    """nnU-Net's raw / preprocessed / results folders under root and a phantom dataset in raw (make_phantom_dataset's
    keyword arguments); called again, it adds another dataset."""
    from nnunet_ssl.phantom import make_phantom_dataset
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir(exist_ok=True)
    make_phantom_dataset(root / "raw", dataset_id, name, **phantom)
    return root


@pytest.fixture(scope="session")
def nnunet_bin():
    return BIN


TINY_DATASET_ID = 993
TINY_DATASET = "Dataset993_Tiny"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """nnU-Net folders (raw/preprocessed/results) holding a phantom dataset of 4 cases (24^3) planned with
    nnUNetPlannerTiny: its plans list 2d and 3d_fullres, only 3d_fullres is preprocessed. Shared by the bad-input and
    crash/resume tests; tests may add results, but must not change its plans or preprocessed data."""
    root = tmp_path_factory.mktemp("tiny")
    phantom_workspace(root, TINY_DATASET_ID, "Tiny", num_train=4, num_test=1, shape=(24, 24, 24), seed=1)
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update({k: v for k, v in clean_env(root).items() if k in saved})
    try:  # in-process: saves an interpreter start-up; the variables are restored right after
        from nnunet_ssl.nnunet.planning import plan_and_preprocess
        plan_and_preprocess(TINY_DATASET_ID, "nnUNetPlannerTiny", ["3d_fullres"], num_processes=1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


def atomic_torch_save(obj, filename) -> None:
    """torch.save the way the crash-safe trainers write checkpoints (through atomic_write_path)."""
    import torch
    from nnunet_ssl.nnunet.checkpoint import atomic_write_path
    with atomic_write_path(str(filename)) as tmp:
        torch.save(obj, tmp)


def voxel_grid(shape, offset=(0.0, 0.0, 0.0)):
    """(3, *shape) map holding each voxel's own index (padded to 3 components) plus offset."""
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    mesh = list(torch.meshgrid(*axes, indexing="ij"))
    while len(mesh) < 3:
        mesh.append(torch.zeros(shape))
    return torch.stack(mesh) + torch.tensor(offset, dtype=torch.float32).view(3, *([1] * len(shape)))
