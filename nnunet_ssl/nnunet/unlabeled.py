"""Image-only (unlabelled) cases for pretraining.

``add_unlabeled`` preprocesses image-only cases with nnU-Net's own preprocessor for a dataset's plans and
configuration and writes them in nnU-Net's on-disk format to

    nnUNet_preprocessed/DatasetXXX/nnunet_ssl_unlabeled/<data_identifier>/   (e.g. nnUNetPlans_3d_fullres)

next to, not inside, the ``<data_identifier>`` folder that nnU-Net's segmentation training, splitting and
fine-tuning read; so only pretraining trainers (which add them to their training cases through
``CombinedDataset``) ever see them. Each case is written to a staging folder and moved into place with its data file
(the file nnU-Net lists a case by) last, so an interrupted run never leaves a half case that looks complete.
Without a label nnU-Net's preprocessor stores the nonzero mask (0 inside the image, -1 outside) as ``_seg``, exactly
what it does for test cases; the pretraining loader never reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence

from batchgenerators.utilities.file_and_folder_operations import (
    isdir,
    isfile,
    join,
    load_json,
    load_pickle,
    write_pickle,
)

UNLABELED_DIRNAME = "nnunet_ssl_unlabeled"
# key in each unlabelled case's properties (.pkl): preprocessing signature and source files, for re-runs
PROPERTIES_KEY = "nnunet_ssl_unlabeled"
# files nnU-Net lists a preprocessed case by (blosc2 and the older numpy format); moved last
_CASE_DATA_SUFFIXES = (".b2nd", ".npz")


class UnlabeledCasesError(ValueError):
    """A problem with the user's input that the message explains in one line, with the fix."""


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return join(preprocessed_dataset_folder_base, UNLABELED_DIRNAME, data_identifier)


