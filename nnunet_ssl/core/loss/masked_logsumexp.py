"""Row-wise log-sum-exp of logits q @ k.T over the entries a 0/1 float mask keeps, as one autograd Function: the
denominator of the plugin's InfoNCE losses (crop-level and dense) without the logits' masked copies."""
from __future__ import annotations

import torch
from torch import Tensor


class _MaskedLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j keep_ij exp(<q_i, k_j>) with keep a 0/1 float mask; ``shift`` bounds |<q_i, k_j>|.

    Forward: one matmul, then exp(s - shift) in place, masked by a product, summed; the exponentials are kept for
    the backward, which is one scaling of them and two matmuls (instead of autograd's copies of the masked logits,
    their max, the softmax and the masked gradient)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, keep: Tensor, shift: float) -> Tensor:
        e = torch.mm(q, k.t()).sub_(shift).exp_().mul_(keep)
        total = e.sum(1)
        ctx.save_for_backward(q, k, e, total)
        return total.log().add_(shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, k, e, total = ctx.saved_tensors
        w = e * (grad / total)[:, None]  # the softmax times the incoming gradient (e kept: a retained graph reuses it)
        return (torch.mm(w, k) if ctx.needs_input_grad[0] else None,
                torch.mm(w.t(), q) if ctx.needs_input_grad[1] else None, None, None)


def masked_logsumexp(q: Tensor, k: Tensor, keep: Tensor, bound: float) -> Tensor:
    """Row-wise log-sum-exp of the logits q @ k.T over the entries where ``keep`` (n, m) is 1.0; every row keeps at
    least one entry. ``bound``: |<q_i, k_j>| <= bound (1 / temperature for unit vectors), the shift that keeps
    exp() in range; above 40 (exp(-2 * bound) would underflow float32) the rows' maxima are the shift instead."""
    if bound <= 40.0:
        return _MaskedLogSumExp.apply(q, k, keep, float(bound))
    logits = (q @ k.t()).masked_fill(keep == 0, float("-inf"))
    return torch.logsumexp(logits, dim=1)
