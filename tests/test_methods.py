"""Every pretraining method end to end through the real nnUNetv2_train on tiny data, its checkpoint handed to the
stock loader, method state restored from checkpoints, and the inspection commands."""
import json

import numpy as np
import pytest
import torch

from conftest import BIN, clean_env, phantom_workspace, run

pytestmark = pytest.mark.slow
DATASET = 993
NAME = "Dataset993_Methods"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    phantom_workspace(root, DATASET, "Methods", num_train=6, num_test=1, shape=(32, 32, 32), seed=7)
    run([BIN / "nnunet-ssl", "plan", "-d", DATASET, "-pl", "nnUNetPlannerTiny", "-c", "3d_fullres", "2d"],
        clean_env(root))
    return root


def _load_into_stock_net(root, ckpt, configuration):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(root / "preprocessed" / NAME / "nnUNetPlansTiny.json"))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(configuration), 1, 5, True)
    load_pretrained_weights(net, str(ckpt))
    w = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    sd = net.state_dict()
    assert set(w) == set(sd)
    assert all(torch.equal(sd[k], v) for k, v in w.items() if ".seg_layers." not in k)


@pytest.mark.parametrize("trainer,configuration,terms", [
    ("SimCLRPretrainTrainer_smoke", "3d_fullres", ["mean_neg_global"]),
    ("PCLPretrainTrainer_smoke", "2d", ["mean_pos_global"]),
    ("SpadeSoftPretrainTrainer_smoke", "3d_fullres", ["mean_affinity_global", "local"]),
    ("DrasCLRPretrainTrainer_smoke", "3d_fullres", ["neighbour", "mean_neg"]),
    ("MaskedReconPretrainTrainer_smoke", "3d_fullres", ["recon"]),
    ("SpadeReconPretrainTrainer_smoke", "3d_fullres", ["recon", "global", "local"]),
])
def test_method_runs_and_hands_off(tiny, trainer, configuration, terms):
    run([BIN / "nnUNetv2_train", DATASET, configuration, "all", "-tr", trainer, "-p", "nnUNetPlansTiny",
         "-device", "cpu"], clean_env(tiny))
    out = tiny / "results" / NAME / f"{trainer}__nnUNetPlansTiny__{configuration}" / "fold_all"
    ckpt = out / "checkpoint_final.pth"
    _load_into_stock_net(tiny, ckpt, configuration)
    log = torch.load(ckpt, map_location="cpu", weights_only=False)["logging"]
    for t in terms:
        assert len(log[f"train_{t}"]) == 2 and all(np.isfinite(log[f"train_{t}"])), t
    assert (out / "progress.png").exists()


