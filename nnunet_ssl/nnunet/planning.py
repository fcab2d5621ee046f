"""nnU-Net planning + preprocessing with a planner class that nnU-Net's own ``-pl`` cannot find."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional, Sequence

from batchgenerators.utilities.file_and_folder_operations import isfile, join


def find_planner(name: str):
    """A planner of this plugin (planners/) or of nnU-Net itself, by class name."""
    from nnunet_ssl.planners import PLANNERS
    if name in PLANNERS:
        return PLANNERS[name]
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise ValueError(f"unknown planner {name!r}; plugin planners: {', '.join(sorted(PLANNERS))} "
                         f"(nnU-Net's own, e.g. ExperimentPlanner, nnUNetPlannerResEncM, also work)")
    return cls


@contextmanager
def _without_zero_da_workers():
    """nnUNet_n_proc_DA=0 (single-threaded training) makes nnU-Net's preprocessing call torch.set_num_threads(0);
    it only concerns training, so hide it while planning."""
    value = os.environ.get("nnUNet_n_proc_DA")
    if value is not None and value.strip() == "0":
        del os.environ["nnUNet_n_proc_DA"]
    try:
        yield
    finally:
        if value is not None:
            os.environ["nnUNet_n_proc_DA"] = value


def plan_and_preprocess(dataset_id: int, planner: str = "ExperimentPlanner",
                        configurations: Sequence[str] = ("3d_fullres",), num_processes: int = 2,
                        plans_name: Optional[str] = None, gpu_memory_target_in_gb: Optional[float] = None,
                        verify_dataset_integrity: bool = False, verbose: bool = False) -> str:
    """Fingerprint (reused when present), plan with ``planner``, preprocess ``configurations``.

    Returns the plans identifier (pass it to ``nnUNetv2_train -p``)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset,
                                                                      preprocess_dataset)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    planner_cls = find_planner(planner)
    name = maybe_convert_to_dataset_name(dataset_id)
    fingerprint = join(str(nnUNet_preprocessed), name, "dataset_fingerprint.json")
    with _without_zero_da_workers():
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes,
                                    check_dataset_integrity=verify_dataset_integrity,
                                    clean=not isfile(fingerprint), verbose=verbose, show_progress_bar=verbose)
        _, plans_identifier = plan_experiment_dataset(dataset_id, planner_cls, gpu_memory_target_in_gb,
                                                      overwrite_plans_name=plans_name)
        if configurations:
            preprocess_dataset(dataset_id, plans_identifier, list(configurations),
                               [num_processes] * len(configurations), verbose=verbose, show_progress_bar=verbose)
    return plans_identifier
