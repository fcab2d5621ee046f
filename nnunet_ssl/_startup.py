"""Makes the plugin's trainers discoverable by ``nnUNetv2_train`` / ``nnUNetv2_predict`` with no user action.

nnU-Net 2.8 looks for trainers it does not ship in the folders listed in ``nnUNet_extTrainer``. The
installed ``nnunet_ssl.pth`` runs :func:`register` at interpreter start-up, which appends this plugin's
discovery folder to that variable (keeping whatever the user set). Processes nnU-Net spawns inherit the
variable and run the hook themselves, so multi-GPU workers and inference find the trainers too.

It also installs :class:`PatchOnImport`, which applies the plugin's patches of nnU-Net (all in
``nnunet_ssl.nnunet.nnunet_patches``: one-line error messages for bad input to ``nnUNetv2_train`` /
``nnUNetv2_predict``) when, and only when, those nnU-Net modules are imported. This module must stay cheap:
standard library only.
"""
import os
import sys

from nnunet_ssl.discovery import ENV_VAR, extended_value  # standard library only

DISABLE_VAR = "NNUNET_SSL_NO_AUTOREGISTER"
PATCHES_MODULE = "nnunet_ssl.nnunet.nnunet_patches"
# nnU-Net module -> function of PATCHES_MODULE that patches it right after it has executed
PATCHED_ON_IMPORT = {
    "nnunetv2.run.run_training": "patch_run_training",
    "nnunetv2.inference.predict_from_raw_data": "patch_predict",
}


class PatchingLoader:
    """Delegates to the module's real loader, then applies the plugin's patch to the executed module."""

    def __init__(self, loader, patch_name: str):
        self.loader = loader
        self.patch_name = patch_name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            import importlib
            getattr(importlib.import_module(PATCHES_MODULE), self.patch_name)(module)
        except Exception as error:  # noqa: BLE001 - the plugin must never break nnU-Net: keep nnU-Net's behaviour
            print(f"nnunet_ssl: could not add its error messages to {module.__name__} ({error!r})", file=sys.stderr)

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class PatchOnImport:
    """``sys.meta_path`` finder that finds nothing itself: for the modules in PATCHED_ON_IMPORT it takes the spec
    the other finders return and wraps its loader. A dictionary lookup per import, nothing imported up front."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PATCHED_ON_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader, PATCHED_ON_IMPORT[fullname])
        return spec


def install_patch_on_import() -> None:
    if not any(isinstance(finder, PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchOnImport())


def register() -> None:
    if os.environ.get(DISABLE_VAR, "").lower() in ("1", "true", "yes"):
        return
    try:
        os.environ[ENV_VAR] = extended_value(os.environ.get(ENV_VAR))
        install_patch_on_import()
    except Exception:  # a start-up hook must never break the interpreter
        pass
