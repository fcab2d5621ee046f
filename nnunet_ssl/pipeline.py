"""Pretrain -> fine-tune -> predict -> evaluate through nnU-Net's own commands.

Each step runs the real ``nnUNetv2_*`` command in a subprocess (exactly what a user types), with its full output
in a log file and a one-line-per-epoch progress echo. Runs that must not share an output folder (e.g. the same
fine-tuning trainer from scratch and from pretrained weights) get separate ``nnUNet_results`` folders.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

PROGRESS = re.compile(r"(Epoch \d+$|train_loss|Mean Validation Dice|Pseudo dice|Training done|predict|Done)")


def bin_path(command: str) -> str:
    """A console script of this Python environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / command
    found = str(candidate) if candidate.exists() else shutil.which(command)
    if not found:
        raise FileNotFoundError(f"{command} not found next to {sys.executable} or on PATH: pip install nnunetv2")
    return found


def nnunet_env(raw: str, preprocessed: str, results: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results)})
    env.setdefault("nnUNet_compile", "false")
    # nnU-Net's default of 8 worker processes (final validation, export) costs more in start-up than it saves on
    # machines with fewer cores
    env.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    if extra:
        env.update(extra)
    return env


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_file: Path, label: str,
               echo: Callable[[str], None] = print) -> float:
    """Run ``cmd``; full output to ``log_file``; echo progress lines; raise with the log's tail on failure."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        epoch = ""
        for line in proc.stdout:
            log.write(line)
            text = line.strip()
            m = re.search(r"Epoch (\d+)$", text)
            if m:
                epoch = m.group(1)
            elif PROGRESS.search(text) and "train_loss" in text:
                echo(f"  [{label}] epoch {epoch}: {text.split(': ', 1)[-1]}  ({time.time() - start:.0f} s)")
            elif "Mean Validation Dice" in text:
                echo(f"  [{label}] {text}")
        rc = proc.wait()
    if rc != 0:
        tail = "".join(Path(log_file).read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{label} failed (exit {rc}); full log: {log_file}\n{tail}")
    return time.time() - start


def case_ids(images_dir: Path, file_ending: str) -> List[str]:
    """Case identifiers of an nnU-Net raw image folder (from the files of channel 0)."""
    return sorted({p.name[: -len(file_ending) - 5] for p in Path(images_dir).glob(f"*_0000{file_ending}")})


def link_cases(cases: Sequence[str], images: Path, labels: Optional[Path], dst_images: Path,
               dst_labels: Optional[Path], file_ending: str, num_channels: int) -> None:
    """Fresh ``dst_images`` (and ``dst_labels``) folders with symbolic links to the given cases' files; a missing
    channel or label is an error, never a silently smaller set."""
    for d in (dst_images, dst_labels):
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
            Path(d).mkdir(parents=True)
    for c in cases:
        for ch in range(num_channels):
            src = Path(images) / f"{c}_{ch:04d}{file_ending}"
            if not src.exists():
                raise SystemExit(f"case {c}: image {src} is missing (every case needs all {num_channels} channels)")
            os.symlink(src.resolve(), Path(dst_images) / src.name)
        if dst_labels is not None:
            src = Path(labels) / f"{c}{file_ending}"
            if not src.exists():
                raise SystemExit(f"case {c}: label {src} is missing; every case used here needs its label")
            os.symlink(src.resolve(), Path(dst_labels) / src.name)


def write_splits(preprocessed_dataset_dir: Path, folds: List[Dict[str, List[str]]]) -> None:
    """nnU-Net's splits_final.json: fold i trains on folds[i]['train'] and validates on folds[i]['val']."""
    path = Path(preprocessed_dataset_dir) / "splits_final.json"
    path.write_text(json.dumps(folds, indent=1))


def train(dataset: int, configuration: str, fold: str, trainer: str, plans: str, env: Dict[str, str],
          log_file: Path, label: str, device: str = "cpu", pretrained_weights: Optional[str] = None,
          echo: Callable[[str], None] = print, output_folder: Optional[Path] = None) -> float:
    """nnUNetv2_train; with ``output_folder`` (the run's nnU-Net output folder) an interrupted run that left a
    checkpoint there continues with --c (its weights already include the pretrained ones: nnU-Net forbids --c
    together with -pretrained_weights)."""
    cmd = [bin_path("nnUNetv2_train"), str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans,
           "-device", device]
    out = Path(output_folder) if output_folder is not None else None
    if out is not None and any((out / f).exists() for f in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        cmd.append("--c")
    elif pretrained_weights:
        cmd += ["-pretrained_weights", str(pretrained_weights)]
    return run_logged(cmd, env, log_file, label, echo)


def predict(input_dir: Path, output_dir: Path, dataset: int, configuration: str, fold: str, trainer: str,
            plans: str, env: Dict[str, str], log_file: Path, label: str, device: str = "cpu", tta: bool = False,
            echo: Callable[[str], None] = print) -> float:
    cmd = [bin_path("nnUNetv2_predict"), "-i", str(input_dir), "-o", str(output_dir), "-d", str(dataset),
           "-c", configuration, "-f", str(fold), "-tr", trainer, "-p", plans, "-device", device,
           "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    if not tta:
        cmd.append("--disable_tta")
    return run_logged(cmd, env, log_file, label, echo)


def evaluate(labels_dir: Path, predictions_dir: Path, dataset_json: Path, plans_json: Path,
             num_processes: int = 2) -> dict:
    """nnU-Net's own evaluation (Dice per class); returns {'mean': float, 'per_class': {label: dice}}."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    out = Path(predictions_dir) / "summary.json"
    compute_metrics_on_folder2(str(labels_dir), str(predictions_dir), str(dataset_json), str(plans_json),
                               str(out), num_processes=num_processes, chill=False)
    summary = json.loads(out.read_text())
    per_class = {k: v["Dice"] for k, v in summary["mean"].items()}
    labels = sorted(per_class, key=int)
    # per test case: Dice of each foreground class (the paired bootstrap of the benchmark resamples cases)
    per_case = {Path(c["reference_file"]).name: [c["metrics"][lb]["Dice"] for lb in labels]
                for c in summary["metric_per_case"]}
    return {"mean": float(summary["foreground_mean"]["Dice"]), "per_class": per_class,
            "num_cases": len(summary["metric_per_case"]), "per_case": per_case}
