"""Test-only trainer (found via nnUNet_extTrainer set by the resume test): dies right after an epoch's
checkpoint, as a killed job would, when NNUNET_SSL_TEST_CRASH_AFTER_EPOCH is set."""
import os

from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_ssl.trainers.spade import SpadePretrainTrainer_smoke


class SpadePretrainTrainer_crashtest(SpadePretrainTrainer_smoke):
    num_epochs = 3

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if str(epoch) == os.environ.get("NNUNET_SSL_TEST_CRASH_AFTER_EPOCH"):
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
            os._exit(17)
