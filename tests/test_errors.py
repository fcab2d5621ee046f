"""Bad input fails with one line that names the problem and the fix.

Through the real commands (nnUNetv2_train / nnUNetv2_predict in a clean environment, the plugin's start-up hook
patching nnU-Net) where the command is the point; the pure checks in-process."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, TINY_DATASET, TINY_DATASET_ID, clean_env

from nnunet_ssl.nnunet import input_checks, nnunet_patches, trainer_names
from nnunet_ssl.nnunet.input_checks import BadInputError

TINY_PLANS = "nnUNetPlansTiny"


def _fails_with_one_line(cmd, env, *expected) -> str:
    """Runs a command that must fail; returns its last stderr line after checking it is the whole error."""
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = lines[-1]
    assert last.startswith(f"{cmd[0].name}: error: "), last
    for text in expected:
        assert text in last, f"{text!r} not in {last!r}"
    return last


def _train(root, *args, **env):
    return [BIN / "nnUNetv2_train", *args, "-device", "cpu"], clean_env(root, **env)


def _network(plans_file, num_input_channels=1):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(plans_file))
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), num_input_channels, 3,
                                                    True)


# ------------------------------------------------------------------------------------------ nnUNetv2_train
@pytest.mark.slow
def test_unknown_trainer_names_the_close_match_and_the_trainers_that_exist(tiny_dataset):
    _fails_with_one_line(*_train(tiny_dataset, TINY_DATASET_ID, "3d_fullres", "0", "-tr", "SpadePretrainTrainr",
                                 "-p", TINY_PLANS),
                         "unknown trainer 'SpadePretrainTrainr'", "did you mean SpadePretrainTrainer",
                         "plugin trainers: ", " SpadePretrainTrainer,", "nnU-Net's: nnUNetTrainer", "nnunet-ssl trainers")


@pytest.mark.slow
def test_unknown_dataset_id_lists_the_datasets_found(tiny_dataset):
    _fails_with_one_line(*_train(tiny_dataset, 999, "3d_fullres", "0", "-p", TINY_PLANS),
                         "unknown dataset id 999", "Dataset999_*", TINY_DATASET, "check -d")


@pytest.mark.slow
def test_missing_plans_name_the_existing_plans(tiny_dataset):
    _fails_with_one_line(*_train(tiny_dataset, TINY_DATASET_ID, "3d_fullres", "0"),
                         "has no plans 'nnUNetPlans'", f"pass -p {TINY_PLANS}", "nnUNetv2_plan_and_preprocess")


@pytest.mark.slow
def test_configuration_missing_from_the_plans(tiny_dataset):
    _fails_with_one_line(*_train(tiny_dataset, TINY_DATASET_ID, "3d_lowres", "0", "-p", TINY_PLANS),
                         "'3d_lowres' is not in nnUNetPlansTiny", "planned: 2d, 3d_fullres")


@pytest.mark.slow
def test_planned_but_not_preprocessed_gives_the_preprocess_command(tiny_dataset):
    # the fixture planned 2d but preprocessed only 3d_fullres; nnU-Net itself fails much later, obscurely
    _fails_with_one_line(*_train(tiny_dataset, TINY_DATASET_ID, "2d", "0", "-p", TINY_PLANS),
                         "planned (nnUNetPlansTiny) but not preprocessed", "does not exist",
                         f"nnUNetv2_preprocess -d {TINY_DATASET_ID} -plans_name {TINY_PLANS} -c 2d")


@pytest.mark.slow
def test_incompatible_pretrained_weights_name_the_first_mismatch_and_the_fix(tiny_dataset, tmp_path):
    plans_file = tiny_dataset / "preprocessed" / TINY_DATASET / f"{TINY_PLANS}.json"
    weights = tmp_path / "two_channels.pth"  # same plans, but pretrained on 2-channel images
    torch.save({"network_weights": _network(plans_file, num_input_channels=2).state_dict()}, weights)
    _fails_with_one_line(*_train(tiny_dataset, TINY_DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainer_1epoch",
                                 "-p", TINY_PLANS, "-pretrained_weights", weights),
                         "do not fit this network", "first: encoder.stages.0.0.convs.0.conv.weight is (4, 2, 3, 3, 3) "
                         "in the checkpoint but (4, 1, 3, 3, 3)", "number of input channels differs",
                         "nnUNetPlannerFixed", "nnUNetv2_move_plans_between_datasets",
                         f"nnunet-ssl check-weights {weights} -d {TINY_DATASET} -c 3d_fullres -p {TINY_PLANS}")


# ------------------------------------------------------------------------------------------ nnUNetv2_predict
@pytest.mark.slow
def test_predict_with_an_untrained_model_lists_the_trained_ones(tiny_dataset, tmp_path):
    trained = tiny_dataset / "results" / TINY_DATASET / f"nnUNetTrainer_1epoch__{TINY_PLANS}__3d_fullres"
    trained.mkdir(parents=True, exist_ok=True)
    cmd = [BIN / "nnUNetv2_predict", "-i", tiny_dataset / "raw" / TINY_DATASET / "imagesTs", "-o", tmp_path / "pred",
           "-d", TINY_DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_1epch", "-p", TINY_PLANS,
           "-device", "cpu"]
    _fails_with_one_line(cmd, clean_env(tiny_dataset),
                         f"no trained model nnUNetTrainer_1epch__{TINY_PLANS}__3d_fullres",
                         f"did you mean nnUNetTrainer_1epoch__{TINY_PLANS}__3d_fullres", "check -tr, -p and -c")


def test_predict_unknown_dataset_in_process(tmp_path, monkeypatch):
    from nnunetv2.inference import predict_from_raw_data
    assert getattr(predict_from_raw_data.get_output_folder, nnunet_patches.PATCH_MARK, False), \
        "the start-up hook did not patch nnUNetv2_predict's module"
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path))
    with pytest.raises(BadInputError, match="unknown dataset id 42: no Dataset042_\\* folder") as info:
        predict_from_raw_data.get_output_folder("42", "nnUNetTrainer", "nnUNetPlans", "3d_fullres")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ checks in-process
def test_training_checks_in_process(tmp_path, monkeypatch):
    from nnunetv2.run import run_training
    assert getattr(run_training.get_trainer_from_args, nnunet_patches.PATCH_MARK, False)
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(BadInputError, match="nnUNet_preprocessed, nnUNet_results not set: export them"):
        run_training.get_trainer_from_args("4", "3d_fullres", 0)

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "raw" / "Dataset994_RawOnly").mkdir()
    with pytest.raises(BadInputError, match=r"Dataset994_RawOnly is not planned \(.*nnUNetPlans.json does not "
                                            r"exist\): run nnUNetv2_plan_and_preprocess -d 994 -c 3d_fullres"):
        input_checks.check_training_input("994", "3d_fullres", "nnUNetPlans")
    (tmp_path / "raw" / "Dataset995_A").mkdir()
    (tmp_path / "pre" / "Dataset995_B").mkdir()
    with pytest.raises(BadInputError, match="dataset id 995 is ambiguous: Dataset995_A, Dataset995_B"):
        input_checks.check_training_input("995", "3d_fullres", "nnUNetPlans")
    with pytest.raises(BadInputError, match="'four' is neither a dataset id"):
        input_checks.check_training_input("four", "3d_fullres", "nnUNetPlans")


def test_thread_cap_holds_for_stock_trainers_and_bad_values_fail_in_one_line(tiny_dataset, monkeypatch):
    """nnUNetv2_train sets torch's threads to the CPU count before it builds the trainer; the patched
    get_trainer_from_args applies NNUNET_SSL_NUM_THREADS after that, for nnU-Net's own trainers as well."""
    from nnunetv2.run import run_training
    for var, value in clean_env(tiny_dataset).items():
        if var.startswith("nnUNet_"):
            monkeypatch.setenv(var, value)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what nnUNetv2_train -device cpu does on a 2-core machine
        monkeypatch.setenv("NNUNET_SSL_NUM_THREADS", "1")
        trainer = run_training.get_trainer_from_args(str(TINY_DATASET_ID), "3d_fullres", 0, "nnUNetTrainer",
                                                     TINY_PLANS, device=torch.device("cpu"))
        assert type(trainer).__name__ == "nnUNetTrainer" and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("NNUNET_SSL_NUM_THREADS", "two")
        with pytest.raises(BadInputError, match="NNUNET_SSL_NUM_THREADS='two': expected a positive number") as info:
            run_training.get_trainer_from_args(str(TINY_DATASET_ID), "3d_fullres", 0, "nnUNetTrainer", TINY_PLANS,
                                               device=torch.device("cpu"))
        assert "\n" not in str(info.value) and torch.get_num_threads() == 2
        monkeypatch.delenv("NNUNET_SSL_NUM_THREADS")
        run_training.get_trainer_from_args(str(TINY_DATASET_ID), "3d_fullres", 0, "nnUNetTrainer", TINY_PLANS,
                                           device=torch.device("cpu"))
        assert torch.get_num_threads() == 2  # unset: nnU-Net's choice stays
    finally:
        torch.set_num_threads(before)


