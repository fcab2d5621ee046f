"""Every hyper-parameter of the Spade trainers reaches the function that uses it (distinct values, recorded)."""
import torch

import nnunet_ssl.trainers.recon as recon_mod
import nnunet_ssl.trainers.spade as spade_mod


def _recorder(calls, name, value):
    def fn(*args, **kwargs):
        calls[name] = (args, kwargs)
        return torch.tensor(value), {"mean_pos": torch.tensor(0.0), "mean_neg": torch.tensor(0.0)}
    return fn


def _bare(cls):
    tr = object.__new__(cls)
    tr.device, tr.step_generator = torch.device("cpu"), None
    tr.decoder_grid = lambda: ((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    return tr


def _batch():
    return {"canonical_center": torch.rand(4, 3), "sample_index": torch.tensor([0, 1, 0, 1]),
            "coords": torch.rand(4, 3, 4, 4, 4), "valid": torch.ones(4, 4, 4, 4, dtype=torch.bool),
            "canonical_scale": torch.ones(4, 3), "canonical_offset": torch.zeros(4, 3)}


def test_spade_hyperparameters_reach_their_losses(monkeypatch):
    calls = {}
    monkeypatch.setattr(spade_mod, "spade_global_loss", _recorder(calls, "global", 2.0))
    monkeypatch.setattr(spade_mod, "dense_correspondence_loss", _recorder(calls, "local", 3.0))
    tr = _bare(spade_mod.SpadePretrainTrainer)
    tr.r_pos, tr.r_neg, tr.temperature_global = 0.11, 0.37, 0.13
    tr.local_samples, tr.local_match_tolerance, tr.r_local_neg, tr.temperature_local = 17, 1.7, 0.19, 0.23
    tr.lambda_global, tr.lambda_local = 0.29, 0.31
    loss, terms = tr.compute_loss({"global": torch.zeros(4, 8), "local": torch.zeros(4, 8, 2, 2, 2)}, _batch())
    g_args = calls["global"][0]
    assert g_args[3:6] == (0.11, 0.37, 0.13)  # r_pos, r_neg, temperature_global
    l_args = calls["local"][0]
    assert l_args[6] == ((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))  # the decoder grid of the real convolutions
    assert l_args[7:11] == (17, 1.7, 0.19, 0.23)  # local_samples, tolerance, r_local_neg, temperature_local
    assert loss.item() == torch.tensor(0.29 * 2.0 + 0.31 * 3.0).item()
    assert terms["global"].item() == 2.0 and terms["local"].item() == 3.0


def test_spade_soft_temperature_and_hybrid_weights(monkeypatch):
    calls = {}
    monkeypatch.setattr(spade_mod, "affinity_weighted_loss",
                        lambda *a, **k: (calls.setdefault("soft", a) and torch.tensor(5.0),
                                         {"mean_affinity": torch.tensor(0.5)}))
    monkeypatch.setattr(spade_mod, "dense_correspondence_loss", _recorder(calls, "local", 3.0))
    tr = _bare(spade_mod.SpadeSoftPretrainTrainer)
    tr.temperature_soft, tr.lambda_global, tr.lambda_local = 0.41, 0.5, 0.25
    tr.local_samples, tr.local_match_tolerance, tr.r_local_neg, tr.temperature_local = 5, 1.0, 0.1, 0.1
    tr.affinity = lambda batch: torch.eye(4)
    loss, _ = tr.compute_loss({"global": torch.zeros(4, 8), "local": torch.zeros(4, 8, 2, 2, 2)}, _batch())
    assert calls["soft"][3] == 0.41 and loss.item() == 0.5 * 5.0 + 0.25 * 3.0

    calls.clear()
    monkeypatch.setattr(spade_mod, "spade_global_loss", _recorder(calls, "global", 2.0))
    monkeypatch.setattr(recon_mod, "masked_reconstruction_loss", lambda p, t, m: torch.tensor(7.0))
    hy = _bare(recon_mod.SpadeReconPretrainTrainer)
    hy.r_pos, hy.r_neg, hy.temperature_global = 0.1, 0.3, 0.1
    hy.local_samples, hy.local_match_tolerance, hy.r_local_neg, hy.temperature_local = 5, 1.0, 0.1, 0.1
    hy.lambda_global, hy.lambda_local, hy.lambda_recon = 0.5, 0.25, 0.125
    batch = {**_batch(), "recon_target": torch.zeros(4, 1, 4, 4, 4), "recon_mask": torch.ones(4, 4, 4, 4).bool()}
    loss, terms = hy.compute_loss({"global": torch.zeros(4, 8), "local": torch.zeros(4, 8, 2, 2, 2),
                                   "recon": torch.zeros(4, 1, 4, 4, 4)}, batch)
    assert loss.item() == 0.5 * 2.0 + 0.25 * 3.0 + 0.125 * 7.0 and terms["recon"].item() == 7.0


def test_masking_hyperparameters_reach_the_mask():
    tr = _bare(recon_mod.MaskedReconPretrainTrainer)
    tr.mask_ratio, tr.mask_block = 0.25, 2
    data = torch.ones(3, 1, 8, 8, 8)
    batch = {}
    masked = tr.prepare_input(data, batch)
    mask = batch["recon_mask"].bool()
    assert mask.shape == (3, 8, 8, 8) and torch.equal(masked[:, 0] == 0, mask)
    assert (mask.flatten(1).sum(1) == 0.25 * 512).all()  # 16 of 64 blocks of 2^3 voxels
    assert torch.equal(batch["recon_target"], data)
