"""Checks of the input to nnU-Net's commands, each failing with one line that names the problem and the fix
(:class:`BadInputError`): nnU-Net paths, dataset, plans, configuration, preprocessed data, pretrained weights that do
not fit, a trained model folder that does not exist. Used by the patches of ``nnunet_patches`` and by nnunet-ssl's own
commands."""
from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# files in a preprocessed dataset folder that are not plans
NOT_PLANS = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}


class BadInputError(RuntimeError):
    """Bad input to an nnU-Net command; the message (one line) says what is wrong and how to fix it."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def require_paths(names: Iterable[str]) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise BadInputError(f"{', '.join(missing)} not set: export {'them' if len(missing) > 1 else 'it'} as for "
                            f"nnU-Net (e.g. export {missing[0]}=/data/{missing[0]}; see nnU-Net's "
                            f"documentation/setting_up_paths.md)")


def _datasets_in(folder: str | None) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return [d for d in os.listdir(folder) if d.startswith("Dataset") and os.path.isdir(os.path.join(folder, d))]


def resolve_dataset(dataset_name_or_id, required_paths: Iterable[str] = ("nnUNet_preprocessed",)) -> str:
    """The dataset's folder name (``DatasetXXX_Name``), or a BadInputError saying why there is none."""
    require_paths(required_paths)
    text = str(dataset_name_or_id)
    if text.startswith("Dataset"):
        return text
    try:
        dataset_id = int(text)
    except ValueError:
        raise BadInputError(f"dataset '{text}' is neither a dataset id (e.g. 4) nor a dataset folder name "
                            f"(e.g. Dataset004_Hippocampus)") from None
    prefix = f"Dataset{dataset_id:03d}_"
    found = {var: [d for d in _datasets_in(os.environ.get(var)) if d.startswith(prefix)] for var in PATH_VARIABLES}
    candidates = sorted({d for names in found.values() for d in names})
    if len(candidates) == 1:
        return candidates[0]
    where = ", ".join(f"{var}={os.environ.get(var) or '(not set)'}" for var in PATH_VARIABLES)
    if candidates:
        raise BadInputError(f"dataset id {dataset_id} is ambiguous: {', '.join(candidates)} all exist ({where}); "
                            f"pass the full name with -d, or rename/remove one of them")
    existing = sorted({d for var in PATH_VARIABLES for d in _datasets_in(os.environ.get(var))})
    raise BadInputError(f"unknown dataset id {dataset_id}: no {prefix}* folder in {where}; datasets found there: "
                        f"{_listing(existing)}; check -d and the nnUNet_* paths")


def _dataset_id(dataset_name: str) -> str:
    return str(int(dataset_name[7:10])) if dataset_name[7:10].isdigit() else dataset_name


def load_plans(dataset_name: str, plans_identifier: str, configuration: str) -> dict:
    """The plans of a dataset, or a BadInputError when it is not planned (with these plans)."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans_file = folder / f"{plans_identifier}.json"
    dataset_id = _dataset_id(dataset_name)
    plan_it = (f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration} (plugin planners: nnunet-ssl plan "
               f"-d {dataset_id} -pl nnUNetPlannerSmall)")
    if not plans_file.is_file():
        others = sorted(f.stem for f in folder.glob("*.json") if f.name not in NOT_PLANS) if folder.is_dir() else []
        if others:
            raise BadInputError(f"{dataset_name} has no plans '{plans_identifier}' ({plans_file} does not exist); "
                                f"its plans: {', '.join(others)}: pass -p {others[0]}, or create them with {plan_it}")
        raise BadInputError(f"{dataset_name} is not planned ({plans_file} does not exist): run {plan_it}")
    if not (folder / "dataset.json").is_file():
        raise BadInputError(f"{folder / 'dataset.json'} does not exist (planning copies it there): run {plan_it}")
    return json.loads(plans_file.read_text())


def check_configuration(plans: dict, dataset_name: str, plans_identifier: str, configuration: str) -> None:
    available = list(plans.get("configurations", {}))
    if configuration in available:
        return
    if configuration.startswith("3d") and not any(c.startswith("3d") for c in available):
        raise BadInputError(f"{dataset_name} is a 2D dataset: nnU-Net planned no 3D configuration for it "
                            f"({plans_identifier} has: {', '.join(available) or 'none'}); use -c 2d")
    note = " (nnU-Net plans 3d_lowres only for images much larger than the patch)" \
        if configuration in ("3d_lowres", "3d_cascade_fullres") else ""
    raise BadInputError(f"configuration '{configuration}' is not in {plans_identifier} of {dataset_name} "
                        f"(planned: {', '.join(available) or 'none'}); use one of those with -c{note}")


def check_preprocessed(plans: dict, dataset_name: str, plans_identifier: str, configuration: str) -> None:
    """A planned configuration whose preprocessed folder is missing or empty fails much later in nnU-Net."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / data_identifier
    # every preprocessed case has a properties file, whatever the array format (.b2nd, .npz/.npy)
    if folder.is_dir() and any(name.endswith(".pkl") for name in os.listdir(folder)):
        return
    state = "holds no preprocessed case" if folder.is_dir() else "does not exist"
    raise BadInputError(f"configuration '{configuration}' of {dataset_name} is planned ({plans_identifier}) but not "
                        f"preprocessed ({folder} {state}): run nnUNetv2_preprocess -d {_dataset_id(dataset_name)} "
                        f"-plans_name {plans_identifier} -c {configuration}")


