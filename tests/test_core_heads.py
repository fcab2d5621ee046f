import pytest
import torch

from nnunet_ssl.core.heads import DenseProjectionHead, GlobalProjectionHead


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_global_head_shape_norm_grad(spatial):
    torch.manual_seed(0)
    head = GlobalProjectionHead(8, hidden_dim=16, out_dim=12)
    x = torch.randn(3, 8, *spatial, requires_grad=True)
    y = head(x)
    assert y.shape == (3, 12)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_global_head_is_pooled():
    torch.manual_seed(0)
    head = GlobalProjectionHead(4, hidden_dim=8, out_dim=6)
    x = torch.randn(2, 4, 3, 4, 5)
    perm = torch.randperm(3 * 4 * 5)
    x_perm = x.flatten(2)[:, :, perm].reshape_as(x)
    torch.testing.assert_close(head(x), head(x_perm))
    # Equals the MLP on the spatial mean.
    expected = torch.nn.functional.normalize(head.mlp(x.mean(dim=(2, 3, 4))), dim=1)
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("dim,spatial", [(2, (5, 6)), (3, (3, 4, 5))])
@pytest.mark.parametrize("hidden", [None, 16])
def test_dense_head_shape_norm_grad(dim, spatial, hidden):
    torch.manual_seed(0)
    head = DenseProjectionHead(8, out_dim=10, hidden_dim=hidden, dim=dim)
    x = torch.randn(2, 8, *spatial, requires_grad=True)
    y = head(x)
    assert y.shape == (2, 10, *spatial)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, *spatial))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dense_head_is_pointwise():
    torch.manual_seed(0)
    head = DenseProjectionHead(4, out_dim=5, hidden_dim=7, dim=3)
    x = torch.randn(1, 4, 3, 3, 3)
    y = head(x)
    x2 = x.clone()
    x2[0, :, 1, 1, 1] += 1.0
    y2 = head(x2)
    changed = (y2 - y).abs().sum(dim=1)[0] > 0
    expected = torch.zeros(3, 3, 3, dtype=torch.bool)
    expected[1, 1, 1] = True
    assert torch.equal(changed, expected)


def test_dense_head_rejects_bad_dim():
    with pytest.raises(ValueError):
        DenseProjectionHead(4, dim=1)
    head = DenseProjectionHead(4, dim=2)
    with pytest.raises(ValueError):
        head(torch.randn(1, 4, 2, 2, 2))
