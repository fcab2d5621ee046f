"""CPU-scale variants for tuning the benchmark's recipe on pool validation cases (BENCHMARKS.md; earlier runs in
benchmarks/notes/). Not part of the installed plugin: nnU-Net finds them only when an investigation asks,

    export nnUNet_extTrainer=<repository>/benchmarks/investigation

(nnU-Net imports this file as a top-level module: absolute imports only). Each differs from the CPU benchmark's
trainer in one setting, so a run of ``nnunet-ssl benchmark --pretrain-trainer spade=... / --finetune-trainer ...``
on the pool alone isolates that setting."""
from nnunet_ssl.trainers.finetune import nnUNetTrainerFinetune_cpu_80ep, nnUNetTrainerFinetune_cpu_120ep
from nnunet_ssl.trainers.drasclr import DrasCLRPretrainTrainer_cpu
from nnunet_ssl.trainers.recon import MaskedReconPretrainTrainer_cpu, SpadeReconPretrainTrainer_cpu
from nnunet_ssl.trainers.spade import SpadePretrainTrainer_cpu, SpadeSoftPretrainTrainer_cpu


# ---- fine-tuning: learning rate and warm-up
class nnUNetTrainerFinetune_cpu_80ep_lr3e3(nnUNetTrainerFinetune_cpu_80ep):
    """Initial learning rate 3e-3 instead of nnU-Net's 1e-2: moves pretrained weights less."""
    initial_lr = 3e-3


class nnUNetTrainerFinetune_cpu_80ep_warmup20(nnUNetTrainerFinetune_cpu_80ep):
    """20 warm-up epochs (500 iterations, a quarter of the run) instead of 5."""
    warmup_epochs = 20


class nnUNetTrainerFinetune_cpu_120ep_lr3e3(nnUNetTrainerFinetune_cpu_120ep):
    """The CPU budget's from-scratch fine-tuning (3000 iterations) at initial lr 3e-3: scratch's lr, tuned with the
    same effort as the pretrained starts' peak lr."""
    initial_lr = 3e-3


class nnUNetTrainerFinetune_cpu_120ep_warmup12(nnUNetTrainerFinetune_cpu_120ep):
    """3000 iterations with 12 warm-up epochs (10 %, the pretrained-start recipe's share) instead of 5."""
    warmup_epochs = 12


# ---- fine-tuning: the float32 CPU path's memory layout (run with --precision fp32, issue: CPU fast path)
class nnUNetTrainerFinetune_cpu_120ep_cl(nnUNetTrainerFinetune_cpu_120ep):
    """3000 iterations in channels-last layout also in float32 (the product uses it only with bf16): the paired Dice
    check before channels-last float32 may become the default on CPUs without bf16."""
    cpu_channels_last = True


class nnUNetTrainerFinetune_cpu_120ep_gn(nnUNetTrainerFinetune_cpu_120ep):
    """3000 iterations in channels-last float32 with the instance norms computed by group_norm (fast, but ~1e-5
    relative error per layer): the paired Dice check against the committed cells of the standard layout
    (nnUNetTrainerFinetune_cpu_120ep, then the default, and ..._std) and of channels-last with instance_norm
    (..._cl)."""
    cpu_channels_last = True
    cpu_channels_last_norm = "group_norm"


class nnUNetTrainerFinetune_cpu_120ep_clp(nnUNetTrainerFinetune_cpu_120ep):
    """3000 iterations in the float32 default since 2026-12-04 (channels-last, the precise layout-keeping instance
    norm) under its own cell name, for the same paired check."""
    cpu_channels_last = True
    cpu_channels_last_norm = "precise"


class nnUNetTrainerFinetune_cpu_120ep_std(nnUNetTrainerFinetune_cpu_120ep):
    """3000 iterations in the standard-layout float32 path (the float32 default until 2026-12-03): the reference of
    that paired check, for seeds without a committed standard-layout cell."""
    cpu_channels_last = False


# ---- Spade pretraining: length, selection radii, temperature
class SpadePretrainTrainer_cpu_80ep(SpadePretrainTrainer_cpu):
    """Twice the pretraining: 80 x 25 iterations."""
    num_epochs = 80


