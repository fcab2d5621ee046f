"""nnU-Net trainer classes of nnunet_ssl (installed as ``nnunet_ssl.trainers``).

Every public class here is found by ``nnUNetv2_train -tr NAME`` through the discovery hook.
"""
from nnunet_ssl.trainers.finetune import nnUNetTrainerFinetune, nnUNetTrainerFinetune_cpu
from nnunet_ssl.trainers.spade import SpadePretrainTrainer, SpadePretrainTrainer_cpu

PRETRAINING_TRAINERS = {c.__name__: c for c in (SpadePretrainTrainer, SpadePretrainTrainer_cpu)}

__all__ = ["SpadePretrainTrainer", "SpadePretrainTrainer_cpu", "nnUNetTrainerFinetune", "nnUNetTrainerFinetune_cpu",
           "PRETRAINING_TRAINERS"]
