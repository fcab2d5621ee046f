import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "Dataset004_Hippocampus"


def clean_env(root: Path, **extra) -> dict:
    """The environment a user has: nnU-Net paths set, no nnUNet_extTrainer (the plugin's hook must add it)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer" and not k.startswith("NNUNET_SSL")}
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false",
                "OMP_NUM_THREADS": "2"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=900, cwd=None):
    """Run a real command; on failure show its output."""
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed with {res.returncode}:\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="session")
def nnunet_bin():
    return BIN
