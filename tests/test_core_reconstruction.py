"""Masked reconstruction: block masks (exact counts, cube layout) and the loss against a slow reference."""
import itertools

import pytest
import torch

from nnunet_ssl.core.loss.masked_reconstruction import masked_reconstruction_loss
from nnunet_ssl.core.masking import block_mask


@pytest.mark.parametrize("shape,block,ratio", [((24, 32, 24), 8, 0.6), ((10, 7, 9), (4, 3, 5), 0.5), ((16, 12), 4, 0.25)])
def test_block_mask_masks_whole_blocks_in_the_requested_number(shape, block, ratio):
    g = torch.Generator().manual_seed(0)
    m = block_mask(3, shape, block, ratio, generator=g)
    assert m.shape == (3, *shape) and m.dtype == torch.bool
    b = [block] * len(shape) if isinstance(block, int) else list(block)
    grid = [-(-s // k) for s, k in zip(shape, b)]
    n_blocks = 1
    for x in grid:
        n_blocks *= x
    for sample in m:
        masked_blocks = 0
        for idx in itertools.product(*[range(x) for x in grid]):
            region = sample[tuple(slice(i * k, min((i + 1) * k, s)) for i, k, s in zip(idx, b, shape))]
            assert region.all() or not region.any()  # a block is masked entirely or not at all
            masked_blocks += bool(region.all())
        assert masked_blocks == round(ratio * n_blocks)
    assert not torch.equal(m[0], m[1])  # independent per sample
    assert torch.equal(m, block_mask(3, shape, block, ratio, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="mask ratio"):
        block_mask(1, shape, block, 1.5)


def test_loss_is_the_mse_over_masked_voxels_only():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 5, 6)
    mask = torch.rand(2, 4, 5, 6) > 0.5
    loss = masked_reconstruction_loss(pred, target, mask)
    total, count = 0.0, 0
    for b, c, i, j, k in itertools.product(range(2), range(3), range(4), range(5), range(6)):
        if mask[b, i, j, k]:
            total += float(pred[b, c, i, j, k] - target[b, c, i, j, k]) ** 2
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert (pred.grad * (~mask)[:, None] == 0).all() and (pred.grad * mask[:, None] != 0).any()  # masked only
    zero = masked_reconstruction_loss(pred, target, torch.zeros_like(mask))
    assert zero.item() == 0 and zero.requires_grad
