"""Fine-tuning trainers: nnU-Net's warm-up recipe with declarative budgets.

Pretrained weights arrive through stock ``-pretrained_weights``; the randomly initialised segmentation layers
produce large, noisy gradients at first, and a linear learning-rate warm-up of the whole network keeps them from
overwriting the pretrained features before the heads have settled (nnU-Net's own ``nnUNetTrainer_warmup``).
Use the same trainer for the from-scratch baseline so the comparison differs only in the initial weights."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from nnunet_ssl.nnunet.model import unwrap
from nnunet_ssl.nnunet.recipe import Recipe, RecipeLRScheduler, parameter_groups
from nnunet_ssl.nnunet.segmentation import SegmentationTrainerMixin


class nnUNetTrainerFinetune(SegmentationTrainerMixin, nnUNetTrainer_warmup):
    """nnU-Net's warm-up trainer with the budget as class attributes; on CPUs with native bf16 it trains with bf16
    autocast + channels-last (``cpu_bf16``, see nnunet_ssl.nnunet.cpu_fast). The from-scratch recipe."""

    num_epochs = 1000
    warmup_epochs = 50
    num_iterations_per_epoch = 250
    num_val_iterations_per_epoch = 50
    initial_lr = 1e-2

    def optimizer_for_epoch(self, epoch: int):
        return self.configure_optimizers("warmup_all" if epoch < self.warmup_duration_whole_net else "train")


class nnUNetTrainerPretrainedFinetune(SegmentationTrainerMixin, nnUNetTrainer):
    """Fine-tuning recipe for pretrained starts (nnunet_ssl.nnunet.recipe; documented in README "Fine-tuning").

    Peak lr ``initial_lr`` (1e-3: pretrained weights need a smaller step than nnU-Net's 1e-2 from scratch), linear
    warm-up of the whole network over ``warmup_fraction`` of the epochs, then nnU-Net's poly decay. Options, as
    fractions of the run: ``probe_fraction`` (LP-FT: segmentation layers alone first), ``decoder_warmup_fraction``
    (the sawtooth: decoder-only warm-up before the whole-network one; the encoder stays frozen, including its
    ``decoder.encoder.*`` aliases), and ``layer_decay`` (encoder stage i of S at lr · layer_decay^(S-1-i))."""

    num_epochs = 1000
    num_iterations_per_epoch = 250
    num_val_iterations_per_epoch = 50
    initial_lr = 1e-3
    warmup_fraction = 0.1
    decoder_warmup_fraction = 0.0
    probe_fraction = 0.0
    layer_decay = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        cls = type(self)
        epochs = lambda f: int(round(f * cls.num_epochs)) if f > 0 else 0  # noqa: E731
        self.recipe = Recipe(cls.num_epochs, epochs(cls.probe_fraction), epochs(cls.decoder_warmup_fraction),
                             max(1, epochs(cls.warmup_fraction)) if cls.warmup_fraction > 0 else 0)

    def optimizer_for_epoch(self, epoch: int):
        return self.configure_optimizers()  # the recipe's scheduler sets phase, lr and frozen weights per epoch

    def configure_optimizers(self):
        groups = parameter_groups(unwrap(self.network), self.layer_decay)
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, RecipeLRScheduler(optimizer, self.initial_lr, self.recipe)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # steps the recipe's scheduler (phase, lr, frozen weights)
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        self.logger.log("lrs", lr, self.current_epoch)
        self.print_to_log_file(f"fine-tuning phase {self.lr_scheduler.current_phase}, peak group lr {lr:.2e}")


class nnUNetTrainerFinetune_cpu(nnUNetTrainerFinetune):
    """CPU budget (used by the demo and the CPU benchmark): 40 epochs x 25 iterations, 5 warm-up epochs."""
    num_epochs = 40
    warmup_epochs = 5
    num_iterations_per_epoch = 25
    num_val_iterations_per_epoch = 5
    progress_plot_every = 10  # nnU-Net's per-epoch progress.png costs ~0.5 s of a ~1.5 s epoch here


class nnUNetTrainerFinetune_cpu_80ep(nnUNetTrainerFinetune_cpu):
    """80 epochs x 25 = 2000 iterations (1000 leave the small networks far from converged on Hippocampus), one
    validation batch per epoch (monitoring only; 5 cost ~17 % of the time). The demo's scratch_long."""
    num_epochs = 80
    num_val_iterations_per_epoch = 1


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


class nnUNetTrainerFinetune_cpu_120ep(nnUNetTrainerFinetune_cpu_80ep):
    """The CPU benchmark's fine-tuning: 120 epochs x 25 = 3000 iterations, where the from-scratch baseline is near
    convergence on Hippocampus (4000 vs 3000 iterations: +0.003 Dice; 3000 vs 2000: +0.05, BENCHMARKS.md)."""
    num_epochs = 120


class nnUNetTrainerFinetune_cpu_160ep(nnUNetTrainerFinetune_cpu_80ep):
    """160 epochs x 25: the *_cpu pretraining budget (40 x 25) + nnUNetTrainerFinetune_cpu_120ep (120 x 25)."""
    num_epochs = 160


class nnUNetTrainerFinetune_smoke_long(nnUNetTrainerFinetune_smoke):
    """4 epochs x 2: the *_smoke pretraining budget + nnUNetTrainerFinetune_smoke."""
    num_epochs = 4


class nnUNetTrainerPretrainedFinetune_cpu(nnUNetTrainerPretrainedFinetune):
    """CPU budget of the pretrained-start recipe: 120 x 25 iterations (as nnUNetTrainerFinetune_cpu_120ep)."""
    num_epochs = 120
    num_iterations_per_epoch = 25
    num_val_iterations_per_epoch = 1
    progress_plot_every = 10


class nnUNetTrainerPretrainedFinetune_smoke(nnUNetTrainerPretrainedFinetune):
    """4 epochs x 1 iteration (as many as nnUNetTrainerFinetune_smoke), every phase one epoch: set-up check only."""
    num_epochs = 4
    num_iterations_per_epoch = 1
    num_val_iterations_per_epoch = 1
    probe_fraction = 0.25
    decoder_warmup_fraction = 0.25
    warmup_fraction = 0.25
