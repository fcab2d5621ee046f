"""Fewer redraws of nnU-Net's progress.png.

nnU-Net redraws progress.png with matplotlib after every epoch: about half a second on a small CPU, which is a third
of a short CPU-budget epoch (25 iterations of a small network take about a second). Trainers with
``progress_plot_every = N`` draw it every N epochs and after the last one; the logged values are unchanged."""


class ThrottledProgressPlotMixin:
    """For nnUNetTrainer subclasses; put it before nnU-Net's trainer in the bases."""

    progress_plot_every: int = 1

    def on_train_start(self):
        super().on_train_start()
        every = int(self.progress_plot_every)
        if every > 1 and not getattr(self.logger, "_plot_throttled", False):
            draw = self.logger.plot_progress_png

            def plot_progress_png(output_folder):
                epoch = self.current_epoch  # on_epoch_end draws before it increments the epoch
                if (epoch + 1) % every == 0 or epoch >= self.num_epochs - 1:
                    draw(output_folder)

            self.logger.plot_progress_png = plot_progress_png
            self.logger._plot_throttled = True
