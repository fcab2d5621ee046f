"""PDCR + UAFS: composition/affinity/loss against slow references, the UAFS block, U-Net integration, and the
trainers end to end (train -> nnUNetv2_predict -> evaluation, with and without -pretrained_weights)."""
import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BIN, clean_env, phantom_workspace, run
from test_cpu_fast import nnunet_dirs  # noqa: F401 (fixture)
from nnunet_ssl.core.composition import composition_affinity, grid_positions, label_composition
from nnunet_ssl.core.loss import affinity_weighted_loss
from nnunet_ssl.core.uafs import UAFSBlock


def _slow_composition(lab, pos, window, num_classes):
    out = []
    for b in range(lab.shape[0]):
        rows = []
        for p in pos.tolist():
            counts = np.zeros(num_classes)
            lo = [max(0, c - (w | 1) // 2) for c, w in zip(p, window)]
            hi = [min(s, c + (w | 1) // 2 + 1) for c, w, s in zip(p, window, lab.shape[1:])]
            block = lab[b][tuple(slice(a, z) for a, z in zip(lo, hi))]
            for c in range(num_classes):
                counts[c] = (block == c).sum()
            rows.append(counts / counts.sum())
        out.append(rows)
    return torch.tensor(np.array(out), dtype=torch.float32)


def test_composition_affinity_and_loss_match_slow_reference():
    torch.manual_seed(0)
    lab = torch.zeros(2, 12, 12, 12, dtype=torch.long)
    lab[0, 2:7, 3:9, 1:6] = 1
    lab[0, 8:, 8:, 8:] = 2
    lab[1, :6] = 2
    onehot = F.one_hot(lab, 3).movedim(-1, 1)
    pos = grid_positions((12, 12, 12), (4, 4, 4))
    r = label_composition(onehot, pos, (5, 5, 5))
    ref = _slow_composition(lab.numpy(), pos, (5, 5, 5), 3)
    assert torch.allclose(r, ref, atol=1e-6)
    rf = r.reshape(-1, 3)
    a = composition_affinity(rf)
    slow_a = torch.tensor([[1 - 0.5 * float((rf[i] - rf[j]).abs().sum()) for j in range(len(rf))]
                           for i in range(len(rf))])
    assert torch.allclose(a, slow_a, atol=1e-6)
    # the loss: l_ij = -log(exp(s_ij a_ij) / sum_k exp(s_ik d_ik)) over pairs i != j, tau 0.5
    z = F.normalize(torch.randn(len(rf), 8), dim=1)
    n = len(rf)
    loss, _ = affinity_weighted_loss(z, a, ~torch.eye(n, dtype=torch.bool), 0.5)
    s = (z @ z.T / 0.5).double()
    ad = a.double()
    terms = []
    for i in range(n):
        den = sum(math.exp(s[i, k] * (1 - ad[i, k])) for k in range(n) if k != i)
        terms += [-(s[i, j] * ad[i, j] - math.log(den)) for j in range(n) if j != i]
    assert loss.item() == pytest.approx(float(sum(terms)) / len(terms), rel=1e-5)


def test_label_composition_matches_slow_reference_at_borders_anisotropic_windows_and_2d():
    """Window fractions against explicit counting: positions on both borders and repeated, anisotropic windows, even
    window sizes (rounded up to odd), windows larger than the volume, 2D volumes and region channels that overlap."""
    g = torch.Generator().manual_seed(5)
    lab = torch.randint(0, 4, (2, 9, 14, 6), generator=g)
    pos = torch.tensor([[0, 0, 0], [8, 13, 5], [4, 7, 2], [0, 13, 3], [4, 7, 2], [8, 0, 5]])
    for window in ((3, 3, 3), (5, 1, 3), (4, 6, 2), (31, 3, 99)):
        r = label_composition(F.one_hot(lab, 4).movedim(-1, 1), pos, window)
        assert torch.allclose(r, _slow_composition(lab.numpy(), pos, window, 4), atol=1e-6), window
    lab2 = torch.randint(0, 3, (3, 11, 7), generator=g)
    pos2 = torch.tensor([[0, 6], [10, 0], [5, 3], [10, 6]])
    for window in ((3, 5), (9, 1), (23, 15)):
        r = label_composition(F.one_hot(lab2, 3).movedim(-1, 1), pos2, window)
        assert torch.allclose(r, _slow_composition(lab2.numpy(), pos2, window, 3), atol=1e-6), window
    # region channels (not exclusive): each channel's own fraction, as the union of the classes it holds
    regions = torch.stack([(lab >= 1), (lab >= 2)], 1).float()
    r = label_composition(regions, pos, (3, 5, 3))
    ref = _slow_composition(lab.numpy(), pos, (3, 5, 3), 4)
    assert torch.allclose(r, torch.stack([ref[..., 1:].sum(-1), ref[..., 2:].sum(-1)], -1), atol=1e-6)


def test_all_background_batch_is_finite():
    onehot = F.one_hot(torch.zeros(2, 8, 8, 8, dtype=torch.long), 3).movedim(-1, 1)
    r = label_composition(onehot, grid_positions((8, 8, 8), (4, 4, 4)), (3, 3, 3)).reshape(-1, 3)
    a = composition_affinity(r)
    assert torch.equal(a, torch.ones_like(a))
    z = torch.randn(len(r), 4, requires_grad=True)
    loss, _ = affinity_weighted_loss(z, a, ~torch.eye(len(r), dtype=torch.bool), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_uafs_block_identity_at_init_and_gradients():
    torch.manual_seed(1)
    blk = UAFSBlock(6, dim=3)
    f = torch.randn(2, 6, 5, 5, 5, requires_grad=True)
    aux = torch.randn(2, 3, 5, 5, 5)
    assert torch.equal(blk(f, aux), f)  # gamma = 0: a new block leaves pretrained features untouched
    blk(f, aux).sum().backward()
    assert blk.gamma.grad.abs() > 0
    with torch.no_grad():
        blk.gamma.fill_(0.5)
    f.grad = None
    out = blk(f, aux)
    out.square().sum().backward()
    assert out.shape == f.shape and blk.gate.weight.grad.abs().sum() > 0 and f.grad.abs().sum() > 0
    # certainty: uniform logits -> 0, one dominant class -> ~1
    c = UAFSBlock.certainty(torch.stack([torch.zeros(3, 2, 2), torch.tensor([50.0, 0, 0]).view(3, 1, 1).expand(3, 2, 2)]))
    assert torch.allclose(c[0], torch.zeros_like(c[0]), atol=1e-6) and torch.allclose(c[1], torch.ones_like(c[1]))


@pytest.mark.parametrize("arch", ["plain", "resenc"])
def test_uafs_network_keeps_unet_keys_and_loads_pretrained_weights(tmp_path, arch):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunet_ssl.nnunet.feature_decoder import convert_decoder
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d, kernel_sizes=3,
              strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
              norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
              deep_supervision=True)
    make = (lambda: PlainConvUNet(n_conv_per_stage=2, **kw)) if arch == "plain" else \
        (lambda: ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1], **kw))
    torch.manual_seed(2)
    pretrained = make()
    torch.save({"network_weights": pretrained.state_dict()}, tmp_path / "ckpt.pth")
    net = convert_decoder(make(), uafs_stages=(-2, -1))
    new_keys = set(net.state_dict()) - set(pretrained.state_dict())
    assert new_keys and all(".seg_layers." in k for k in new_keys)
    assert set(pretrained.state_dict()) <= set(net.state_dict())
    load_pretrained_weights(net, str(tmp_path / "ckpt.pth"))
    for k, v in pretrained.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(net.state_dict()[k], v)
    x = torch.randn(2, 1, 16, 16, 16)
    net.decoder.capture_stages = (0, 1)
    out = net(x)
    assert [o.shape[2:] for o in out] == [torch.Size([16] * 3), torch.Size([8] * 3)]
    assert set(net.decoder.captured) == {0, 1}
    # at initialisation the UAFS blocks are the identity: the decoder features equal the pretrained U-Net's
    # (the segmentation layers themselves are task-specific and never transferred)
    ref = convert_decoder(pretrained)
    ref.decoder.capture_stages = (0, 1)
    ref(x)
    for s in (0, 1):
        assert torch.allclose(net.decoder.captured[s], ref.decoder.captured[s], atol=1e-6)


DATASET = 994
NAME = "Dataset994_PDCR"


@pytest.fixture(scope="module")
def pdcr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdcr")
    phantom_workspace(root, DATASET, "PDCR", num_train=6, num_test=2, shape=(32, 32, 32), seed=11)
    env = clean_env(root)
    run([BIN / "nnunet-ssl", "plan", "-d", DATASET, "-pl", "nnUNetPlannerTiny"], env)
    run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "all", "-tr", "SpadePretrainTrainer_smoke", "-p",
         "nnUNetPlansTiny", "-device", "cpu"], env)
    return root


