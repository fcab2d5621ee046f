"""Fine-tuning trainers: nnU-Net's warm-up recipe with declarative budgets.

Pretrained weights arrive through stock ``-pretrained_weights``; the randomly initialised segmentation layers
produce large, noisy gradients at first, and a linear learning-rate warm-up of the whole network keeps them from
overwriting the pretrained features before the heads have settled (nnU-Net's own ``nnUNetTrainer_warmup``).
Use the same trainer for the from-scratch baseline so the comparison differs only in the initial weights."""
import torch
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from nnunet_ssl.nnunet.checkpoint import CrashSafeCheckpointsMixin
from nnunet_ssl.nnunet.cpu_fast import CPUFastPathMixin


class nnUNetTrainerFinetune(CrashSafeCheckpointsMixin, CPUFastPathMixin, nnUNetTrainer_warmup):
    """nnU-Net's warm-up trainer with the budget as class attributes; on CPUs with native bf16 it trains with bf16
    autocast + channels-last (``cpu_bf16``, see nnunet_ssl.nnunet.cpu_fast)."""

    num_epochs = 1000
    warmup_epochs = 50
    num_iterations_per_epoch = 250
    num_val_iterations_per_epoch = 50
    initial_lr = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        cls = type(self)
        self.num_epochs = cls.num_epochs
        self.warmup_duration_whole_net = cls.warmup_epochs
        self.num_iterations_per_epoch = cls.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = cls.num_val_iterations_per_epoch
        self.initial_lr = cls.initial_lr


class nnUNetTrainerFinetune_cpu(nnUNetTrainerFinetune):
    """CPU budget (used by the demo and the CPU benchmark): 40 epochs x 25 iterations, 5 warm-up epochs."""
    num_epochs = 40
    warmup_epochs = 5
    num_iterations_per_epoch = 25
    num_val_iterations_per_epoch = 5


class nnUNetTrainerFinetune_smoke(nnUNetTrainerFinetune):
    """2 epochs x 2 iterations: set-up check only."""
    num_epochs = 2
    warmup_epochs = 1
    num_iterations_per_epoch = 2
    num_val_iterations_per_epoch = 1


# scratch baselines trained for as many iterations as pretraining + fine-tuning (nnunet-ssl benchmark's
# `scratch_long`): a pretrained model has seen pretraining's iterations too, so this isolates the effect of the
# pretrained initialisation from that of a longer schedule.
class nnUNetTrainerFinetune_long(nnUNetTrainerFinetune):
    """1300 epochs x 250: the GPU pretraining budget (300 x 250) + nnUNetTrainerFinetune (1000 x 250)."""
    num_epochs = 1300


class nnUNetTrainerFinetune_cpu_long(nnUNetTrainerFinetune_cpu):
    """80 epochs x 25: the *_cpu pretraining budget (40 x 25) + nnUNetTrainerFinetune_cpu (40 x 25)."""
    num_epochs = 80


class nnUNetTrainerFinetune_smoke_long(nnUNetTrainerFinetune_smoke):
    """4 epochs x 2: the *_smoke pretraining budget + nnUNetTrainerFinetune_smoke."""
    num_epochs = 4
