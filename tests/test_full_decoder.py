"""Heads on the full-resolution decoder output train every decoder stage (nothing handed over at random)."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ssl.core.heads import DenseProjectionHead, ReconstructionHead
from nnunet_ssl.nnunet.model import ContrastiveModel


def _net():
    torch.manual_seed(0)
    return PlainConvUNet(1, 4, [4, 8, 16, 16], torch.nn.Conv3d, 3, [1, 2, 2, 2], 1, 3, [1, 1, 1],
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU)


def _grads(heads, inputs, decoder_stage=-2):
    net = _net()
    model = ContrastiveModel(net, torch.nn.ModuleDict(heads), inputs, decoder_stage)
    out = model(torch.randn(2, 1, 16, 16, 16))
    sum(o.float().square().mean() for o in out.values()).backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters()}, out


def test_full_head_trains_every_decoder_stage_and_dense_head_stops_at_its_stage():
    got, out = _grads({"recon": ReconstructionHead(4, 1)}, {"recon": "full"})
    assert out["recon"].shape == (2, 1, 16, 16, 16)
    assert all(v for n, v in got.items() if n.startswith("decoder.stages") or n.startswith("encoder."))
    assert not any(v for n, v in got.items() if ".seg_layers." in n)
    # Spade's local branch alone (stage -2) leaves the last decoder stage untrained: the gap reconstruction fills
    got, _ = _grads({"local": DenseProjectionHead(8, 4)}, {"local": "decoder"})
    assert not any(v for n, v in got.items() if n.startswith("decoder.stages.2."))
    assert all(v for n, v in got.items() if n.startswith("decoder.stages.1."))
    # both together: the decoder feature is still the one of decoder_stage
    got, out = _grads({"local": DenseProjectionHead(8, 4), "recon": ReconstructionHead(4, 1)},
                      {"local": "decoder", "recon": "full"})
    assert out["local"].shape[2:] == (8, 8, 8) and all(v for n, v in got.items() if n.startswith("decoder.stages"))
