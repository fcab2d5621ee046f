"""The pretraining trainers' log: nnU-Net's LocalLogger plus one list per loss term, and their progress plot."""
from __future__ import annotations

from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.logging.nnunet_logger import LocalLogger


class ContrastiveLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger plus one list per logged loss term; draws a pretraining progress plot."""

    def __init__(self, terms: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        self.terms = list(terms)
        for t in self.terms:
            self.my_fantastic_logging[f"train_{t}"] = []
            self.my_fantastic_logging[f"val_{t}"] = []

    def _epochs_logged(self) -> int:
        keys = ["train_losses", "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps"]
        keys += [f"{p}_{t}" for t in self.terms for p in ("train", "val")]
        return min(len(self.my_fantastic_logging[k]) for k in keys)

    def plot_progress_png(self, output_folder):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self._epochs_logged()
        if n == 0:
            return
        log = self.my_fantastic_logging
        x = list(range(n))
        loss_terms = [t for t in self.terms if not t.startswith("mean_")]
        count_terms = [t for t in self.terms if t.startswith("mean_")]
        fig, axes = plt.subplots(4, 1, figsize=(12, 18))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:n], "b-", lw=2, label="loss_tr")
        ax.plot(x, log["val_losses"][:n], "r-", lw=2, label="loss_val")
        for t in loss_terms:
            ax.plot(x, log[f"train_{t}"][:n], "--", label=f"{t}_tr")
            ax.plot(x, log[f"val_{t}"][:n], ":", label=f"{t}_val")
        ax.set_xlabel("epoch"); ax.set_ylabel("contrastive loss"); ax.legend(loc="upper right")
        ax = axes[1]
        for t in count_terms:
            ax.plot(x, log[f"train_{t}"][:n], label=t)
        ax.set_xlabel("epoch"); ax.set_ylabel("pairs per anchor (train)"); ax.set_yscale("symlog")
        if count_terms:
            ax.legend(loc="upper right")
        ax = axes[2]
        ax.plot(x, [e - s for e, s in zip(log["epoch_end_timestamps"][:n], log["epoch_start_timestamps"][:n])],
                "b-", lw=2, label="epoch duration")
        ax.set_ylim(bottom=0); ax.set_xlabel("epoch"); ax.set_ylabel("time [s]"); ax.legend(loc="upper right")
        ax = axes[3]
        ax.plot(x, log["lrs"][:n], "b-", lw=2, label="learning rate")
        ax.set_xlabel("epoch"); ax.set_ylabel("learning rate"); ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)