@pytest.mark.slow
# PDCR from scratch and PDCR + UAFS from pretrained weights: every trainer and both starts, in two runs
@pytest.mark.parametrize("trainer,pretrained", [("PDCRTrainer_smoke", False), ("PDCRUAFSTrainer_smoke", True)])
def test_pdcr_trainers_train_predict_evaluate(pdcr_data, trainer, pretrained):
    root = pdcr_data
    results = root / f"results_{trainer}_{pretrained}"
    env = clean_env(root, nnUNet_results=results)
    cmd = [BIN / "nnUNetv2_train", DATASET, "3d_fullres", "0", "-tr", trainer, "-p", "nnUNetPlansTiny",
           "-device", "cpu"]
    if pretrained:
        cmd += ["-pretrained_weights", root / "results" / NAME /
                "SpadePretrainTrainer_smoke__nnUNetPlansTiny__3d_fullres" / "fold_all" / "checkpoint_final.pth"]
    res = run(cmd, env)
    assert ("Loading pretrained weights" in res.stdout) == pretrained
    out = results / NAME / f"{trainer}__nnUNetPlansTiny__3d_fullres"
    log = next((out / "fold_0").glob("training_log_*.txt")).read_text()
    assert "pdcr_cross" in log
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["pdcr_heads"] and all(v.device.type == "cpu" for v in ckpt["network_weights"].values())
    assert any(".uafs.seg_layers." in k for k in ckpt["network_weights"]) == ("UAFS" in trainer)
    pred = root / f"pred_{trainer}_{pretrained}"
    run([BIN / "nnUNetv2_predict", "-i", root / "raw" / NAME / "imagesTs", "-o", pred, "-d", DATASET, "-c",
         "3d_fullres", "-f", "0", "-tr", trainer, "-p", "nnUNetPlansTiny", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    run([BIN / "nnUNetv2_evaluate_folder", root / "raw" / NAME / "labelsTs", pred, "-djfile", out / "dataset.json",
         "-pfile", out / "plans.json"], env)
    summary = json.loads((pred / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and 0 <= summary["foreground_mean"]["Dice"] <= 1


def test_pdcr_skips_a_step_with_non_finite_gradients(tiny_dataset, monkeypatch):
    """A NaN in the input gives NaN gradients: the step is skipped and counted, the weights stay finite (before the
    shared guarded step, PDCR took it and every weight became NaN)."""
    from nnunet_ssl.trainers import PDCRTrainer_smoke
    from conftest import TINY_DATASET
    for k, v in clean_env(tiny_dataset).items():
        monkeypatch.setenv(k, v)
    pre = tiny_dataset / "preprocessed" / TINY_DATASET
    plans = json.loads((pre / "nnUNetPlansTiny.json").read_text())
    plans["continue_training"] = False
    tr = PDCRTrainer_smoke(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                           device=torch.device("cpu"))
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    batch = next(dl_tr)
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    tr.train_step(batch)
    assert any(not torch.equal(before[k], v) for k, v in tr.network.state_dict().items())  # a normal step moves
    batch = next(dl_tr)
    batch["data"][0, 0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    tr.train_step(batch)
    after = tr.network.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)
    assert tr.skipped_steps_epoch == 1


def test_pdcr_checkpoint_round_trip_restores_heads_and_optimizer(tiny_dataset, monkeypatch, tmp_path):
    from nnunet_ssl.trainers import PDCRTrainer_smoke
    from conftest import TINY_DATASET
    for k, v in clean_env(tiny_dataset, nnUNet_results=tmp_path).items():
        monkeypatch.setenv(k, v)
    pre = tiny_dataset / "preprocessed" / TINY_DATASET
    plans = json.loads((pre / "nnUNetPlansTiny.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())

    def trainer():
        tr = PDCRTrainer_smoke(dict(plans, continue_training=False), "3d_fullres", "all", dataset_json,
                               device=torch.device("cpu"))
        tr.initialize()
        return tr

    tr = trainer()
    dl_tr, _ = tr.get_dataloaders()
    tr.train_step(next(dl_tr))
    tr.save_checkpoint(str(tmp_path / "ckpt.pth"))
    other = trainer()
    other.load_checkpoint(str(tmp_path / "ckpt.pth"))
    for a, b in zip(tr.pdcr_heads.state_dict().values(), other.pdcr_heads.state_dict().values()):
        assert torch.equal(a, b)
    assert {id(p) for p in other.pdcr_heads.parameters()} <= \
        {id(p) for g in other.optimizer.param_groups for p in g["params"]}  # the optimizer trains the loaded heads
    momentum = [s["momentum_buffer"] for s in tr.optimizer.state_dict()["state"].values()]
    loaded = [s["momentum_buffer"] for s in other.optimizer.state_dict()["state"].values()]
    assert len(momentum) == len(loaded) > 0 and all(torch.equal(a, b.contiguous()) for a, b in zip(momentum, loaded))


def test_pdcr_loss_projects_sampled_rows_as_the_whole_map_would():
    """``projections`` applied to the sampled feature rows give the loss and gradients of 1x1 convolutions applied to
    the whole maps first (what the trainer did before): loss rel 1e-5, gradients (maps and heads) rtol 1e-4 / atol
    1e-6, with ignore labels and a random sample subset (same generator seed)."""
    from nnunet_ssl.core.loss.pdcr import pdcr_loss
    from nnunet_ssl.trainers.pdcr import _project_rows
    g = torch.Generator().manual_seed(7)
    lab = torch.randint(0, 3, (2, 16, 16, 16), generator=g)
    ignore = torch.rand(2, 16, 16, 16, generator=g) < 0.2
    onehot = F.one_hot(lab, 3).movedim(-1, 1).float()
    strides = [(1, 1, 1), (2, 2, 2)]
    maps = [torch.randn(2, 6, 16, 16, 16, generator=g), torch.randn(2, 10, 8, 8, 8, generator=g)]
    torch.manual_seed(0)
    heads = [torch.nn.Conv3d(6, 4, 1), torch.nn.Conv3d(10, 4, 1)]
    kwargs = dict(grid_stride=4, window_scale=2, temperature=0.5, weight=0.01, cross_weight=0.02, max_samples=40)

    def run(rows: bool):
        inputs = [m.clone().requires_grad_() for m in maps]
        if rows:
            feats, proj = inputs, [functools.partial(_project_rows, h) for h in heads]
        else:
            feats, proj = [h(x) for h, x in zip(heads, inputs)], None
        loss, _ = pdcr_loss(feats, strides, onehot, ignore, generator=torch.Generator().manual_seed(1),
                            projections=proj, **kwargs)
        params = [p for h in heads for p in h.parameters()]
        grads = torch.autograd.grad(loss, inputs + params)
        return loss, grads

    (loss_rows, g_rows), (loss_maps, g_maps) = run(True), run(False)
    assert loss_rows.item() == pytest.approx(loss_maps.item(), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_rows, g_maps))
    assert all(a.abs().sum() > 0 for a in g_rows)  # every input and head takes part


def test_pdcr_loss_of_two_stages_matches_slow_reference():
    """core.loss.pdcr_loss against explicit loops: grid samples (skipping ignore-labelled ones), their feature voxels
    at each stage's stride, window compositions, both stage terms and the cross-layer term with their weights."""
    from nnunet_ssl.core.loss.pdcr import pdcr_loss
    g = torch.Generator().manual_seed(3)
    lab = torch.randint(0, 3, (2, 8, 8, 8), generator=g)
    ignore = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    ignore[1, 2, 2, 2] = True  # the grid sample at (2, 2, 2) of case 1 drops out
    onehot = F.one_hot(lab, 3).movedim(-1, 1).float()
    strides = [(1, 1, 1), (2, 2, 2)]
    feats = [torch.randn(2, 5, 8, 8, 8, generator=g), torch.randn(2, 5, 4, 4, 4, generator=g)]
    total, terms = pdcr_loss(feats, strides, onehot, ignore, grid_stride=4, window_scale=1, temperature=0.5,
                             weight=0.3, cross_weight=0.7, max_samples=10_000)

    samples = [(b, p) for b in range(2) for p in itertools.product((2, 6), repeat=3) if not ignore[b][p]]
    assert len(samples) == 15

    def composition(b, p, window):
        h = window // 2
        block = lab[b][tuple(slice(max(0, c - h), c + h + 1) for c in p)]
        return torch.tensor([float((block == c).sum()) for c in range(3)]) / block.numel()

    def feature(k, b, p):
        return F.normalize(feats[k][b][(slice(None),) + tuple(c // strides[k][0] for c in p)], dim=0)

    z = [[feature(k, b, p) for b, p in samples] for k in range(2)]
    r = [[composition(b, p, 1 * strides[k][0] + 1) for b, p in samples] for k in range(2)]

    def slow_term(za, ra, zc, rc, same):
        out = []
        for i in range(len(za)):
            pairs = [j for j in range(len(zc)) if not (same and j == i)]
            aff = {j: 1 - 0.5 * float((ra[i] - rc[j]).abs().sum()) for j in pairs}
            s = {j: float(za[i] @ zc[j]) / 0.5 for j in pairs}
            den = sum(math.exp(s[j] * (1 - aff[j])) for j in pairs)
            out += [-(s[j] * aff[j] - math.log(den)) for j in pairs]
        return sum(out) / len(out)

    ref = [slow_term(z[0], r[0], z[0], r[0], True), slow_term(z[1], r[1], z[1], r[1], True),
           slow_term(z[0], r[0], z[1], r[1], False)]
    assert terms["pdcr_0"].item() == pytest.approx(ref[0], rel=1e-5)
    assert terms["pdcr_1"].item() == pytest.approx(ref[1], rel=1e-5)
    assert terms["pdcr_cross"].item() == pytest.approx(ref[2], rel=1e-5)
    assert total.item() == pytest.approx(0.3 * (ref[0] + ref[1]) + 0.7 * ref[2], rel=1e-5)


def test_pdcr_on_the_warm_up_recipe_keeps_its_heads_through_the_schedule(nnunet_dirs):
    """PDCRFinetuneTrainer: nnUNetTrainerFinetune's warm-up schedule with the heads in the optimizer exactly once; the
    warm-up -> poly switch keeps the heads, their momentum and the optimizer; every group follows the schedule's lr;
    a resumed trainer rebuilds the two-group optimizer of the phase it resumes in and loads its state."""
    from test_cpu_fast import DATASET_JSON, _plans, _segmentation_batch
    from nnunet_ssl.trainers import PDCRFinetuneTrainer_smoke, nnUNetTrainerFinetune_smoke
    cpu = torch.device("cpu")

    def trainer(cls):
        torch.manual_seed(0)
        tr = cls(_plans(), "3d_fullres", 0, DATASET_JSON, cpu)
        tr.cpu_bf16 = False
        tr.initialize()
        return tr

    tr = trainer(PDCRFinetuneTrainer_smoke)
    heads = {id(p) for p in tr.pdcr_heads.parameters()}

    def groups_holding_heads(opt):
        return [i for i, g in enumerate(opt.param_groups) if heads & {id(p) for p in g["params"]}]

    assert groups_holding_heads(tr.optimizer) == [1] and len(tr.optimizer.param_groups) == 2
    scratch = trainer(nnUNetTrainerFinetune_smoke)  # the same schedule without the regulariser
    for epoch in range(2):  # epoch 0 warms up (warmup_epochs 1), epoch 1 switches to the poly decay
        tr.current_epoch = scratch.current_epoch = epoch
        for g in tr.optimizer.param_groups:
            g["lr"] = 123.0  # overwritten by the schedule's step, in every group
        tr.on_train_epoch_start()
        scratch.on_train_epoch_start()
        assert [g["lr"] for g in tr.optimizer.param_groups] == [scratch.optimizer.param_groups[0]["lr"]] * 2
        before = [p.detach().clone() for p in tr.pdcr_heads.parameters()]
        out = tr.train_step(_segmentation_batch(epoch))
        assert np.isfinite(out["loss"]) and "pdcr_cross" in out
        assert all(not torch.equal(a, b) for a, b in zip(before, tr.pdcr_heads.parameters()))  # the heads train
        assert groups_holding_heads(tr.optimizer) == [1] and len(tr.optimizer.param_groups) == 2
        if epoch == 0:
            warm_optimizer = tr.optimizer
            momentum = {id(p): tr.optimizer.state[p]["momentum_buffer"].clone() for p in tr.pdcr_heads.parameters()}
    assert tr.training_stage == "train" and tr.optimizer is warm_optimizer  # nnU-Net keeps the warm-up's momentum
    assert all(not torch.equal(momentum[id(p)], tr.optimizer.state[p]["momentum_buffer"])
               for p in tr.pdcr_heads.parameters())
    tr.save_checkpoint(str(nnunet_dirs / "ckpt.pth"))
    resumed = trainer(PDCRFinetuneTrainer_smoke)
    resumed.load_checkpoint(str(nnunet_dirs / "ckpt.pth"))
    assert resumed.training_stage == "train" and len(resumed.optimizer.param_groups) == 2
    for a, b in zip(resumed.pdcr_heads.parameters(), tr.pdcr_heads.parameters()):
        assert torch.equal(a, b.contiguous())
        assert torch.equal(resumed.optimizer.state[a]["momentum_buffer"], tr.optimizer.state[b]["momentum_buffer"])

