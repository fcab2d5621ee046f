"""Test-only trainers (found via nnUNet_extTrainer set by the resume tests): die right after an epoch's
checkpoint, as a killed job would, when NNUNET_SSL_TEST_CRASH_AFTER_EPOCH is set."""
import os

from nnunet_ssl.trainers.finetune import nnUNetTrainerFinetune_smoke
from nnunet_ssl.trainers.spade import SpadePretrainTrainer_smoke


class SpadePretrainTrainer_crashtest(SpadePretrainTrainer_smoke):
    num_epochs = 3
    save_every = 1  # checkpoint_latest.pth after every epoch, written by the engine's on_epoch_end

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if str(epoch) == os.environ.get("NNUNET_SSL_TEST_CRASH_AFTER_EPOCH"):
            os._exit(17)


class nnUNetTrainerFinetune_crashtest(nnUNetTrainerFinetune_smoke):
    num_epochs = 5
    warmup_epochs = 2
    save_every = 1  # nnU-Net writes checkpoint_latest.pth after every epoch

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if str(epoch) == os.environ.get("NNUNET_SSL_TEST_CRASH_AFTER_EPOCH"):
            os._exit(17)


from nnunet_ssl.trainers.stock import nnUNetTrainerWallClock  # noqa: E402


class nnUNetTrainerWallClock_test(nnUNetTrainerWallClock):
    """Epochs of 2 training and 2 validation iterations (nnU-Net's 50 validation iterations alone can fill a few
    seconds on a busy 2-core machine), so that a few seconds of budget hold several epochs."""
    num_iterations_per_epoch = 2
    num_val_iterations_per_epoch = 2
