"""nnU-Net trainer classes of nnunet_ssl (installed as ``nnunet_ssl.trainers``).

Every public class here is found by ``nnUNetv2_train -tr NAME`` through the discovery hook.
"""
from nnunet_ssl.trainers.finetune import nnUNetTrainerFinetune, nnUNetTrainerFinetune_cpu, nnUNetTrainerFinetune_smoke
from nnunet_ssl.trainers.spade import SpadePretrainTrainer, SpadePretrainTrainer_cpu, SpadePretrainTrainer_smoke

PRETRAINING_TRAINERS = {c.__name__: c for c in (SpadePretrainTrainer, SpadePretrainTrainer_cpu,
                                                SpadePretrainTrainer_smoke)}

__all__ = ["SpadePretrainTrainer", "SpadePretrainTrainer_cpu", "SpadePretrainTrainer_smoke", "nnUNetTrainerFinetune",
           "nnUNetTrainerFinetune_cpu", "nnUNetTrainerFinetune_smoke", "PRETRAINING_TRAINERS"]
