"""nnU-Net trainer classes of nnunet_ssl (installed as ``nnunet_ssl.trainers``).

Every public ``nnUNetTrainer`` subclass defined in a module of this package is registered here automatically (and
so found by ``nnUNetv2_train -tr NAME`` through the discovery hook): a new method is one module in this folder.
Pretraining trainers (``ContrastivePretrainTrainer`` subclasses) that declare ``benchmark_name`` are also rows of
``nnunet-ssl benchmark``.
"""
import importlib
import pkgutil

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.nnunet.engine import ContrastivePretrainTrainer


def _collect():
    pretraining, segmentation = {}, {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                (pretraining if issubclass(obj, ContrastivePretrainTrainer) else segmentation)[name] = obj
    return pretraining, segmentation


PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS = _collect()
globals().update(PRETRAINING_TRAINERS)
globals().update(SEGMENTATION_TRAINERS)

__all__ = list(PRETRAINING_TRAINERS) + list(SEGMENTATION_TRAINERS) + ["PRETRAINING_TRAINERS",
                                                                      "SEGMENTATION_TRAINERS"]
