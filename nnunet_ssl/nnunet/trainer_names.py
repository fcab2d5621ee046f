"""The trainer names a user can mean: nnU-Net's, the plugin's and the user's own (``nnUNet_extTrainer``), and the
one-line message for an unknown one (with the closest names)."""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path

from nnunet_ssl.discovery import discovery_folder
from nnunet_ssl.nnunet.input_checks import _listing


def nnunet_trainer_names() -> list[str]:
    """Trainer classes shipped with nnU-Net, read from its source (no import: the lookup that just failed has
    imported them already, and this must also work when an import is broken)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        return []
    return _class_names_in(Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer")


def external_trainer_names() -> list[str]:
    """Trainer classes in the user's own ``nnUNet_extTrainer`` folders (the plugin's discovery folder excluded)."""
    names = []
    for folder in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        if folder.strip() and os.path.isdir(folder) and os.path.normpath(folder) != os.path.normpath(
                discovery_folder()):
            names += _class_names_in(Path(folder))
    return names


def _class_names_in(folder: Path) -> list[str]:
    pattern = re.compile(r"^class\s+(\w*Trainer\w*)\s*[(:]", re.MULTILINE)
    names = set()
    for file in folder.rglob("*.py"):
        try:
            names.update(pattern.findall(file.read_text(errors="replace")))
        except OSError:
            continue
    return sorted(names, key=lambda n: (n != "nnUNetTrainer", n.lower()))


def plugin_trainer_names() -> list[str]:
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS

    return list(PRETRAINING_TRAINERS) + list(SEGMENTATION_TRAINERS)


def trainer_families(names: list[str]) -> list[str]:
    """Names that are not a variant of another name (``X_cpu``, ``X_smoke_long`` are variants of ``X``)."""
    return [n for n in names if not any(n != m and n.startswith(m + "_") for m in names)]


def unknown_trainer_message(name: str, plugin: list[str], nnunet: list[str], external: list[str]) -> str:
    known = list(dict.fromkeys(plugin + external + nnunet))
    by_lower = {}
    for candidate in known:
        by_lower.setdefault(candidate.lower(), candidate)
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.75)]
    if name.lower() in by_lower:  # only the case is wrong: that is the answer
        close = [by_lower[name.lower()]]
    parts = [f"unknown trainer '{name}'"]
    if close:
        parts.append(f"did you mean {close[0]}" + (f" (or {close[1]})" if len(close) > 1 else "") + "?"
                     + (" (names are case-sensitive)" if close[0].lower() == name.lower() else ""))
    parts.append(f"plugin trainers: {', '.join(trainer_families(plugin))} (with _cpu/_smoke variants)")
    if external:
        parts.append(f"yours (nnUNet_extTrainer): {_listing(external)}")
    examples = [n for n in ("nnUNetTrainer", "nnUNetTrainer_warmup", "nnUNetTrainer_100epochs",
                            "nnUNetTrainerNoMirroring") if n in nnunet]
    parts.append(f"nnU-Net's: {', '.join(examples)} and {max(len(nnunet) - len(examples), 0)} more")
    return "; ".join(parts) + (" (run `nnunet-ssl trainers --all` for every name; a trainer of your own is found "
                               "when its folder is in nnUNet_extTrainer)")


