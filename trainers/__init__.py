"""nnU-Net trainer classes of nnunet_ssl (installed as ``nnunet_ssl.trainers``).

Every public class here is found by ``nnUNetv2_train -tr NAME`` through the discovery hook.
"""
from nnunet_ssl.trainers.drasclr import DrasCLRPretrainTrainer, DrasCLRPretrainTrainer_cpu, DrasCLRPretrainTrainer_smoke
from nnunet_ssl.trainers.finetune import (nnUNetTrainerFinetune, nnUNetTrainerFinetune_cpu,
                                          nnUNetTrainerFinetune_cpu_80ep, nnUNetTrainerFinetune_cpu_120ep,
                                          nnUNetTrainerFinetune_long, nnUNetTrainerFinetune_smoke,
                                          nnUNetTrainerFinetune_smoke_long, nnUNetTrainerPretrainedFinetune,
                                          nnUNetTrainerPretrainedFinetune_cpu, nnUNetTrainerPretrainedFinetune_smoke)
from nnunet_ssl.trainers.stock import nnUNetTrainerWallClock
from nnunet_ssl.trainers.recon import (MaskedReconPretrainTrainer, MaskedReconPretrainTrainer_cpu,
                                       MaskedReconPretrainTrainer_smoke, SpadeReconPretrainTrainer,
                                       SpadeReconPretrainTrainer_cpu, SpadeReconPretrainTrainer_smoke)
from nnunet_ssl.trainers.pdcr import PDCRTrainer, PDCRTrainer_smoke, PDCRUAFSTrainer, PDCRUAFSTrainer_smoke
from nnunet_ssl.trainers.pcl import PCLPretrainTrainer, PCLPretrainTrainer_cpu, PCLPretrainTrainer_smoke
from nnunet_ssl.trainers.simclr import SimCLRPretrainTrainer, SimCLRPretrainTrainer_cpu, SimCLRPretrainTrainer_smoke
from nnunet_ssl.trainers.spade import (SpadePretrainTrainer, SpadePretrainTrainer_cpu, SpadePretrainTrainer_smoke,
                                       SpadeSoftPretrainTrainer, SpadeSoftPretrainTrainer_cpu,
                                       SpadeSoftPretrainTrainer_smoke)

PRETRAINING_TRAINERS = {c.__name__: c for c in (
    SpadePretrainTrainer, SpadePretrainTrainer_cpu, SpadePretrainTrainer_smoke,
    SpadeSoftPretrainTrainer, SpadeSoftPretrainTrainer_cpu, SpadeSoftPretrainTrainer_smoke,
    PCLPretrainTrainer, PCLPretrainTrainer_cpu, PCLPretrainTrainer_smoke,
    DrasCLRPretrainTrainer, DrasCLRPretrainTrainer_cpu, DrasCLRPretrainTrainer_smoke,
    SimCLRPretrainTrainer, SimCLRPretrainTrainer_cpu, SimCLRPretrainTrainer_smoke,
    MaskedReconPretrainTrainer, MaskedReconPretrainTrainer_cpu, MaskedReconPretrainTrainer_smoke,
    SpadeReconPretrainTrainer, SpadeReconPretrainTrainer_cpu, SpadeReconPretrainTrainer_smoke,
)}

SEGMENTATION_TRAINERS = {c.__name__: c for c in (
    nnUNetTrainerFinetune, nnUNetTrainerFinetune_cpu, nnUNetTrainerFinetune_cpu_80ep, nnUNetTrainerFinetune_smoke,
    nnUNetTrainerFinetune_long, nnUNetTrainerFinetune_cpu_120ep, nnUNetTrainerFinetune_smoke_long,
    nnUNetTrainerPretrainedFinetune, nnUNetTrainerPretrainedFinetune_cpu, nnUNetTrainerPretrainedFinetune_smoke,
    nnUNetTrainerWallClock,
    PDCRTrainer, PDCRTrainer_smoke, PDCRUAFSTrainer, PDCRUAFSTrainer_smoke)}

__all__ = list(PRETRAINING_TRAINERS) + list(SEGMENTATION_TRAINERS) + ["PRETRAINING_TRAINERS",
                                                                      "SEGMENTATION_TRAINERS"]
