"""Where nnU-Net finds the plugin's trainers: the discovery folder and the ``nnUNet_extTrainer`` value that lists it.
Standard library only (the interpreter start-up hook imports it)."""
import os

ENV_VAR = "nnUNet_extTrainer"


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