class SpadePretrainTrainer_cpu_wide(SpadePretrainTrainer_cpu):
    """Wider radii: positives within 0.2, negatives beyond 0.4 (canonical units; default 0.1 / 0.3)."""
    r_pos = 0.2
    r_neg = 0.4


class SpadePretrainTrainer_cpu_narrow(SpadePretrainTrainer_cpu):
    """Narrower radii: positives within 0.05, negatives beyond 0.2."""
    r_pos = 0.05
    r_neg = 0.2


class SpadePretrainTrainer_cpu_t03(SpadePretrainTrainer_cpu):
    """Temperature 0.3 for both branches (default 0.1)."""
    temperature_global = 0.3
    temperature_local = 0.3


# ---- DrasCLR pretraining: momentum of the key encoder
class DrasCLRPretrainTrainer_cpu_m99(DrasCLRPretrainTrainer_cpu):
    """Key-encoder momentum 0.99 instead of 0.999: the keys follow the encoder with a lag of ~100 steps instead of
    ~1000, which is the whole of the CPU budget's 1000-step pretraining."""
    momentum = 0.99


# ---- convergence check of the from-scratch budget (4000 iterations is the product's nnUNetTrainerFinetune_cpu_160ep)
class nnUNetTrainerFinetune_cpu_240ep(nnUNetTrainerFinetune_cpu_80ep):
    """Twice the CPU budget's fine-tuning: 240 x 25 = 6000 iterations (is 3000 near convergence?)."""
    num_epochs = 240


# ---- the pretrained-start recipe (BENCHMARKS.md: peak lr x warm-up x sawtooth / LP-FT / layer decay)
from nnunet_ssl.trainers.finetune import nnUNetTrainerPretrainedFinetune_cpu  # noqa: E402


class nnUNetTrainerPretrainedFinetune_cpu_lr1e2(nnUNetTrainerPretrainedFinetune_cpu):
    """Peak lr 1e-2 (the from-scratch step size) instead of 1e-3."""
    initial_lr = 1e-2


class nnUNetTrainerPretrainedFinetune_cpu_lr3e3(nnUNetTrainerPretrainedFinetune_cpu):
    """Peak lr 3e-3 instead of 1e-3."""
    initial_lr = 3e-3


class nnUNetTrainerPretrainedFinetune_cpu_lr3e4(nnUNetTrainerPretrainedFinetune_cpu):
    """Peak lr 3e-4 instead of 1e-3."""
    initial_lr = 3e-4


class nnUNetTrainerPretrainedFinetune_cpu_warmup25(nnUNetTrainerPretrainedFinetune_cpu):
    """Whole-network warm-up over 25 % of the run instead of 10 %."""
    warmup_fraction = 0.25


# The phases below run at peak lr 1e-2: at the 3000-iteration budget 1e-3 and 3e-3 cost Dice on a pretrained start
# (BENCHMARKS.md, "The pretrained start's peak learning rate"), so each phase is compared at the best peak lr.
class nnUNetTrainerPretrainedFinetune_cpu_sawtooth(nnUNetTrainerPretrainedFinetune_cpu_lr1e2):
    """Decoder-only warm-up (10 %), then the whole-network warm-up (10 %)."""
    decoder_warmup_fraction = 0.1


class nnUNetTrainerPretrainedFinetune_cpu_lpft(nnUNetTrainerPretrainedFinetune_cpu_lr1e2):
    """LP-FT: segmentation layers alone for 10 % of the run first."""
    probe_fraction = 0.1


class nnUNetTrainerPretrainedFinetune_cpu_llrd(nnUNetTrainerPretrainedFinetune_cpu_lr1e2):
    """Layer-wise lr decay 0.75 per encoder stage."""
    layer_decay = 0.75


class nnUNetTrainerPretrainedFinetune_cpu_llrd05(nnUNetTrainerPretrainedFinetune_cpu_lr1e2):
    """Layer-wise lr decay 0.5 per encoder stage: the first stage at 1/8 of the peak lr."""
    layer_decay = 0.5