def scan_image_folder(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Case id -> its image files (one per channel, in channel order) of a folder named like nnU-Net's imagesTr
    (CASE_0000<file_ending>, CASE_0001...). Files with another ending are ignored."""
    if not isdir(folder):
        raise UnlabeledCasesError(f"image folder {folder} does not exist")
    pattern = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending))
    channels_of: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(file_ending) or name.startswith("."):
            continue
        match = pattern.fullmatch(name)
        if match is None:
            raise UnlabeledCasesError(f"{name} in {folder} is not named like an nnU-Net image "
                                      f"(CASE_0000{file_ending}, one file per channel): rename or remove it")
        case, channel = match["case"], int(match["channel"])
        if channel >= num_channels:
            raise UnlabeledCasesError(f"{name} in {folder} is channel {channel}, but the dataset has {num_channels} "
                                      f"channel(s) (_0000.._{num_channels - 1:04d}): remove or rename it")
        if case.endswith("_seg"):  # nnU-Net's preprocessed format reserves CASE_seg.* for the segmentation
            raise UnlabeledCasesError(f"case id {case} ({name} in {folder}) ends in '_seg', which nnU-Net's "
                                      f"preprocessed format reserves: rename its files")
        channels_of.setdefault(case, {})[channel] = join(folder, name)
    if not channels_of:
        raise UnlabeledCasesError(f"no images named CASE_0000{file_ending} in {folder}")
    for case, channels in channels_of.items():
        missing = [f"{case}_{c:04d}{file_ending}" for c in range(num_channels) if c not in channels]
        if missing:
            raise UnlabeledCasesError(f"case {case} in {folder} lacks {', '.join(missing)} (the dataset has "
                                      f"{num_channels} channels): add the missing file(s) or remove the case")
    return {case: [channels_of[case][c] for c in range(num_channels)] for case in sorted(channels_of)}


def preprocessing_signature(plans_manager, configuration_manager) -> str:
    """Hash of everything in the plans that determines a preprocessed case: a changed plan makes cases stale."""
    relevant = {"configuration": configuration_manager.configuration,
                "transpose_forward": plans_manager.transpose_forward,
                "intensity": plans_manager.foreground_intensity_properties_per_channel,
                "reader": plans_manager.plans.get("image_reader_writer")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_stamp(image_files: Sequence[str]) -> list[list]:
    stamp = []
    for f in image_files:
        st = os.stat(f)
        stamp.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return stamp


def _stored_record(folder: str, case: str) -> dict | None:
    """The nnunet_ssl record of a complete preprocessed case; None when the case is absent or unreadable."""
    if not any(isfile(join(folder, case + s)) for s in _CASE_DATA_SUFFIXES) or not isfile(join(folder, case + ".pkl")):
        return None
    try:
        return load_pickle(join(folder, case + ".pkl")).get(PROPERTIES_KEY)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError):  # a damaged file is redone, not trusted
        return None


def _preprocess_case(preprocessor, case: str, image_files: list[str], plans_manager, configuration_manager,
                     dataset_json: dict, output_folder: str, signature: str) -> str:
    """nnU-Net's own run_case_save without a segmentation, into a staging folder, then moved into place."""
    staging = tempfile.mkdtemp(prefix=f".{case}.tmp-", dir=os.path.dirname(output_folder))
    try:
        truncated = join(staging, case)
        try:
            preprocessor.run_case_save(truncated, image_files, None, plans_manager, configuration_manager,
                                       dataset_json)
        except Exception as e:
            raise RuntimeError(f"preprocessing unlabelled case {case} ({image_files[0]}) failed: "
                               f"{type(e).__name__}: {e}") from e
        properties = load_pickle(truncated + ".pkl")
        properties[PROPERTIES_KEY] = {"signature": signature, "source": _source_stamp(image_files)}
        write_pickle(properties, truncated + ".pkl")
        written = sorted(os.listdir(staging))
        data_files = [f for f in written if f in {case + s for s in _CASE_DATA_SUFFIXES}]
        # an old version disappears from nnU-Net's case list before its other files are replaced
        for suffix in _CASE_DATA_SUFFIXES:
            if isfile(join(output_folder, case + suffix)):
                os.remove(join(output_folder, case + suffix))
        for name in [f for f in written if f not in data_files] + data_files:
            os.replace(join(staging, name), join(output_folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return case


def labelled_case_ids(dataset_name: str, dataset_json: dict, data_identifiers: Sequence[str]) -> set:
    """Ids of the dataset's labelled training cases: its preprocessed configuration folders and its raw imagesTr."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    ids = set()
    for identifier in data_identifiers:
        folder = join(str(nnUNet_preprocessed), dataset_name, identifier)
        if isdir(folder) and os.listdir(folder):
            ids.update(infer_dataset_class(folder).get_identifiers(folder))
    if "dataset" in dataset_json:  # dataset.json lists its cases explicitly
        ids.update(dataset_json["dataset"].keys())
    elif nnUNet_raw.is_set() and isdir(join(str(nnUNet_raw), dataset_name, "imagesTr")):
        ids.update(get_identifiers_from_splitted_dataset_folder(join(str(nnUNet_raw), dataset_name, "imagesTr"),
                                                                dataset_json["file_ending"]))
    return ids


def add_unlabeled(dataset_name_or_id, input_folder: str | None = None,
                  configurations: Sequence[str] = ("3d_fullres",), plans_identifier: str = "nnUNetPlans",
                  num_processes: int = 2, overwrite: bool = False, verbose: bool = True) -> dict[str, dict]:
    """Preprocess the image-only cases of ``input_folder`` (default: the dataset's imagesTs) for pretraining.

    Returns, per configuration, ``{"folder", "preprocessed": [ids], "up_to_date": [ids], "total": n}``. Cases whose
    preprocessed version is up to date (same source files, same plans) are skipped; ``overwrite`` redoes all and
    replaces cases of the same id added from other files."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import (
        maybe_convert_to_dataset_name,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not nnUNet_preprocessed.is_set():
        raise UnlabeledCasesError("nnUNet_preprocessed is not set: export it as for nnU-Net")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError):
        raise UnlabeledCasesError(f"dataset {dataset_name_or_id} not found in nnUNet_raw, nnUNet_preprocessed or "
                                  f"nnUNet_results") from None
    base = join(str(nnUNet_preprocessed), dataset_name)
    plans_file = join(base, plans_identifier + ".json")
    if not isfile(plans_file) or not isfile(join(base, "dataset.json")):
        found = sorted(f[:-5] for f in os.listdir(base) if f.endswith(".json") and f not in
                       ("dataset.json", "dataset_fingerprint.json", "splits_final.json")) if isdir(base) else []
        raise UnlabeledCasesError(
            f"{dataset_name} is not planned with {plans_identifier} ({plans_file} does not exist"
            f"{'; found plans: ' + ', '.join(found) if found else ''}): run nnUNetv2_plan_and_preprocess -d "
            f"{dataset_name_or_id} (or nnunet-ssl plan -d {dataset_name_or_id} -pl PLANNER) first, or pass -p")
    plans_manager = PlansManager(plans_file)
    dataset_json = load_json(join(base, "dataset.json"))
    unknown = [c for c in configurations if c not in plans_manager.available_configurations]
    if unknown:
        raise UnlabeledCasesError(f"configuration {unknown[0]} is not in {plans_identifier} of {dataset_name} "
                                  f"(available: {', '.join(plans_manager.available_configurations)})")

    if input_folder is None:
        input_folder = join(str(nnUNet_raw), dataset_name, "imagesTs") if nnUNet_raw.is_set() else None
        if input_folder is None or not isdir(input_folder):
            raise UnlabeledCasesError(f"no -i given and {dataset_name} has no imagesTs folder in nnUNet_raw: pass "
                                      f"-i FOLDER with the image-only cases (CASE_0000{dataset_json['file_ending']})")
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
    cases = scan_image_folder(input_folder, dataset_json["file_ending"], len(channel_names))

    configuration_managers = {}  # one preprocessing per data identifier (e.g. 3d_cascade_fullres shares 3d_fullres')
    for c in configurations:
        cm = plans_manager.get_configuration(c)
        configuration_managers.setdefault(cm.data_identifier, (c, cm))
    labelled = labelled_case_ids(dataset_name, dataset_json, list(configuration_managers))
    clashes = sorted(set(cases) & labelled)
    if clashes:
        c = clashes[0]
        raise UnlabeledCasesError(
            f"case {c} in {input_folder} has the id of a labelled training case of {dataset_name} "
            f"({len(clashes)} clashing case(s)): rename its files (e.g. {c}_unlabeled_0000{dataset_json['file_ending']}"
            f") or remove it")

    summary = {}
    for data_identifier, (configuration, cm) in configuration_managers.items():
        out = unlabeled_folder(base, data_identifier)
        os.makedirs(out, exist_ok=True)
        signature = preprocessing_signature(plans_manager, cm)
        todo, up_to_date = [], []
        for case, files in cases.items():
            record = _stored_record(out, case)
            if record is not None and not overwrite:
                stored_paths = [s[0] for s in record.get("source", [])]
                if stored_paths and stored_paths != [os.path.abspath(f) for f in files]:
                    raise UnlabeledCasesError(
                        f"unlabelled case {case} was already added from {stored_paths[0]}, not "
                        f"{files[0]}: rename one of them, or pass --overwrite to replace it")
                if record.get("signature") == signature and record.get("source") == _source_stamp(files):
                    up_to_date.append(case)
                    continue
            todo.append(case)
        if verbose:
            print(f"{dataset_name} {configuration} ({plans_identifier}): preprocessing {len(todo)} unlabelled "
                  f"case(s), {len(up_to_date)} already up to date", flush=True)
        preprocessor = cm.preprocessor_class(verbose=False)
        jobs = [(preprocessor, case, cases[case], plans_manager, cm, dataset_json, out, signature) for case in todo]
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                _preprocess_case(*job)
        else:
            import multiprocessing
            # spawn, as nnU-Net's preprocessing: forked workers can hang on threads the parent has started
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                pool.starmap(_preprocess_case, jobs)
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        total = len(infer_dataset_class(out).get_identifiers(out))
        summary[configuration] = {"folder": out, "preprocessed": todo, "up_to_date": up_to_date, "total": total}
        if verbose:
            print(f"  -> {out} ({total} unlabelled case(s) in total)", flush=True)
    return summary


class CombinedDataset:
    """Several nnU-Net datasets as one for the pretraining loader: ``identifiers`` lists every case, ``load_case``
    reads each from the dataset that holds it (what nnU-Net's DataLoader and TwoViewDataLoader use)."""

    def __init__(self, *datasets):
        self.datasets = datasets
        self._dataset_of = {}
        for dataset in datasets:
            for identifier in dataset.identifiers:
                if identifier in self._dataset_of:
                    raise UnlabeledCasesError(
                        f"case id {identifier} is in both {self._dataset_of[identifier].source_folder} and "
                        f"{dataset.source_folder}: rename the unlabelled case and re-run nnunet-ssl add-unlabeled")
                self._dataset_of[identifier] = dataset
        self.identifiers = sorted(self._dataset_of)
        self.source_folder = datasets[0].source_folder

    def load_case(self, identifier):
        return self._dataset_of[identifier].load_case(identifier)

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def __len__(self):
        return len(self.identifiers)


def load_unlabeled_dataset(preprocessed_dataset_folder_base: str, plans_manager, configuration_manager):
    """nnU-Net dataset of the unlabelled cases added for these plans and configuration; None when there are none.

    Refuses cases preprocessed with other plans than the current ones (re-planning changes normalisation,
    spacing or patch size)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = unlabeled_folder(preprocessed_dataset_folder_base, configuration_manager.data_identifier)
    if not isdir(folder) or not any(f.endswith(_CASE_DATA_SUFFIXES) for f in os.listdir(folder)):
        return None
    dataset = infer_dataset_class(folder)(folder)
    signature = preprocessing_signature(plans_manager, configuration_manager)
    stale = [i for i in dataset.identifiers if (_stored_record(folder, i) or {}).get("signature") != signature]
    if stale:
        raise UnlabeledCasesError(
            f"{len(stale)} unlabelled case(s) in {folder} (e.g. {stale[0]}) were preprocessed with other plans than "
            f"the current {plans_manager.plans_name}: re-run nnunet-ssl add-unlabeled -d {plans_manager.dataset_name}"
            f" -p {plans_manager.plans_name} -i FOLDER (or delete {folder})")
    return dataset
