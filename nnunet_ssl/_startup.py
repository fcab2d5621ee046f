"""Makes the plugin's trainers discoverable by ``nnUNetv2_train`` / ``nnUNetv2_predict`` with no user action.

nnU-Net 2.8 looks for trainers it does not ship in the folders listed in ``nnUNet_extTrainer``. The
installed ``nnunet_ssl.pth`` runs :func:`register` at interpreter start-up, which appends this plugin's
discovery folder to that variable (keeping whatever the user set). Processes nnU-Net spawns inherit the
variable and run the hook themselves, so multi-GPU workers and inference find the trainers too.
This module must stay cheap: standard library only.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
DISABLE_VAR = "NNUNET_SSL_NO_AUTOREGISTER"


def discovery_folder() -> str:
    """Folder whose single module re-exports the plugin's trainers with absolute imports."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")


def extended_value(current: str | None, folder: str | None = None) -> str:
    """``current`` with the discovery folder appended once (user entries keep precedence)."""
    folder = folder or discovery_folder()
    parts = [p for p in (current or "").split(os.pathsep) if p.strip()]
    if any(os.path.normpath(p) == os.path.normpath(folder) for p in parts):
        return os.pathsep.join(parts)
    return os.pathsep.join(parts + [folder])


def register() -> None:
    if os.environ.get(DISABLE_VAR, "").lower() in ("1", "true", "yes"):
        return
    try:
        os.environ[ENV_VAR] = extended_value(os.environ.get(ENV_VAR))
    except Exception:  # a start-up hook must never break the interpreter
        pass
