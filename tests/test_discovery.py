"""The plugin's trainers are found by nnU-Net with no user action (start-up hook), and `nnunet-ssl env`."""
import os
import subprocess
import sys

from conftest import BIN, clean_env, run
from nnunet_ssl.discovery import discovery_folder, extended_value


def test_extended_value_appends_once_and_keeps_user_entries():
    f = "/plugin/_ext"
    assert extended_value(None, f) == f
    assert extended_value("", f) == f
    assert extended_value("/mine", f) == os.pathsep.join(["/mine", f])
    assert extended_value(os.pathsep.join(["/mine", f]), f) == os.pathsep.join(["/mine", f])
    assert extended_value(os.pathsep.join([f + "/", "/mine"]), f) == os.pathsep.join([f + "/", "/mine"])


def test_hook_sets_variable_in_every_python_process(tmp_path):
    code = "import os; print(os.environ.get('nnUNet_extTrainer'))"
    env = clean_env(tmp_path)
    out = run([sys.executable, "-c", code], env).stdout.strip()
    assert out == discovery_folder()
    env["nnUNet_extTrainer"] = "/somewhere/else"
    out = run([sys.executable, "-c", code], env).stdout.strip()
    assert out.split(os.pathsep) == ["/somewhere/else", discovery_folder()]
    # spawned children (as nnU-Net's multi-GPU workers) inherit it and run the hook themselves
    child = f"import subprocess, sys; print(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, " \
            f"text=True, env={{k: v for k, v in __import__('os').environ.items() if k != 'nnUNet_extTrainer'}}).stdout)"
    out = run([sys.executable, "-c", child], clean_env(tmp_path)).stdout.strip()
    assert out == discovery_folder()
    # the opt-out is honoured
    out = run([sys.executable, "-c", code], clean_env(tmp_path, NNUNET_SSL_NO_AUTOREGISTER="1")).stdout.strip()
    assert out == "None"


def test_nnunet_finds_plugin_trainers_as_the_same_class(tmp_path):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "import nnunet_ssl.trainers as t\n"
            "for n in ['SpadePretrainTrainer', 'SpadePretrainTrainer_cpu', 'nnUNetTrainerFinetune_cpu']:\n"
            "    assert f(n) is getattr(t, n), n\n"
            "print('found')")
    assert run([sys.executable, "-c", code], clean_env(tmp_path)).stdout.strip().endswith("found")


def test_unknown_trainer_still_fails_clearly(tmp_path):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "f('NoSuchTrainer')")
    res = subprocess.run([sys.executable, "-c", code], env=clean_env(tmp_path), capture_output=True, text=True)
    assert res.returncode != 0 and "Could not find requested nnunet trainer NoSuchTrainer" in res.stderr


def test_env_command_prints_export_line(tmp_path):
    out = run([BIN / "nnunet-ssl", "env"], clean_env(tmp_path, nnUNet_extTrainer="/mine")).stdout.strip()
    assert out == f"export nnUNet_extTrainer={'/mine' + os.pathsep + discovery_folder()}"
