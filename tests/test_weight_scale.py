import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ssl.nnunet.weight_scale import HE_CHANNEL_NORM, reset_conv_scales, scale_invariant_convs


def _net(kind):
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=3,
              strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
              norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
              nonlin_kwargs={"inplace": True}, deep_supervision=False)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=[2, 2, 2], **kw)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], **kw)


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_reset_keeps_the_function_and_sets_he_scale(kind):
    torch.manual_seed(0)
    net = _net(kind).eval()
    convs = scale_invariant_convs(net)
    # what pretraining does to the scales: grow every output channel by its own factor
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "conv") and hasattr(m, "norm"):
                f = torch.exp(torch.rand(m.conv.weight.shape[0]) * 4.0)  # 1x to 55x
                m.conv.weight.mul_(f.view(-1, 1, 1, 1, 1))
                if m.conv.bias is not None:
                    m.conv.bias.mul_(f)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)
    grown = {k: v.clone() for k, v in net.state_dict().items()}
    reset = reset_conv_scales(grown, convs)
    net.load_state_dict(reset)
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    n_convs = 0
    for m in net.modules():
        if hasattr(m, "conv") and hasattr(m, "norm"):
            n_convs += 1
            norms = m.conv.weight.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, HE_CHANNEL_NORM))
    assert n_convs == len(convs) > 0
    # layers not followed by an InstanceNorm keep their weights
    for k, v in grown.items():
        if "transpconvs" in k or "seg_layers" in k or ".norm." in k:
            assert torch.equal(reset[k], v), k
    # and the input state dict is left alone
    assert not torch.equal(grown[convs[0][0][0]], reset[convs[0][0][0]])


def test_every_alias_of_a_conv_is_rescaled():
    net = _net("plain")
    convs = scale_invariant_convs(net)
    keys = [k for w, b in convs for k in w + b]
    # PlainConvUNet: each conv as .conv. and .all_modules.0., the encoder also under decoder.encoder.
    assert any(k.startswith("decoder.encoder.") for k in keys) and any(".all_modules.0." in k for k in keys)
    conv_keys = {k for k in net.state_dict() if (".conv." in k or ".all_modules.0." in k) and "transpconv" not in k}
    assert conv_keys == set(keys)


def test_zero_channels_stay_zero():
    net = _net("plain")
    convs = scale_invariant_convs(net)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    w_key = convs[0][0][0]
    sd[w_key][0] = 0.0
    out = reset_conv_scales(sd, convs)
    assert torch.equal(out[w_key][0], torch.zeros_like(out[w_key][0]))
    assert torch.isfinite(out[w_key]).all()
