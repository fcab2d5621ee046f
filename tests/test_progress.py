"""Throttled progress.png: drawn every N epochs and after the last, never in between."""
from nnunet_ssl.nnunet.progress import ThrottledProgressPlotMixin


class _Logger:
    def __init__(self):
        self.drawn_at = []
        self.owner = None

    def plot_progress_png(self, output_folder):
        self.drawn_at.append(self.owner.current_epoch)


class _Trainer:
    num_epochs = 23

    def __init__(self):
        self.logger = _Logger()
        self.logger.owner = self
        self.current_epoch = 0

    def on_train_start(self):
        pass

    def run(self, start=0):
        self.current_epoch = start
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.logger.plot_progress_png("out")  # where nnU-Net's on_epoch_end draws
            self.current_epoch += 1


class _Throttled(ThrottledProgressPlotMixin, _Trainer):
    progress_plot_every = 10


def test_draws_every_n_epochs_and_after_the_last():
    t = _Throttled()
    t.run()
    assert t.logger.drawn_at == [9, 19, 22]


def test_default_draws_every_epoch_and_a_resumed_run_is_throttled_once():
    class Plain(ThrottledProgressPlotMixin, _Trainer):
        pass
    p = Plain()
    p.run()
    assert p.logger.drawn_at == list(range(23))
    t = _Throttled()
    t.run(start=15)
    t.on_train_start()  # a second call must not wrap the wrapper
    t.current_epoch = 19
    t.logger.plot_progress_png("out")
    assert t.logger.drawn_at == [19, 22, 19]
