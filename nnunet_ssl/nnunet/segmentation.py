"""What the plugin adds to nnU-Net's segmentation trainers (fine-tuning, PDCR, the stock wall-clock row), composed
in one place: a segmentation trainer of the plugin is ``class X(SegmentationTrainerMixin, <an nnU-Net trainer>)``."""
from __future__ import annotations

import os

from nnunet_ssl.nnunet.budget import DeclaredBudgetMixin
from nnunet_ssl.nnunet.checkpoint import CheckpointFormatMixin, CrashSafeCheckpointsMixin
from nnunet_ssl.nnunet.cpu_fast import CPUFastSegmentationMixin
from nnunet_ssl.nnunet.progress import ThrottledProgressPlotMixin

SKIP_FINAL_VALIDATION = "NNUNET_SSL_SKIP_FINAL_VALIDATION"


class SkipFinalValidationMixin:
    """``NNUNET_SSL_SKIP_FINAL_VALIDATION=1`` skips nnU-Net's final validation: nnunet-ssl benchmark scores its
    models on a held-out test set with nnUNetv2_predict, so validating the monitoring cases would only cost time."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(SKIP_FINAL_VALIDATION) == "1":
            self.print_to_log_file(f"{SKIP_FINAL_VALIDATION}=1: skipping nnU-Net's final validation")
            return
        super().perform_actual_validation(save_probabilities)


class SegmentationTrainerMixin(DeclaredBudgetMixin, SkipFinalValidationMixin, CrashSafeCheckpointsMixin,
                               CPUFastSegmentationMixin, ThrottledProgressPlotMixin, CheckpointFormatMixin):
    """Class-declared budgets, the benchmark's skipped final validation, crash-safe checkpoint writes, the CPU fast
    path (bf16 + channels-last where the CPU has native bf16), the throttled progress plot, and the plugin's one
    checkpoint format and loader (a working ``--c``; ``optimizer_for_epoch`` for schedules with phases)."""
