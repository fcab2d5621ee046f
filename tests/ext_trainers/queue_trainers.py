"""Test-only trainer (found via nnUNet_extTrainer set by the methods test): Spade's global branch with a queue of
momentum-encoder keys."""
from nnunet_ssl.trainers.spade import SpadePretrainTrainer_smoke


class SpadePretrainTrainer_queuetest(SpadePretrainTrainer_smoke):
    global_queue_size = 16
    use_momentum_encoder = True
    momentum = 0.9
