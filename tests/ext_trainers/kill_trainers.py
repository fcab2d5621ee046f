"""Test-only trainer for the SIGKILL/resume test (found via nnUNet_extTrainer set by the test): a few short epochs,
a checkpoint after every epoch, and checkpoint writes stretched so that the test can kill the process during one."""
import time

from nnunet_ssl.trainers.spade import SpadePretrainTrainer_smoke

WRITE_DELAY_S = 0.4


class SlowToPickle:
    """Sleeps while torch.save pickles it, i.e. while atomic_write_path's temporary file is open and the final
    name not yet replaced. Loads back as an empty dict, so checkpoints stay loadable without this module."""

    def __reduce__(self):
        time.sleep(WRITE_DELAY_S)
        return (dict, ())


class SpadePretrainTrainer_killtest(SpadePretrainTrainer_smoke):
    num_epochs = 6
    num_iterations_per_epoch = 2
    num_val_iterations_per_epoch = 1
    save_every = 1  # checkpoint_latest.pth after every epoch but the last

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "slow_write": SlowToPickle()}
