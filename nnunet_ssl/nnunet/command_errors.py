"""One-line errors, naming the problem and the fix, for bad input to ``nnUNetv2_train`` and ``nnUNetv2_predict``.

nnU-Net's own errors for these cases are long multi-line messages, raw ``FileNotFoundError``s on a plans file,
bare assertions, or failures much later than the cause. The plugin's start-up hook (``nnunet_ssl._startup``)
applies the patches below right after nnU-Net's modules are imported, in every Python process (spawned DDP workers
included; ``NNUNET_SSL_NO_AUTOREGISTER=1`` switches it off):

* ``nnunetv2.run.run_training``: ``get_trainer_from_args`` checks the nnU-Net paths, the dataset, its plans, the
  configuration and the preprocessed data before nnU-Net builds the trainer (only folders and JSON files are
  read), and lists the trainers that exist when the requested one is unknown; ``maybe_load_checkpoint`` explains
  ``-pretrained_weights`` that do not fit the network; ``run_training_entry`` prints these errors as one line.
* ``nnunetv2.inference.predict_from_raw_data``: ``get_output_folder`` checks the dataset and that the trained
  model folder exists; ``predict_entry_point`` prints these errors as one line.

A failure the checks do not recognise keeps nnU-Net's own error. Every message is a :class:`BadInputError`
(a ``RuntimeError``) whose text is one line."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# files in a preprocessed dataset folder that are not plans
NOT_PLANS = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}
# nnU-Net's error when a trainer class is not found (nnunetv2/utilities/find_objects.py)
NNUNET_TRAINER_NOT_FOUND = "Could not find requested nnunet trainer"
PATCH_MARK = "_nnunet_ssl_patched"


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


# ---------------------------------------------------------------------------------------------------- trainers
def nnunet_trainer_names() -> list[str]:
    """Trainer classes shipped with nnU-Net, read from its source (no import: the lookup that just failed has
    imported them already, and this must also work when an import is broken)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        return []
    return _class_names_in(Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer")


def external_trainer_names() -> list[str]:
    """Trainer classes in the user's own ``nnUNet_extTrainer`` folders (the plugin's discovery folder excluded)."""
    from nnunet_ssl._startup import discovery_folder

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


# ---------------------------------------------------------------------------------------------------- datasets
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


# ---------------------------------------------------------------------------------------------------- weights
def pretrained_weights_message(network, weights_file: str, trainer=None) -> str | None:
    """Why ``weights_file`` cannot initialise ``network`` (nnU-Net's -pretrained_weights rule), or None if it can."""
    from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file
    from nnunet_ssl.nnunet.weights import SKIP, compare_state_dicts, explain

    try:
        source = load_checkpoint_file(weights_file, "cpu")["network_weights"]
    except (FileNotFoundError, ValueError) as error:
        return _one_line(f"-pretrained_weights: {error}")
    module = getattr(network, "module", network)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    target = module.state_dict()
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


# ---------------------------------------------------------------------------------------------------- prediction
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


# ---------------------------------------------------------------------------------------------------- patches
def _mark(function):
    setattr(function, PATCH_MARK, True)
    return function


def _already_patched(function) -> bool:
    return getattr(function, PATCH_MARK, False)


def _one_line_exit(entry_point, program: str):
    """Command-line entry point that prints a BadInputError as one line (exit code 1) instead of a traceback."""

    @functools.wraps(entry_point)
    def run_command(*args, **kwargs):
        try:
            return entry_point(*args, **kwargs)
        except BadInputError as error:
            sys.exit(f"{program}: error: {error}")

    return _mark(run_command)


def patch_run_training(module) -> None:
    """Applied to ``nnunetv2.run.run_training`` right after it has been imported."""
    if _already_patched(module.get_trainer_from_args):
        return
    original_get_trainer = module.get_trainer_from_args
    signature = inspect.signature(original_get_trainer)

    @functools.wraps(original_get_trainer)
    def get_trainer_from_args(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        given = arguments.arguments
        check_training_input(given["dataset_name_or_id"], given["configuration"], given["plans_identifier"])
        try:
            return original_get_trainer(*args, **kwargs)
        except RuntimeError as error:
            if NNUNET_TRAINER_NOT_FOUND not in str(error):
                raise
            raise BadInputError(unknown_trainer_message(given["trainer_name"], plugin_trainer_names(),
                                                        nnunet_trainer_names(), external_trainer_names())) from None

    original_load = module.maybe_load_checkpoint

    @functools.wraps(original_load)
    def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
        try:
            return original_load(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)
        except Exception:
            if pretrained_weights_file is None or continue_training or getattr(nnunet_trainer, "network",
                                                                               None) is None:
                raise
            message = pretrained_weights_message(nnunet_trainer.network, pretrained_weights_file, nnunet_trainer)
            if message is None:
                raise
            raise BadInputError(message) from None

    module.get_trainer_from_args = _mark(get_trainer_from_args)
    module.maybe_load_checkpoint = _mark(maybe_load_checkpoint)
    module.run_training_entry = _one_line_exit(module.run_training_entry, "nnUNetv2_train")


def patch_predict(module) -> None:
    """Applied to ``nnunetv2.inference.predict_from_raw_data`` right after it has been imported (there,
    ``get_output_folder`` only locates the trained model of ``nnUNetv2_predict``)."""
    if _already_patched(module.get_output_folder):
        return
    original_output_folder = module.get_output_folder

    @functools.wraps(original_output_folder)
    def get_output_folder(dataset_name_or_id, trainer_name="nnUNetTrainer", plans_identifier="nnUNetPlans",
                          configuration="3d_fullres", fold=None):
        dataset_name = resolve_dataset(dataset_name_or_id, ("nnUNet_results",))
        folder = original_output_folder(dataset_name, trainer_name, plans_identifier, configuration, fold)
        check_model_folder(folder if fold is None else os.path.dirname(folder), dataset_name)
        return folder

    module.get_output_folder = _mark(get_output_folder)
    module.predict_entry_point = _one_line_exit(module.predict_entry_point, "nnUNetv2_predict")
