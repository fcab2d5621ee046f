"""``nnunet-ssl add-unlabeled``: image-only cases preprocessed with a dataset's plans join the training cases of the
pretraining trainers (not their validation), and never the cases of nnU-Net's or the plugin's fine-tuning trainers.
A tiny phantom dataset (plugin's tiny planner) plus an image-only folder; real commands where the user runs them."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BIN, clean_env, phantom_workspace, run

DATASET = 994
NAME = f"Dataset{DATASET}_Unlabeled"
PLANS = "nnUNetPlansTiny"
NUM_LABELLED = 5
EXTRA = ["copy_of_000", "extra_000", "extra_001"]  # the image-only folder: a labelled image under a new id + 2 new
TEST_CASES = ["phantom_005", "phantom_006"]  # the phantom's imagesTs (the command's default folder)


def _nnunet_env(monkeypatch, root):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(name, clean_env(root)[name])


def _write_image(array, path):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def _cli_error(args, env):
    """Run ``nnunet-ssl add-unlabeled`` expecting a refusal; its one-line message."""
    res = subprocess.run([str(BIN / "nnunet-ssl"), "add-unlabeled", *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    message = res.stderr.strip()
    assert message.startswith("nnunet-ssl add-unlabeled: ") and "\n" not in message, res.stderr
    return message


# ---------------------------------------------------------------------------------------------- no planning needed
def test_image_folder_scan_names_the_missing_channel_and_bad_files(tmp_path):
    from nnunet_ssl.nnunet.unlabeled import UnlabeledCasesError, scan_image_folder
    for name in ("a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "notes.txt"):
        (tmp_path / name).touch()
    with pytest.raises(UnlabeledCasesError, match=r"case b in .* lacks b_0001\.nii\.gz"):
        scan_image_folder(str(tmp_path), ".nii.gz", 2)
    (tmp_path / "b_0001.nii.gz").touch()
    cases = scan_image_folder(str(tmp_path), ".nii.gz", 2)
    assert list(cases) == ["a", "b"]
    assert [os.path.basename(f) for f in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]  # channel order
    (tmp_path / "b_0002.nii.gz").touch()
    with pytest.raises(UnlabeledCasesError, match="b_0002.nii.gz .* is channel 2, but the dataset has 2"):
        scan_image_folder(str(tmp_path), ".nii.gz", 2)
    (tmp_path / "b_0002.nii.gz").unlink()
    (tmp_path / "scan.nii.gz").touch()
    with pytest.raises(UnlabeledCasesError, match="scan.nii.gz .* is not named like an nnU-Net image"):
        scan_image_folder(str(tmp_path), ".nii.gz", 2)


def test_unplanned_dataset_is_refused(tmp_path):
    raw = tmp_path / "raw" / "Dataset995_NotPlanned"
    (raw / "imagesTs").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    (tmp_path / "preprocessed").mkdir()
    message = _cli_error(["-d", 995], clean_env(tmp_path))
    assert "Dataset995_NotPlanned is not planned with nnUNetPlans" in message
    assert "nnUNetv2_plan_and_preprocess -d 995" in message and "nnunet-ssl plan" in message


# ---------------------------------------------------------------------------------------------- planned phantom
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    from nnunet_ssl.phantom import generate_case
    phantom_workspace(root, DATASET, "Unlabeled", num_train=NUM_LABELLED, num_test=len(TEST_CASES),
                      shape=(32, 32, 32), seed=4)
    run([BIN / "nnunet-ssl", "plan", "-d", DATASET, "-pl", "nnUNetPlannerTiny", "-c", "3d_fullres", "-np", 1],
        clean_env(root))
    extra = root / "image_only"
    extra.mkdir()
    shutil.copy(root / "raw" / NAME / "imagesTr" / "phantom_000_0000.nii.gz", extra / "copy_of_000_0000.nii.gz")
    for i in range(2):
        image, _ = generate_case(np.random.default_rng([99, i]), (32, 32, 32))
        _write_image(image[0], extra / f"extra_{i:03d}_0000.nii.gz")
    return root


def _folders(root):
    pre = root / "preprocessed" / NAME
    return pre / f"{PLANS}_3d_fullres", pre / "nnunet_ssl_unlabeled" / f"{PLANS}_3d_fullres"


def _blosc2(folder):
    from nnunetv2.training.dataloading.nnunet_dataset import (
        infer_dataset_class,
        nnUNetDatasetBlosc2,
    )
    assert infer_dataset_class(str(folder)) is nnUNetDatasetBlosc2
    return nnUNetDatasetBlosc2(str(folder))


def _trainer(cls, root, fold):
    pre = root / "preprocessed" / NAME
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["continue_training"] = False
    return cls(plans, "3d_fullres", fold, json.loads((pre / "dataset.json").read_text()), device=torch.device("cpu"))


@pytest.mark.slow
def test_add_unlabeled_preprocesses_like_nnunet_and_reruns_idempotently(workspace, monkeypatch):
    root = workspace
    res = run([BIN / "nnunet-ssl", "add-unlabeled", "-d", DATASET, "-i", root / "image_only", "-p", PLANS,
               "-np", 2], clean_env(root))
    assert "preprocessing 3 unlabelled case(s), 0 already up to date" in res.stdout
    labelled_folder, unlabeled_folder = _folders(root)
    unlabeled, labelled = _blosc2(unlabeled_folder), _blosc2(labelled_folder)
    assert unlabeled.identifiers == EXTRA
    assert labelled.identifiers == [f"phantom_{i:03d}" for i in range(NUM_LABELLED)], "labelled data untouched"
    assert not [p for p in unlabeled_folder.parent.iterdir() if p.name.startswith(".")], "staging folders left"

    # the same image gives exactly what nnU-Net's preprocessing gave the labelled case
    data_u, seg_u, _, props_u = unlabeled.load_case("copy_of_000")
    data_l, _, _, props_l = labelled.load_case("phantom_000")
    assert data_u.shape == data_l.shape
    np.testing.assert_allclose(data_u[:], data_l[:], rtol=0, atol=1e-6)
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(props_u[key]), np.asarray(props_l[key])), key
    # no label: the stored 'segmentation' is nnU-Net's nonzero mask (0 / -1), and no foreground locations exist
    assert set(np.unique(seg_u[:]).tolist()) <= {0, -1} and "class_locations" not in props_u

    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(str(root / "preprocessed" / NAME / f"{PLANS}.json")).get_configuration("3d_fullres")
    for case in EXTRA[1:]:
        data, _, _, props = unlabeled.load_case(case)
        expected = compute_new_shape(props["shape_after_cropping_and_before_resampling"], props["spacing"],
                                     cm.spacing)
        assert data.shape == (1, *expected) and np.isfinite(data[:]).all()
        assert abs(float(np.mean(data[:]))) < 0.5  # z-scored like the labelled cases

    # a re-run skips the finished cases; without -i the dataset's imagesTs is added
    _nnunet_env(monkeypatch, root)
    from nnunet_ssl.nnunet.unlabeled import add_unlabeled
    mtimes = {p.name: p.stat().st_mtime_ns for p in unlabeled_folder.iterdir()}
    again = add_unlabeled(DATASET, str(root / "image_only"), ["3d_fullres"], PLANS, num_processes=1)["3d_fullres"]
    assert again["preprocessed"] == [] and again["up_to_date"] == EXTRA
    assert {p.name: p.stat().st_mtime_ns for p in unlabeled_folder.iterdir()} == mtimes
    default = add_unlabeled(DATASET, None, ["3d_fullres"], PLANS, num_processes=1)["3d_fullres"]
    assert default["preprocessed"] == TEST_CASES and default["total"] == len(EXTRA) + len(TEST_CASES)


@pytest.mark.slow
def test_pretraining_trains_on_unlabelled_cases_and_finetuning_never_sees_them(workspace, monkeypatch):
    root = workspace
    _, unlabeled_folder = _folders(root)
    # the unlabelled cases (idempotent: a no-op when the test above already added them)
    _nnunet_env(monkeypatch, root)
    from nnunet_ssl.nnunet.unlabeled import add_unlabeled
    add_unlabeled(DATASET, str(root / "image_only"), ["3d_fullres"], PLANS, num_processes=1)
    add_unlabeled(DATASET, None, ["3d_fullres"], PLANS, num_processes=1)
    assert len(list(unlabeled_folder.glob("*.pkl"))) == len(EXTRA) + len(TEST_CASES)
    unlabelled = set(EXTRA + TEST_CASES)
    labelled = {f"phantom_{i:03d}" for i in range(NUM_LABELLED)}

    res = run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", "SpadePretrainTrainer_smoke", "-p", PLANS,
               "-device", "cpu"], clean_env(root))
    assert (f"pretraining cases: {NUM_LABELLED - 1} labelled + {len(unlabelled)} unlabelled (from "
            f"{unlabeled_folder}) for training, 1 labelled for validation") in res.stdout
    out = root / "results" / NAME / f"SpadePretrainTrainer_smoke__{PLANS}__3d_fullres" / "fold_0"
    assert (out / "checkpoint_final.pth").exists()

    _nnunet_env(monkeypatch, root)
    from nnunet_ssl.trainers import SpadePretrainTrainer_smoke
    pretrainer = _trainer(SpadePretrainTrainer_smoke, root, 0)
    dataset_tr, dataset_val = pretrainer.get_tr_and_val_datasets()
    assert unlabelled <= set(dataset_tr.identifiers) and not unlabelled & set(dataset_val.identifiers)
    assert set(dataset_tr.identifiers) | set(dataset_val.identifiers) == labelled | unlabelled

    # the loader draws them: a few batches of the pretraining loader contain unlabelled cases
    np.random.seed(0)
    pretrainer.initialize()
    gen_tr, _ = pretrainer.get_dataloaders()
    drawn = {key for _ in range(6) for key in next(gen_tr)["keys"]}
    assert drawn & unlabelled and drawn & labelled, drawn

    class NoUnlabelled(SpadePretrainTrainer_smoke):
        use_unlabeled = False
    assert set(_trainer(NoUnlabelled, root, "all").get_tr_and_val_datasets()[0].identifiers) == labelled

    from nnunet_ssl.trainers import PDCRTrainer_smoke, nnUNetTrainerFinetune_smoke
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for cls in (nnUNetTrainer, nnUNetTrainerFinetune_smoke, PDCRTrainer_smoke):
        for fold in (0, "all"):
            tr, val = _trainer(cls, root, fold).get_tr_and_val_datasets()
            assert set(tr.identifiers) | set(val.identifiers) == labelled, (cls.__name__, fold)
    splits = json.loads((root / "preprocessed" / NAME / "splits_final.json").read_text())
    assert all(set(s["train"]) | set(s["val"]) == labelled for s in splits)


@pytest.mark.slow
def test_clashing_conflicting_and_stale_cases_are_refused(workspace, monkeypatch, tmp_path):
    root = workspace
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(root / "raw" / NAME / "imagesTr" / "phantom_001_0000.nii.gz", clash / "phantom_001_0000.nii.gz")
    message = _cli_error(["-d", DATASET, "-i", clash, "-p", PLANS], clean_env(root))
    assert "case phantom_001" in message and "labelled training case" in message and "rename its files" in message

    _nnunet_env(monkeypatch, root)
    from nnunet_ssl.nnunet.unlabeled import (
        UnlabeledCasesError,
        add_unlabeled,
        load_unlabeled_dataset,
    )
    with pytest.raises(UnlabeledCasesError, match=f"not planned with nnUNetPlans .*found plans: {PLANS}"):
        add_unlabeled(DATASET, str(root / "image_only"), ["3d_fullres"], "nnUNetPlans")
    with pytest.raises(UnlabeledCasesError, match="configuration 3d_lowres is not in"):
        add_unlabeled(DATASET, str(root / "image_only"), ["3d_lowres"], PLANS)
    wrong_channel = tmp_path / "wrong_channel"
    wrong_channel.mkdir()
    (wrong_channel / "x_0001.nii.gz").touch()
    with pytest.raises(UnlabeledCasesError, match="x_0001.nii.gz .* is channel 1, but the dataset has 1"):
        add_unlabeled(DATASET, str(wrong_channel), ["3d_fullres"], PLANS)

    # the same id from other files: refused (it would silently replace a case), unless --overwrite
    _, unlabeled_folder = _folders(root)
    if not (unlabeled_folder / "extra_000.b2nd").exists():
        add_unlabeled(DATASET, str(root / "image_only"), ["3d_fullres"], PLANS, num_processes=1)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(root / "image_only" / "extra_000_0000.nii.gz", other / "extra_000_0000.nii.gz")
    with pytest.raises(UnlabeledCasesError, match="extra_000 was already added from .*image_only"):
        add_unlabeled(DATASET, str(other), ["3d_fullres"], PLANS)

    # plans changed after the cases were added: pretraining refuses stale cases instead of mixing preprocessings
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads((root / "preprocessed" / NAME / f"{PLANS}.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    pm = PlansManager(plans)
    with pytest.raises(UnlabeledCasesError, match="preprocessed with other plans .* re-run nnunet-ssl add-unlabeled"):
        load_unlabeled_dataset(str(root / "preprocessed" / NAME), pm, pm.get_configuration("3d_fullres"))


@pytest.mark.slow
def test_interrupted_case_is_invisible_and_redone(workspace, monkeypatch, tmp_path):
    """A crash while moving a case into place (first write, or replacing an older version) leaves nothing that
    nnU-Net would list as a case; the re-run completes it."""
    root = workspace
    _nnunet_env(monkeypatch, root)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_ssl.nnunet import unlabeled as unlabeled_module
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(root / "image_only" / "extra_001_0000.nii.gz", folder / "interrupted_0000.nii.gz")
    _, unlabeled_folder = _folders(root)
    real_replace = os.replace

    def crash_on_properties(src, dst):
        if str(dst).endswith("interrupted.pkl"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    for overwrite in (False, True):  # a new case; then a complete case being replaced
        monkeypatch.setattr(unlabeled_module.os, "replace", crash_on_properties)
        with pytest.raises(OSError, match="simulated crash"):
            unlabeled_module.add_unlabeled(DATASET, str(folder), ["3d_fullres"], PLANS, num_processes=1,
                                           overwrite=overwrite)
        assert "interrupted" not in nnUNetDatasetBlosc2.get_identifiers(str(unlabeled_folder))
        assert not [p for p in unlabeled_folder.parent.iterdir() if p.name.startswith(".")], "staging folder left"
        monkeypatch.setattr(unlabeled_module.os, "replace", real_replace)
        done = unlabeled_module.add_unlabeled(DATASET, str(folder), ["3d_fullres"], PLANS, num_processes=1)
        assert done["3d_fullres"]["preprocessed"] == ["interrupted"]
        assert "interrupted" in nnUNetDatasetBlosc2.get_identifiers(str(unlabeled_folder))
