"""Fine-tuning recipe for pretrained starts: phases, frozen weights (the decoder's encoder alias), layer decay."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_ssl.nnunet.recipe import Recipe, RecipeLRScheduler, parameter_groups, parameter_kind


def _unet(cls=PlainConvUNet):
    torch.manual_seed(0)
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
              kernel_sizes=3, strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=[1, 1],
              norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
              deep_supervision=True)
    kw["n_blocks_per_stage" if cls is ResidualEncoderUNet else "n_conv_per_stage"] = [1, 1, 1]
    return cls(**kw)


def test_schedule_phases_and_lr_factors():
    r = Recipe(num_epochs=20, probe_epochs=2, decoder_warmup_epochs=4, warmup_epochs=4)
    phases = [r.phase(e) for e in range(20)]
    assert [p for p, _ in phases] == ["probe"] * 2 + ["decoder"] * 4 + ["warmup"] * 4 + ["decay"] * 10
    assert [f for _, f in phases[2:10]] == pytest.approx([0.25, 0.5, 0.75, 1.0] * 2)  # the sawtooth
    assert phases[10][1] == 1.0 and phases[19][1] == pytest.approx((1 - 9 / 10) ** 0.9)
    assert Recipe(10).phase(0) == ("decay", 1.0)
    with pytest.raises(ValueError, match="leave epochs for the poly decay"):
        Recipe(10, 5, 3, 2)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
def test_parameter_kinds_never_count_the_decoders_encoder_as_decoder(cls):
    net = _unet(cls)
    kinds = {n: parameter_kind(n) for n, _ in net.named_parameters()}
    assert {k for k, _ in kinds.values()} == {"seg", "decoder", "encoder"}
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    # the trap: network.decoder.parameters() yields every encoder weight through decoder.encoder
    assert encoder_ids <= {id(p) for p in net.decoder.parameters()}
    for name, p in net.named_parameters():
        assert (kinds[name][0] == "encoder") == (id(p) in encoder_ids), name
    assert parameter_kind("decoder.encoder.stages.2.0.convs.0.conv.weight") == ("encoder", 2)
    groups = parameter_groups(net, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    scales = {(g["kind"], g["stage"]): g["lr_scale"] for g in groups}
    assert scales[("encoder", 0)] == 0.25 and scales[("encoder", 1)] == 0.5 and scales[("encoder", 2)] == 1.0
    assert scales[("decoder", -1)] == 1.0 and scales[("seg", -1)] == 1.0


def _train(net, sched, epoch, steps=2):
    sched.step(epoch)
    x = torch.randn(2, 1, 16, 16, 16)
    for _ in range(steps):
        sched.optimizer.zero_grad()
        out = net(x)
        sum(o.square().mean() for o in out).backward()
        sched.optimizer.step()


def test_frozen_phases_leave_exactly_the_frozen_weights_unchanged():
    net = _unet()
    opt = torch.optim.SGD(parameter_groups(net), 0.1, momentum=0.99, nesterov=True, weight_decay=3e-5)
    sched = RecipeLRScheduler(opt, 0.1, Recipe(8, probe_epochs=1, decoder_warmup_epochs=1, warmup_epochs=1))
    named = dict(net.named_parameters())
    kind = {n: parameter_kind(n)[0] for n in named}

    def moved(before):
        return {kind[n] for n, p in named.items() if not torch.equal(p.detach(), before[n])}

    before = {n: p.detach().clone() for n, p in named.items()}
    _train(net, sched, 0)
    assert sched.current_phase == "probe" and moved(before) == {"seg"}
    before = {n: p.detach().clone() for n, p in named.items()}
    _train(net, sched, 1)
    assert sched.current_phase == "decoder" and moved(before) == {"seg", "decoder"}  # encoder frozen
    assert all(torch.equal(p, before[n]) for n, p in net.encoder.named_parameters(prefix="encoder"))
    before = {n: p.detach().clone() for n, p in named.items()}
    _train(net, sched, 2)
    assert sched.current_phase == "warmup" and moved(before) == {"seg", "decoder", "encoder"}
    assert {g["lr"] for g in opt.param_groups} == {0.1}
