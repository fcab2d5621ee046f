import pytest
import torch
import torch.nn.functional as F

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
    # Reference: first layer + ReLU on every voxel's feature vector, mean over voxels, batch-normalised over the
    # crops (training mode: the batch's own mean and biased variance), second layer.
    lin1, lin2 = head.mlp[0], head.mlp[2]
    hidden = torch.stack([
        torch.stack([torch.relu(lin1(x[b, :, i, j, k])) for i in range(3) for j in range(4) for k in range(5)]).mean(0)
        for b in range(2)])
    normed = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + head.norm.eps)
    expected = torch.nn.functional.normalize(lin2(normed), dim=1)
    torch.testing.assert_close(head(x), expected)
    # Without BatchNorm: the same without the normalisation.
    plain = GlobalProjectionHead(4, hidden_dim=8, out_dim=6, batch_norm=False)
    plain.mlp.load_state_dict(head.mlp.state_dict())
    torch.testing.assert_close(plain(x), torch.nn.functional.normalize(lin2(hidden), dim=1))


def test_global_head_separates_instance_normalised_crops():
    # After InstanceNorm every channel has mean 0 in every crop: pooling first gives all crops the same
    # embedding; the per-voxel projection still sees how the channels co-vary.
    torch.manual_seed(0)
    head = GlobalProjectionHead(8, hidden_dim=32, out_dim=16)
    x = torch.nn.functional.instance_norm(torch.randn(4, 8, 4, 4, 4) * torch.rand(4, 8, 1, 1, 1)
                                          + torch.randn(4, 1, 4, 4, 4))
    pooled_first = torch.nn.functional.normalize(head.mlp(x.mean(dim=(2, 3, 4))), dim=1)
    torch.testing.assert_close(pooled_first[1:], pooled_first[:1].expand(3, -1), atol=1e-5, rtol=0)
    z = head(x)
    assert min((z[i] - z[j]).abs().max() for i in range(4) for j in range(i)) > 1e-2


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
    head.normalize = False  # the projection itself, for a loss that normalises what it reads
    torch.testing.assert_close(F.normalize(head(x), dim=1), y)


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

