"""Training budgets declared as class attributes: one mechanism for every trainer of the plugin (pretraining,
fine-tuning, PDCR, the stock wall-clock row).

nnUNetTrainer.__init__ assigns its budget to the instance (``self.num_epochs = 1000`` ...), which hides any class
attribute of a subclass. :class:`DeclaredBudgetMixin` (first in the bases) assigns the class's declarations again
after nnU-Net's ``__init__``, so a budget variant is a declaration and nothing else::

    class nnUNetTrainerFinetune_cpu(nnUNetTrainerFinetune):
        num_epochs = 40
        warmup_epochs = 5

Presets shared by several methods (:class:`CPUBudget`, :class:`SmokeBudget`) go first in the bases, so that their
values win over the method's: ``class SpadePretrainTrainer_cpu(CPUBudget, SpadePretrainTrainer)``.
"""
from __future__ import annotations

import torch

# declared class attribute -> the instance attribute nnU-Net reads
BUDGET_ATTRIBUTES = {
    "num_epochs": "num_epochs",
    "num_iterations_per_epoch": "num_iterations_per_epoch",
    "num_val_iterations_per_epoch": "num_val_iterations_per_epoch",
    "initial_lr": "initial_lr",
    "weight_decay": "weight_decay",
    "save_every": "save_every",
    "warmup_epochs": "warmup_duration_whole_net",  # nnUNetTrainer_warmup's linear warm-up of the whole network
}


def apply_declared_budget(trainer) -> None:
    """Set every budget attribute that ``type(trainer)`` declares (attributes it does not declare keep nnU-Net's
    values)."""
    cls = type(trainer)
    for declared, attribute in BUDGET_ATTRIBUTES.items():
        if hasattr(cls, declared):
            setattr(trainer, attribute, getattr(cls, declared))


class DeclaredBudgetMixin:
    """For nnUNetTrainer subclasses, first in the bases: class declarations of the budget win over nnU-Net's
    instance values. (The signature is nnUNetTrainer's own: nnU-Net records the constructor's arguments by name.)"""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_declared_budget(self)


class BudgetMixin:
    """Base of the budget presets (a preset is a class of declarations only)."""


class CPUBudget(BudgetMixin):
    """Minutes on a 2-core CPU (with a small-network plan, e.g. nnUNetPlannerCPUWide): 40 x 25 iterations, 4 cases per
    step, crops 0.75 x the plans' patch (rounded down to what the U-Net divides)."""
    num_epochs = 40
    num_iterations_per_epoch = 25
    num_val_iterations_per_epoch = 4
    save_every = 5
    crop_scale = 0.75
    cases_per_step = 4
    progress_plot_every = 10  # see nnunet_ssl.nnunet.progress


class SmokeBudget(BudgetMixin):
    """2 epochs x 2 iterations: checks that a dataset and set-up work end to end (not a useful training)."""
    num_epochs = 2
    num_iterations_per_epoch = 2
    num_val_iterations_per_epoch = 1
    save_every = 1