def test_drasclr_checkpoint_restores_queue_and_momentum_encoder(tiny):
    trainer = "DrasCLRPretrainTrainer_smoke"
    ckpt_file = tiny / "results" / NAME / f"{trainer}__nnUNetPlansTiny__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    if not ckpt_file.exists():
        run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "all", "-tr", trainer, "-p", "nnUNetPlansTiny",
             "-device", "cpu"], clean_env(tiny))
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    extra = ckpt["ssl_extra_state"]
    assert (extra["queue"]["subject"] >= 0).any(), "training must have filled the queue"
    # the online network moved away from the momentum encoder, which follows it only a little (momentum 0.999).
    # checkpoint_final hands the online convs over rescaled to He norms per output channel, so compare directions
    online = ckpt["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].flatten(1).double()
    key = extra["key_model"]["network.encoder.stages.0.0.convs.0.conv.weight"].flatten(1).double()
    online, key = online / online.norm(dim=1, keepdim=True), key / key.norm(dim=1, keepdim=True)
    cos = (online * key).sum(1)
    assert (cos > 0.9).all() and (cos < 1 - 1e-7).any()

    from nnunet_ssl.trainers import DrasCLRPretrainTrainer_smoke
    pre = tiny / "preprocessed" / NAME
    plans = json.loads((pre / "nnUNetPlansTiny.json").read_text())
    plans["continue_training"] = True
    import os
    os.environ.update(clean_env(tiny))
    tr = DrasCLRPretrainTrainer_smoke(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                                      device=torch.device("cpu"))
    tr.load_checkpoint(str(ckpt_file))
    for k, v in extra["queue"].items():
        assert torch.equal(tr.queue.state_dict()[k].cpu(), v), k
    for k, v in extra["key_model"].items():
        assert torch.equal(tr.key_model.state_dict()[k].cpu(), v), k
    assert tr.current_epoch == 2


def test_spade_queue_fills_hands_off_and_is_restored(tiny):
    import os
    trainer = "SpadeQueuePretrainTrainer_smoke"  # queue of 256 momentum-encoder keys
    run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "all", "-tr", trainer, "-p", "nnUNetPlansTiny", "-device",
         "cpu"], clean_env(tiny))
    ckpt_file = tiny / "results" / NAME / f"{trainer}__nnUNetPlansTiny__3d_fullres" / "fold_all" / \
        "checkpoint_final.pth"
    _load_into_stock_net(tiny, ckpt_file, "3d_fullres")
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    queue = ckpt["ssl_extra_state"]["global_queue"]
    written = int(queue["filled"].sum())
    assert written == 16, "each of the 2 x 2 training steps enqueues its 2 cases x 2 views (validation steps none)"
    # the queued keys are unit momentum-encoder embeddings at canonical crop centres
    keys = queue["keys"][queue["filled"]]
    assert torch.allclose(keys.norm(dim=1), torch.ones(written), atol=1e-2)  # bf16 autocast where the CPU has it
    pos = queue["positions"][queue["filled"]]
    assert ((pos >= -0.5) & (pos <= 1.5)).all()
    log = ckpt["logging"]
    assert all(np.isfinite(log["train_global"]))

    from nnunet_ssl.trainers import SpadeQueuePretrainTrainer_smoke
    pre = tiny / "preprocessed" / NAME
    plans = json.loads((pre / "nnUNetPlansTiny.json").read_text())
    plans["continue_training"] = True
    os.environ.update(clean_env(tiny))
    tr = SpadeQueuePretrainTrainer_smoke(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                                         device=torch.device("cpu"))
    tr.load_checkpoint(str(ckpt_file))
    for k, v in queue.items():
        assert torch.equal(tr.global_queue.state_dict()[k].cpu(), v), k
    # a checkpoint without the queue (say, Spade's, which keeps none) is refused with the reason, and nothing is
    # loaded from it: neither its network weights nor the momentum encoder it does hold
    stripped = {**ckpt, "network_weights": {k: torch.zeros_like(v) for k, v in ckpt["network_weights"].items()},
                "ssl_extra_state": {"key_model": {k: torch.zeros_like(v)
                                                  for k, v in ckpt["ssl_extra_state"]["key_model"].items()}}}
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    with pytest.raises(ValueError, match="no 'global_queue' state although SpadeQueuePretrainTrainer_smoke keeps it"):
        tr.load_checkpoint(stripped)
    for k, v in tr.network.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in ckpt["ssl_extra_state"]["key_model"].items():
        assert torch.equal(tr.key_model.state_dict()[k].cpu(), v), k
    # a queue of another size (written with another global_queue_size) is refused in one line, before any weight
    small = {k: v[:16] if v.dim() else v for k, v in queue.items()}
    with pytest.raises(ValueError, match=r"checkpoint's 'global_queue' state does not fit "
                                         r"SpadeQueuePretrainTrainer_smoke \(keys: \(16, 128\) in the checkpoint, "
                                         r"\(256, 128\) here\)"):
        tr.load_checkpoint({**stripped, "ssl_extra_state": {**ckpt["ssl_extra_state"], "global_queue": small}})
    for k, v in tr.network.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inspect_pairs_draws_the_selection(tiny, tmp_path):
    png = tmp_path / "pairs.png"
    res = run([BIN / "nnunet-ssl", "inspect-pairs", "-d", DATASET, "-tr", "SpadePretrainTrainer_smoke", "-p",
               "nnUNetPlansTiny", "-o", png], clean_env(tiny))
    assert png.stat().st_size > 5000
    import re
    m = re.search(r"anchor 0 of (\d+) crops; anchor (\d+), positive (\d+), negative (\d+), excluded (\d+)",
                  res.stdout)
    assert m, res.stdout[-500:]
    n, a, p, ng, ex = map(int, m.groups())
    assert a == 1 and p >= 1 and a + p + ng + ex == n  # the other view is always a positive


def test_inspect_embeddings_on_a_pretrained_checkpoint(tiny, tmp_path):
    trainer = "SpadePretrainTrainer_smoke"
    ckpt = tiny / "results" / NAME / f"{trainer}__nnUNetPlansTiny__3d_fullres" / "fold_all" / "checkpoint_final.pth"
    if not ckpt.exists():
        run([BIN / "nnUNetv2_train", DATASET, "3d_fullres", "all", "-tr", trainer, "-p", "nnUNetPlansTiny",
             "-device", "cpu"], clean_env(tiny))
    png = tmp_path / "emb.png"
    res = run([BIN / "nnunet-ssl", "inspect-embeddings", ckpt, "-d", DATASET, "-o", png], clean_env(tiny))
    assert png.stat().st_size > 5000 and "canonical units from the corresponding point" in res.stdout
