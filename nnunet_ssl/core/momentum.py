"""Momentum (key) encoders: the exponential moving average of MoCo (He et al. 2020), used by DrasCLR."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """EMA of the online network into the target: p_t <- m * p_t + (1 - m) * p_o; buffers are copied.

    The two modules must have the same architecture (parameters and buffers in the same order)."""
    p_on, p_tg = list(online.parameters()), list(target.parameters())
    b_on, b_tg = list(online.buffers()), list(target.buffers())
    if len(p_on) != len(p_tg) or len(b_on) != len(b_tg) or any(
            x.shape != y.shape for x, y in zip(p_on + b_on, p_tg + b_tg)):
        raise ValueError("online and target modules must have the same parameter and buffer shapes")
    if p_tg:
        torch._foreach_mul_(p_tg, momentum)
        torch._foreach_add_(p_tg, p_on, alpha=1.0 - momentum)
    if b_tg:
        torch._foreach_copy_(b_tg, b_on)
