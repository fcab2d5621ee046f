"""Every change the plugin makes to nnU-Net's own code, in one place (documentation/nnunet_patches.md).

The interpreter start-up hook (``nnunet_ssl._startup``, installed as ``nnunet_ssl.pth``) applies these functions to
nnU-Net's modules right after they are imported, in every Python process (spawned DDP workers included); nothing is
imported up front. ``NNUNET_SSL_NO_AUTOREGISTER=1`` switches the hook off, and with it every patch below. What is
patched, and why (nnU-Net's own errors for these cases are long multi-line messages, raw ``FileNotFoundError``s on a
plans file, bare assertions, or failures much later than the cause):

* ``nnunetv2.run.run_training``: ``get_trainer_from_args`` checks the nnU-Net paths, the dataset, its plans, the
  configuration and the preprocessed data before nnU-Net builds the trainer (only folders and JSON files are
  read), lists the trainers that exist when the requested one is unknown, and applies ``NNUNET_SSL_NUM_THREADS``
  (a cap on torch's threads, ``cpu_fast.apply_thread_limit``) after nnU-Net's ``torch.set_num_threads(cpu_count)``,
  so that it holds for stock trainers too; ``maybe_load_checkpoint`` explains
  ``-pretrained_weights`` that do not fit the network; ``run_training_entry`` prints these errors as one line.
* ``nnunetv2.inference.predict_from_raw_data``: ``get_output_folder`` checks the dataset and that the trained
  model folder exists; ``predict_entry_point`` prints these errors as one line.

A failure the checks do not recognise keeps nnU-Net's own error; a patch that cannot be applied leaves nnU-Net as it
is (with a note on stderr)."""
from __future__ import annotations

import functools
import inspect
import os
import sys

from nnunet_ssl.nnunet.cpu_fast import apply_thread_limit
from nnunet_ssl.nnunet.input_checks import (BadInputError, check_model_folder, check_training_input,
                                            pretrained_weights_message, resolve_dataset)
from nnunet_ssl.nnunet.trainer_names import (external_trainer_names, nnunet_trainer_names, plugin_trainer_names,
                                             unknown_trainer_message)

# nnU-Net's error when a trainer class is not found (nnunetv2/utilities/find_objects.py)
NNUNET_TRAINER_NOT_FOUND = "Could not find requested nnunet trainer"
PATCH_MARK = "_nnunet_ssl_patched"


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
        # after nnU-Net's torch.set_num_threads(cpu_count): the cap holds for every trainer, stock ones included
        try:
            apply_thread_limit()
        except ValueError as error:
            raise BadInputError(str(error)) from None
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