# ---- the hand-off and the pretraining length
class SpadePretrainTrainer_cpu_norescale(SpadePretrainTrainer_cpu):
    """Hands the conv weights over at their trained scale (no reset to He norms)."""
    reset_conv_scales_at_hand_off = False


class SpadePretrainTrainer_cpu_160ep(SpadePretrainTrainer_cpu):
    """Four times the pretraining: 160 x 25 iterations."""
    num_epochs = 160


class MaskedReconPretrainTrainer_cpu_norescale(MaskedReconPretrainTrainer_cpu):
    """Hands the conv weights over at their trained scale (no reset to He norms)."""
    reset_conv_scales_at_hand_off = False


class MaskedReconPretrainTrainer_cpu_160ep(MaskedReconPretrainTrainer_cpu):
    """Four times the pretraining: 160 x 25 iterations."""
    num_epochs = 160


# ---- the 16x length that put masked reconstruction ahead, for spatial-prior starts (16 000 iterations each)
class SpadeSoftPretrainTrainer_cpu_640ep(SpadeSoftPretrainTrainer_cpu):
    """SpadeSoft pretrained as long as MaskedReconPretrainTrainer_cpu_640ep: 640 x 25 iterations."""
    num_epochs = 640


class SpadeReconPretrainTrainer_cpu_640ep(SpadeReconPretrainTrainer_cpu):
    """Spade + masked reconstruction pretrained as long as MaskedReconPretrainTrainer_cpu_640ep: 640 x 25
    iterations (does the spatial-prior contrast add to the 16x reconstruction start?)."""
    num_epochs = 640


# ---- data loading on the critical path: short runs timed per epoch with nnUNet_n_proc_DA = 0, 1, 2
class nnUNetTrainerFinetune_cpu_10ep(nnUNetTrainerFinetune_cpu_80ep):
    """10 epochs x 25 iterations of the CPU benchmark's fine-tuning (epoch times only)."""
    num_epochs = 10


class SpadePretrainTrainer_cpu_10ep(SpadePretrainTrainer_cpu):
    """10 epochs x 25 iterations of the CPU budget's Spade pretraining (epoch times only)."""
    num_epochs = 10


class SpadePretrainTrainer_cpu_brute(SpadePretrainTrainer_cpu):
    """The local branch's nearest-voxel search over all of view b (a distance matrix), as before the affine-fit
    window became the CPU default: the same pairs, timed against it (bench-speed)."""
    local_match_search = "brute"


class SpadePretrainTrainer_cpu_headnorm(SpadePretrainTrainer_cpu):
    """The dense head normalising its whole map, as before the loss took that over (the same loss and gradients):
    timed against it (bench-speed)."""

    def build_heads(self):
        heads = super().build_heads()
        heads["local"].normalize = True
        return heads


# ---- Spade's global branch with a queue of negatives (a batch of 4 crops x 2 views has ~2 negatives per anchor)
class SpadePretrainTrainer_cpu_queue(SpadePretrainTrainer_cpu):
    """Global queue of the last 256 online embeddings (32 steps), detached: a memory bank."""
    global_queue_size = 256


class SpadePretrainTrainer_cpu_moco(SpadePretrainTrainer_cpu):
    """Global queue of the last 256 keys of a momentum encoder (momentum 0.99 for the 1000-step CPU budget); the
    settings of the library's SpadeQueuePretrainTrainer_cpu, which it became."""
    global_queue_size = 256
    use_momentum_encoder = True
    momentum = 0.99


class SpadePretrainTrainer_cpu_moco_160ep(SpadePretrainTrainer_cpu_moco):
    """The momentum-queue Spade pretrained four times longer (4000 iterations): does contrast need more steps?"""
    num_epochs = 160


# ---- crops per step: twice the crops in each pretraining step (the issue asks for length and crops per step)
class SpadePretrainTrainer_cpu_8cases(SpadePretrainTrainer_cpu):
    """8 cases x 2 views per step instead of 4 x 2, same 1000 iterations: twice the crops seen, and about twice the
    far-apart crops per anchor in the global branch (which a batch of 4 crops barely has)."""
    cases_per_step = 8
