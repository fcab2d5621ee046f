"""Spade's dense loss (selection + InfoNCE) eager against torch.compile on CPU, at the CPU budget's size: 4 crops x 2
views of 24 x 32 x 24 voxels, a 64-channel map at stride 2, 64 sampled voxels per crop (SpadePretrainTrainer_cpu).
View b is view a mirrored along the first axis. Prints the median forward and forward + backward times and the
first compiled call (compilation included; set TORCHINDUCTOR_CACHE_DIR to a fresh folder for a cold cache).

    python benchmarks/timing/compiled_dense_loss.py
"""
import time

import numpy as np
import torch

from nnunet_ssl.core.loss import dense_correspondence_loss


def inputs(crops: int = 4, shape=(24, 32, 24), channels: int = 64, stride: int = 2):
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    coords_a = grid.expand(crops, -1, -1, -1, -1) + torch.arange(crops, dtype=torch.float32)[:, None, None, None, None]
    coords = torch.cat([coords_a, coords_a.flip(2)])  # view b: view a mirrored along the first axis
    valid = torch.ones(2 * crops, *shape, dtype=torch.bool)
    dense = torch.randn(2 * crops, channels, *(n // stride for n in shape), requires_grad=True)
    scale, offset = torch.full((2 * crops, 3), 0.02), torch.zeros(2 * crops, 3)
    return dense, coords, valid, scale, offset, torch.arange(crops).repeat(2), (stride,) * 3


def timed(fn, backward: bool, n: int = 100) -> float:
    ts = []
    for i in range(n + 5):
        t = time.perf_counter()
        loss, _ = fn()
        if backward:
            loss.backward()
        if i >= 5:
            ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main():
    dense, coords, valid, scale, offset, sample, grid = inputs()
    args = (dense, coords, valid, scale, offset, sample, grid, 64, 1.0, 0.1, 0.1)
    gen = torch.Generator().manual_seed(0)
    eager = lambda: dense_correspondence_loss(*args, generator=gen)  # noqa: E731
    compiled_fn = torch.compile(dense_correspondence_loss, dynamic=False)
    compiled = lambda: compiled_fn(*args, generator=gen)  # noqa: E731
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"eager:    forward {timed(eager, False):.2f} ms, forward + backward {timed(eager, True):.2f} ms")
    t = time.perf_counter()
    compiled()[0].backward()
    first = time.perf_counter() - t
    print(f"compiled: first call (forward + backward) {first:.1f} s; forward {timed(compiled, False):.2f} ms, "
          f"forward + backward {timed(compiled, True):.2f} ms")


if __name__ == "__main__":
    main()
