"""Test-only trainer (found via nnUNet_extTrainer set by the resume test): dies right after an epoch's
checkpoint, as a killed job would, when NNUNET_SSL_TEST_CRASH_AFTER_EPOCH is set."""
import os

from nnunet_ssl.trainers.spade import SpadePretrainTrainer_smoke


class SpadePretrainTrainer_crashtest(SpadePretrainTrainer_smoke):
    num_epochs = 3
    save_every = 1  # checkpoint_latest.pth after every epoch, written by the engine's on_epoch_end

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if str(epoch) == os.environ.get("NNUNET_SSL_TEST_CRASH_AFTER_EPOCH"):
            os._exit(17)
