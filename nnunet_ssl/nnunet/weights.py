"""``nnunet-ssl check-weights``: will these weights load with ``-pretrained_weights`` into that configuration?

Mirrors nnU-Net's rule (every tensor of the target network except ``.seg_layers.`` must exist in the checkpoint
with the same shape) before any training starts, and says in plain words what differs and why."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

SKIP = ".seg_layers."


def compare_state_dicts(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> dict:
    """source: the checkpoint's network_weights; target: the network that would receive them."""
    needed = [k for k in target if SKIP not in k]
    missing = [k for k in needed if k not in source]
    mismatched: List[Tuple[str, tuple, tuple]] = [(k, tuple(source[k].shape), tuple(target[k].shape))
                                                  for k in needed if k in source
                                                  and tuple(source[k].shape) != tuple(target[k].shape)]
    return {"ok": not missing and not mismatched, "transferred": len(needed) - len(missing) - len(mismatched),
            "needed": len(needed), "missing": missing, "mismatched": mismatched,
            "unused": [k for k in source if k not in target],
            "fresh": [k for k in target if SKIP in k]}


def explain(report: dict) -> List[str]:
    """Plain-language lines for a comparison report."""
    if report["ok"]:
        return [f"OK: all {report['needed']} U-Net tensors are in the checkpoint with the right shapes; "
                f"{len(report['fresh'])} task-specific tensors (.seg_layers.) start from their initialisation."]
    lines = [f"INCOMPATIBLE: {len(report['mismatched'])} tensors differ in shape and {len(report['missing'])} are "
             f"missing (of {report['needed']} that must transfer)."]
    first = report["mismatched"][0] if report["mismatched"] else None
    if first is not None and first[0].startswith("encoder.stages.0.") and "conv.weight" in first[0] \
            and first[1][0] == first[2][0] and first[1][1] != first[2][1]:
        lines.append(f"- the number of input channels differs: checkpoint {first[1][1]}, network {first[2][1]}")
    if report["mismatched"]:
        widths = {(a[0], b[0]) for _, a, b in report["mismatched"] if a and b and a[0] != b[0]}
        if widths:
            lines.append("- the network widths (features per stage) differ: "
                         + ", ".join(f"{a} vs {b}" for a, b in sorted(widths)[:4]))
        kernels = {k for k, a, b in report["mismatched"] if len(a) == len(b) and a[2:] != b[2:]}
        if kernels:
            lines.append(f"- kernel sizes or strides differ in {len(kernels)} layers (different topology)")
    if report["missing"]:
        lines.append(f"- {len(report['missing'])} tensors do not exist in the checkpoint (e.g. "
                     f"{report['missing'][0]}): the target has more stages/blocks or another architecture")
    for k, a, b in report["mismatched"][:8]:
        lines.append(f"  {k}: checkpoint {a}, network {b}")
    lines.append("Fix: plan the target dataset with the same planner as the pretraining dataset and a fixed "
                 "architecture (nnunet-ssl plan -d B -pl nnUNetPlannerFixed), or copy the pretraining plans with "
                 "nnUNetv2_move_plans_between_datasets, then preprocess and fine-tune with those plans.")
    return lines


def check_weights(checkpoint: str, dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                  trainer: str = "nnUNetTrainer") -> dict:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file

    folder = Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(dataset)
    plans_file = folder / f"{plans}.json"
    if not plans_file.exists():
        raise SystemExit(f"{plans_file} does not exist: plan dataset {dataset} first (nnUNetv2_plan_and_preprocess "
                         f"or nnunet-ssl plan), or pass the right -p")
    pm = PlansManager(str(plans_file))
    if configuration not in pm.available_configurations:
        raise SystemExit(f"configuration {configuration!r} is not in {plans_file.name}; available: "
                         f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    cls = recursive_find_trainer_class_by_name(trainer)
    net = cls.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                         pm.get_label_manager(dataset_json).num_segmentation_heads, True)
    source = load_checkpoint_file(checkpoint, "cpu")["network_weights"]
    return compare_state_dicts(source, net.state_dict())