def test_2d_dataset_given_a_3d_configuration():
    with pytest.raises(BadInputError, match=r"Dataset996_Flat is a 2D dataset: .*\(nnUNetPlans has: 2d\); use -c 2d"):
        input_checks.check_configuration({"configurations": {"2d": {}}}, "Dataset996_Flat", "nnUNetPlans",
                                           "3d_fullres")


def test_pretrained_weights_message_in_process(tiny_dataset, tmp_path):
    plans_file = tiny_dataset / "preprocessed" / TINY_DATASET / f"{TINY_PLANS}.json"
    network = _network(plans_file)
    fitting = tmp_path / "fitting.pth"
    torch.save({"network_weights": network.state_dict()}, fitting)
    assert input_checks.pretrained_weights_message(network, str(fitting)) is None
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(fitting.read_bytes()[:200])
    message = input_checks.pretrained_weights_message(network, str(truncated))
    assert "truncated or corrupt" in message and "\n" not in message
    deeper = json.loads(plans_file.read_text())  # one stage more: tensors missing from the checkpoint
    arch = deeper["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["n_stages"] += 1
    for key, extra in (("features_per_stage", 16), ("kernel_sizes", [3, 3, 3]), ("strides", [1, 1, 1]),
                       ("n_conv_per_stage", 2)):
        arch[key] = [*arch[key], extra]
    arch["n_conv_per_stage_decoder"] = [*arch["n_conv_per_stage_decoder"], 2]
    (tmp_path / "deeper.json").write_text(json.dumps(deeper))
    message = input_checks.pretrained_weights_message(_network(tmp_path / "deeper.json"), str(fitting))
    assert "is not in the checkpoint" in message and "are missing" in message and "\n" not in message


def test_unknown_trainer_message_is_case_aware():
    message = trainer_names.unknown_trainer_message(
        "spadepretraintrainer", ["SpadePretrainTrainer", "SpadePretrainTrainer_cpu"], ["nnUNetTrainer"], [])
    assert "did you mean SpadePretrainTrainer? (names are case-sensitive)" in message
    assert "plugin trainers: SpadePretrainTrainer (with _cpu/_smoke variants)" in message
    assert "\n" not in message
    assert "did you mean" not in trainer_names.unknown_trainer_message("Xyz", ["SpadePretrainTrainer"], [], [])


def _loader_for_checks(final_patch_size=(8, 8, 8)):
    from nnunet_ssl.nnunet.pair_loader import TwoViewDataLoader
    loader = TwoViewDataLoader.__new__(TwoViewDataLoader)  # only what _check_case reads
    loader.final_patch_size, loader.min_content_fraction, loader._checked_keys = final_patch_size, 0.1, set()
    return loader


@pytest.mark.parametrize("case,expected", [
    ("constant", "case c1 is constant in every image channel after preprocessing"),
    ("nan", "case c1 contains NaN/inf after preprocessing"),
    ("tiny", r"case c1 \(preprocessed shape \(2, 2, 2\)\) fills only"),
])
def test_pretraining_loader_refuses_unusable_cases(case, expected):
    data = np.random.default_rng(0).normal(size=(2, 8, 8, 8)).astype(np.float32)
    if case == "constant":
        data[:] = 0.0
    elif case == "nan":
        data[1, 3, 3, 3] = np.nan
    else:
        data = data[:, :2, :2, :2]
    with pytest.raises(ValueError, match=expected) as info:
        _loader_for_checks()._check_case("c1", data)
    assert "\n" not in str(info.value)
    if case != "tiny":
        assert "nnUNetv2_preprocess" in str(info.value)


def test_one_varying_channel_is_enough():
    data = np.zeros((2, 8, 8, 8), np.float32)
    data[1, 0] = 1.0  # channel 0 constant, channel 1 not: still something to contrast
    _loader_for_checks()._check_case("c1", data)


# ------------------------------------------------------------------------------------------ the hook itself
def test_hook_is_cheap_and_can_be_switched_off(tmp_path):
    code = ("import sys, nnunet_ssl._startup as s\n"
            "print(any(isinstance(f, s.PatchOnImport) for f in sys.meta_path), "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'nnunetv2')))")
    on = subprocess.run([sys.executable, "-c", code], env=clean_env(tmp_path), capture_output=True, text=True,
                        check=False)
    assert on.stdout.strip() == "True []", on.stderr  # installed at start-up, nothing heavy imported
    code = "import nnunetv2.run.run_training as m; print(hasattr(m.get_trainer_from_args, '_nnunet_ssl_patched'))"
    off = subprocess.run([sys.executable, "-c", code], env=clean_env(tmp_path, NNUNET_SSL_NO_AUTOREGISTER="1"),
                         capture_output=True, text=True, check=False)
    assert off.stdout.strip() == "False", off.stderr


def test_start_up_hook_imports_only_discovery_and_nothing_imports_it():
    """No import cycle: the start-up hook needs only the discovery module, and no plugin module imports the hook
    (the patches it applies live in nnunet_patches, loaded by name when nnU-Net's modules are imported)."""
    import ast
    from pathlib import Path
    code = "import sys, nnunet_ssl._startup; print(sorted(m for m in sys.modules if m.startswith('nnunet_ssl')))"
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(Path("/tmp")), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['nnunet_ssl', 'nnunet_ssl._startup', 'nnunet_ssl.discovery']"
    package = Path(input_checks.__file__).parents[1]
    importers = []
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "nnunet_ssl._startup" for n in names):
                importers.append(file.name)
    assert importers == []


def test_trainers_command_lists_plugin_trainers(capsys):
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS

    from nnunet_ssl.cli import main
    assert main(["trainers"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == set(PRETRAINING_TRAINERS) | set(SEGMENTATION_TRAINERS)
    assert "300 x 250" in rows["SpadePretrainTrainer"] and "spatial-prior" in rows["SpadePretrainTrainer"]
    assert "SpadePretrainTrainer variant" in rows["SpadePretrainTrainer_smoke"]