def check_training_input(dataset_name_or_id, configuration: str, plans_identifier: str) -> None:
    """Everything nnUNetv2_train needs before a trainer can be built, in the order a user sets it up."""
    dataset_name = resolve_dataset(dataset_name_or_id, ("nnUNet_preprocessed", "nnUNet_results"))
    plans = load_plans(dataset_name, plans_identifier, configuration)
    check_configuration(plans, dataset_name, plans_identifier, configuration)
    check_preprocessed(plans, dataset_name, plans_identifier, configuration)


def pretrained_weights_message(network, weights_file: str, trainer=None) -> str | None:
    """Why ``weights_file`` cannot initialise ``network`` (nnU-Net's -pretrained_weights rule), or None if it can."""
    from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file, unwrapped_network
    from nnunet_ssl.nnunet.weights import SKIP, compare_state_dicts, explain

    try:
        source = load_checkpoint_file(weights_file, "cpu")["network_weights"]
    except (FileNotFoundError, ValueError) as error:
        return _one_line(f"-pretrained_weights: {error}")
    target = unwrapped_network(network).state_dict()
    report = compare_state_dicts(source, target)
    if report["ok"]:
        return None
    first = next(k for k in target if SKIP not in k and (k not in source or source[k].shape != target[k].shape))
    first_text = (f"{first} is {tuple(source[first].shape)} in the checkpoint but {tuple(target[first].shape)} in "
                  f"this network" if first in source else f"{first} is not in the checkpoint")
    reasons = [line[2:] for line in explain(report) if line.startswith("- ")]
    check = "nnunet-ssl check-weights " + weights_file
    if trainer is not None:
        check += (f" -d {trainer.plans_manager.dataset_name} -c {trainer.configuration_name} -p "
                  f"{trainer.plans_manager.plans_name} -tr {type(trainer).__name__}")
    return _one_line(
        f"-pretrained_weights {weights_file} do not fit this network ({len(report['mismatched'])} tensors differ in "
        f"shape, {len(report['missing'])} are missing; first: {first_text}"
        + "".join(f"; {r}" for r in reasons) + "): pretraining and fine-tuning need the same architecture: plan "
        f"both datasets with `nnunet-ssl plan -d ID -pl nnUNetPlannerFixed`, or copy the pretraining plans with "
        f"`nnUNetv2_move_plans_between_datasets`; check with `{check}`")


def check_model_folder(model_folder: str, dataset_name: str) -> None:
    if os.path.isdir(model_folder):
        return
    trained_root = os.path.dirname(model_folder)
    trained = sorted(d for d in os.listdir(trained_root) if "__" in d) if os.path.isdir(trained_root) else []
    wanted = os.path.basename(model_folder)
    close = difflib.get_close_matches(wanted, trained, n=1, cutoff=0.6)
    raise BadInputError(f"no trained model {wanted} for {dataset_name} ({model_folder} does not exist); trained "
                        f"models (TRAINER__PLANS__CONFIGURATION): {_listing(trained)}"
                        + (f"; did you mean {close[0]}?" if close else "") + "; check -tr, -p and -c")
