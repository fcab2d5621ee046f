"""Fine-tuning trainers: nnU-Net's warm-up recipe with declarative budgets.

Pretrained weights arrive through stock ``-pretrained_weights``; the randomly initialised segmentation layers
produce large, noisy gradients at first, and a linear learning-rate warm-up of the whole network keeps them from
overwriting the pretrained features before the heads have settled (nnU-Net's own ``nnUNetTrainer_warmup``).
Use the same trainer for the from-scratch baseline so the comparison differs only in the initial weights."""
import torch
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup


class nnUNetTrainerFinetune(nnUNetTrainer_warmup):
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
