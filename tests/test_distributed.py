"""DDP gather + loss path with 2 CPU processes (gloo, spawn): a gathered step on two ranks gives the loss, the
gradients, the updated weights and (DrasCLR, Spade with the queue) the queues of one process holding the whole
batch.

nnU-Net runs DDP only on CUDA (its trainer __init__ moves DDP runs to cuda:<rank>), so the pieces are driven
directly on bare trainer instances: the engine's ``_step`` (gather, shared sampling seed, loss scaled by the world
size, clipping, SGD step) with tiny stand-in networks under a real DDP wrapper, Spade's two objectives, Spade's
global queue of momentum-encoder keys, DrasCLR's compute_loss with its queue and momentum encoder, and PDCR's
synchronisation of its projection heads."""
import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_ssl.core.distributed import (
    broadcast_parameters_,
    cases_per_rank,
    gather_global_batch,
    gather_view_major,
    shared_seed,
    view_major_index,
)
from nnunet_ssl.core.loss import dense_correspondence_loss, spade_global_loss
from nnunet_ssl.core.queue import LocationBinnedQueue

WORLD = 2
SPADE_CASES = (2, 1)   # 3 cases over 2 ranks, split as nnU-Net splits a batch (uneven on purpose)
DRAS_CASES = (2, 2)
DRAS_STEPS = 2
PATCH, STRIDE = 8, 2


# ----------------------------------------------------------------------------------------- synthetic batches
def loader_indices(cases: int, views: int) -> dict:
    """sample/case/view indices exactly as TwoViewDataLoader numbers a batch of ``cases`` cases."""
    return {"sample_index": torch.cat([torch.arange(cases)] * 2 + [torch.arange(cases) + cases * (k + 1)
                                                                   for k in range(views - 2)]),
            "case_index": torch.arange(cases).repeat(views),
            "view_index": torch.arange(views).repeat_interleave(cases)}


def local_rows(cases, rank: int, views: int) -> torch.Tensor:
    """Rows of the global view-major batch that rank ``rank`` holds (ranks hold ``cases`` cases, rank 0 first)."""
    offset = sum(cases[:rank])
    return (torch.arange(views)[:, None] * sum(cases) + offset + torch.arange(cases[rank])[None, :]).flatten()


def local_part(global_batch: dict, cases, rank: int, views: int) -> dict:
    """The batch rank ``rank`` loads when the ranks hold ``cases`` of the global batch's cases (rank 0 first)."""
    total, offset, mine = sum(cases), sum(cases[:rank]), cases[rank]
    rows = local_rows(cases, rank, views)
    out = {}
    for key, value in global_batch.items():
        if key == "keys":
            out[key] = value[offset:offset + mine]
        elif key in ("sample_index", "case_index", "view_index"):
            continue
        elif value.shape[0] == total:
            out[key] = value[offset:offset + mine]
        else:
            out[key] = value[rows]
    out.update(loader_indices(mine, views))
    return out


def spade_batch(step: int = 0):
    """Three cases, two views each (mirrored and shifted by one voxel, one row partly invalid), plus head inputs."""
    g = torch.Generator().manual_seed(step)
    cases, views = sum(SPADE_CASES), 2
    n = views * cases
    grid = torch.stack(torch.meshgrid(*[torch.arange(PATCH, dtype=torch.float32)] * 3, indexing="ij"))
    shift = torch.tensor([0.0, 3.0, 6.0])[:, None, None, None, None]
    view0 = grid + shift
    view1 = view0.flip(2) + torch.tensor([1.0, 0, 0])[None, :, None, None, None]
    valid = torch.ones(n, PATCH, PATCH, PATCH, dtype=torch.bool)
    valid[4, :, :, :2] = False
    centers = torch.tensor([[0.2, 0.2, 0.2], [0.25, 0.2, 0.2], [0.8, 0.7, 0.6]])  # cases 0, 1 within r_pos
    batch = {
        "data": torch.randn(n, 1, PATCH, PATCH, PATCH, generator=g),   # the image, for the engine's forward
        "keys": [f"case_{c}" for c in range(cases)],
        **loader_indices(cases, views),
        "coords": torch.cat((view0, view1)),
        "valid": valid,
        "bbox": torch.randint(0, 50, (n, 3, 2), generator=g),
        "overlap": torch.rand(cases, generator=g),
        "neighbor_overlap": torch.zeros(cases, 0),
        "canonical_scale": torch.full((n, 3), 0.05),
        "canonical_offset": (torch.arange(cases, dtype=torch.float32) * 0.4).repeat(views)[:, None].expand(n, 3),
        "canonical_center": torch.cat((centers, centers + 0.03)),
        "mm_scale": torch.rand(n, 3, generator=g), "mm_offset": torch.rand(n, 3, generator=g),
        "size_mm": torch.rand(n, 3, generator=g),
        "aug_affine": torch.rand(n, 3, 3, generator=g),
        "aug_mirror": torch.rand(n, 3, generator=g) > 0.5,
        "aug_elastic": torch.rand(n, generator=g) > 0.5,
    }
    inputs = {"vector": torch.randn(n, 6, generator=g),
              "dense": torch.randn(n, 5, PATCH // STRIDE, PATCH // STRIDE, PATCH // STRIDE, generator=g)}
    return batch, inputs


def drasclr_batch(step: int):
    """Four cases (case 2 is the same subject as case 0, on the other rank), two views + two neighbours."""
    g = torch.Generator().manual_seed(100 + step)
    cases, views = sum(DRAS_CASES), 4
    n = views * cases
    return {"data": torch.randn(n, 1, 4, 4, 4, generator=g), "keys": ["subj_0", "subj_1", "subj_0", "subj_2"],
            **loader_indices(cases, views),
            "canonical_center": torch.rand(n, 3, generator=g) * torch.tensor([1.0, 0.5, 0.5]),
            "overlap": torch.rand(cases, generator=g), "neighbor_overlap": torch.rand(cases, 2, generator=g)}


class TinyHeads(nn.Module):
    """Stand-in for U-Net + heads: a global embedding per row and a dense embedding map per row."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 8)
        self.conv = nn.Conv3d(5, 4, 1)

    def forward(self, vector, dense):
        return {"global": F.normalize(self.fc(vector), dim=1), "local": F.normalize(self.conv(dense), dim=1)}


def spade_loss(outputs, batch, generator):
    l_g, _ = spade_global_loss(outputs["global"], batch["canonical_center"], batch["sample_index"], 0.1, 0.3, 0.1)
    l_l, stats = dense_correspondence_loss(outputs["local"], batch["coords"], batch["valid"],
                                           batch["canonical_scale"], batch["canonical_offset"],
                                           batch["sample_index"], (STRIDE,) * 3, 16, 1.0, 0.1, 0.1,
                                           generator=generator)
    return l_g + l_l, stats


class TinySpadeModel(nn.Module):
    """Stand-in for ContrastiveModel (U-Net + Spade's heads): a global embedding and stride-2 voxel embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv3d(1, 5, 3, padding=1)
        self.fc = nn.Linear(5, 8)
        self.dense = nn.Conv3d(5, 4, 1)

    def forward(self, x, condition=None):
        # smooth (not ReLU): after a large SGD step a pre-activation near 0 can land on either side of a ReLU's kink
        # depending on summation order (DDP all-reduce vs one process), which moves a weight by ~1e-4
        f = F.silu(self.encoder(x))
        return {"global": F.normalize(self.fc(f.mean((2, 3, 4))), dim=1),
                "local": F.normalize(self.dense(F.avg_pool3d(f, STRIDE)), dim=1)}


class TinyDrasModel(nn.Module):
    """Stand-in for DrasCLR's ContrastiveModel: a location-conditioned global embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv3d(1, 5, 3, padding=1)
        self.fc = nn.Linear(5 + 3, 8)

    def forward(self, x, condition):
        f = F.silu(self.encoder(x)).mean((2, 3, 4))
        return {"global": F.normalize(self.fc(torch.cat((f, condition), 1)), dim=1)}


def bare_trainer(cls, model: nn.Module, is_ddp: bool):
    """A trainer instance with what ContrastivePretrainTrainer._step reads (nnU-Net's __init__ needs CUDA for DDP)."""
    trainer = object.__new__(cls)
    trainer.device, trainer.is_ddp, trainer.cpu_bf16 = torch.device("cpu"), is_ddp, False
    trainer.model, trainer.key_model, trainer.grad_scaler, trainer.current_epoch = model, None, None, 0
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return trainer


def spade_trainer(model: nn.Module, is_ddp: bool):
    from nnunet_ssl.trainers.spade import SpadePretrainTrainer
    trainer = bare_trainer(SpadePretrainTrainer, model, is_ddp)
    trainer.local_samples = 16
    trainer.decoder_grid = lambda: ((STRIDE,) * 3, (0.0,) * 3)
    return trainer


def spade_queue_trainer(model: nn.Module, is_ddp: bool):
    from nnunet_ssl.core.queue import PositionedQueue
    from nnunet_ssl.trainers.spade import SpadeQueuePretrainTrainer
    trainer = bare_trainer(SpadeQueuePretrainTrainer, model, is_ddp)
    trainer.local_samples = 16
    trainer.decoder_grid = lambda: ((STRIDE,) * 3, (0.0,) * 3)
    trainer.key_model = copy.deepcopy(model.module if is_ddp else model).requires_grad_(False)
    trainer.momentum = 0.9   # the key encoder visibly moves in two steps
    trainer.global_queue = PositionedQueue(8, 8)   # 2 steps x 6 crops: the second step wraps around
    return trainer


def drasclr_trainer(model: nn.Module, is_ddp: bool):
    from nnunet_ssl.trainers.drasclr import DrasCLRPretrainTrainer
    trainer = bare_trainer(DrasCLRPretrainTrainer, model, is_ddp)
    trainer.key_model = copy.deepcopy(model.module if is_ddp else model).requires_grad_(False)
    trainer.momentum = 0.9   # the key encoder visibly moves in two steps
    trainer.queue = LocationBinnedQueue(8, 64, bins_per_axis=2)
    return trainer


def weights(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def queue_state(queue):
    return {k: v.clone() for k, v in queue.state_dict().items()}


def pdcr_head_inputs(rank: int):
    g = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(2, 4, 3, 3, 3, generator=g), torch.randn(2, 6, 3, 3, 3, generator=g)]


def pdcr_heads(seed: int):
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Conv3d(4, 3, 1), nn.Conv3d(6, 3, 1)])


def pdcr_local_loss(heads, inputs):
    return sum(h(x).square().mean() for h, x in zip(heads, inputs))


# ----------------------------------------------------------------------------------------- the 2 ranks
def _spade_rank(rank: int) -> dict:
    global_batch, global_inputs = spade_batch()
    batch = local_part(global_batch, SPADE_CASES, rank, 2)
    rows = local_rows(SPADE_CASES, rank, 2)
    inputs = {k: v[rows].requires_grad_(True) for k, v in global_inputs.items()}
    model = DDP(TinyHeads())
    outputs = model(inputs["vector"], inputs["dense"])
    outputs, gathered = gather_global_batch(outputs, batch, views=2)   # what the engine's _step does
    torch.manual_seed(1000 + rank)   # unseeded ranks: their random streams differ
    seed = shared_seed(torch.device("cpu"))
    loss, stats = spade_loss(outputs, gathered, torch.Generator().manual_seed(seed))
    (loss * dist.get_world_size()).backward()   # the engine's scaling against DDP's gradient average
    return {"loss": loss.detach(), "seed": seed, "num_pairs": stats["num_pairs"], "batch": gathered,
            "param_grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
            "input_grads": {k: v.grad / dist.get_world_size() for k, v in inputs.items()}}


def _engine_spade_rank(rank: int) -> dict:
    trainer = spade_trainer(DDP(TinySpadeModel()), is_ddp=True)
    torch.manual_seed(1000 + rank)   # unseeded ranks: their random streams differ
    out = trainer._step(local_part(spade_batch()[0], SPADE_CASES, rank, 2), train=True)
    return {"out": out, "seed": trainer.step_generator.initial_seed(), "weights": weights(trainer.model.module)}


def _engine_spade_queue_rank(rank: int) -> dict:
    trainer = spade_queue_trainer(DDP(TinySpadeModel()), is_ddp=True)
    torch.manual_seed(1000 + rank)   # unseeded ranks: their random streams differ
    steps = []
    for step in range(2):
        out = trainer._step(local_part(spade_batch()[0], SPADE_CASES, rank, 2), train=True)
        steps.append({"out": out, "queue": queue_state(trainer.global_queue),
                      "seed": trainer.step_generator.initial_seed()})   # drawn anew each step, shared by the ranks
    return {"steps": steps, "weights": weights(trainer.model.module), "key_weights": weights(trainer.key_model)}


def _drasclr_rank(rank: int) -> dict:
    trainer = drasclr_trainer(DDP(TinyDrasModel()), is_ddp=True)
    steps = []
    for step in range(DRAS_STEPS):
        out = trainer._step(local_part(drasclr_batch(step), DRAS_CASES, rank, 4), train=True)
        steps.append({"out": out, "queue": queue_state(trainer.queue)})
    return {"steps": steps, "weights": weights(trainer.model.module), "key_weights": weights(trainer.key_model)}


def _pdcr_rank(rank: int) -> dict:
    from nnunet_ssl.trainers.pdcr import PDCRTrainer
    heads = pdcr_heads(seed=300 + rank)   # unseeded ranks start from different weights
    broadcast_parameters_(heads)           # what PDCRTrainer.configure_optimizers does under DDP
    initial = weights(heads)
    trainer = object.__new__(PDCRTrainer)
    trainer.is_ddp, trainer.pdcr_heads = True, heads
    pdcr_local_loss(heads, pdcr_head_inputs(rank)).backward()
    trainer.sync_pdcr_head_gradients()
    return {"weights": initial, "grads": {k: p.grad.clone() for k, p in heads.named_parameters()}}


def _gather_uneven_rank(rank: int) -> torch.Tensor:
    x = torch.arange(2 * SPADE_CASES[rank], dtype=torch.float32) + 10 * rank   # 2 views x local cases
    return gather_view_major(x, views=2)


def _worker(rank: int, init_file: str, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {"spade": _spade_rank(rank), "engine_spade": _engine_spade_rank(rank),
                  "engine_spade_queue": _engine_spade_queue_rank(rank),
                  "drasclr": _drasclr_rank(rank), "pdcr": _pdcr_rank(rank), "uneven": _gather_uneven_rank(rank)}
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # a rank file exists only once its results are complete
        dist.barrier()  # no rank tears gloo down while the other still has messages in flight
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    try:
        mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:
        # gloo can abort a process while it shuts down ("terminate called without an active exception") on a
        # loaded machine; what the tests check was computed before that if every rank wrote its complete file
        if not all((tmp / f"rank{r}.pt").exists() for r in range(WORLD)):
            raise
        warnings.warn(f"a DDP rank aborted after writing its results (teardown): {error}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- tests
def test_gathered_batch_is_the_single_process_batch(ranks):
    global_batch, _ = spade_batch()
    for result in ranks:
        gathered = result["spade"]["batch"]
        assert "data" not in gathered   # the images are not needed by any loss and are not gathered
        assert set(gathered) == set(global_batch) - {"data"}
        for key, value in global_batch.items():
            if key == "keys":
                assert gathered[key] == value
            elif key != "data":
                assert gathered[key].dtype == value.dtype, key
                assert torch.equal(gathered[key], value), key


def test_uneven_view_major_gather(ranks):
    # rank 0: 2 cases [v0c0, v0c1, v1c0, v1c1] = 0..3; rank 1: 1 case [v0c2, v1c2] = 10, 11
    for result in ranks:
        assert result["uneven"].tolist() == [0, 1, 10, 2, 3, 11]


def test_spade_global_and_dense_loss_and_gradients_match_one_process(ranks):
    batch, inputs = spade_batch()
    seeds = {r["spade"]["seed"] for r in ranks}
    assert len(seeds) == 1   # the voxel sampling seed is shared
    model = TinyHeads()
    x = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    loss, stats = spade_loss(model(x["vector"], x["dense"]), batch, torch.Generator().manual_seed(seeds.pop()))
    loss.backward()
    assert stats["num_pairs"] > 0
    for rank, result in enumerate(ranks):
        r = result["spade"]
        assert torch.equal(r["num_pairs"], stats["num_pairs"])   # the same voxels were sampled
        _close(r["loss"], loss.detach())
        for name, p in model.named_parameters():
            _close(r["param_grads"][name], p.grad)
        for name, v in x.items():   # each rank's inputs get their rows of the single-process gradient
            _close(r["input_grads"][name], v.grad[local_rows(SPADE_CASES, rank, 2)])


def test_engine_step_spade_updates_weights_as_one_process(ranks):
    """ContrastivePretrainTrainer._step with SpadePretrainTrainer's loss: gather, shared voxel-sampling seed,
    loss x world size against DDP's gradient average, SGD step -> the weights of a single-process step."""
    seeds = {r["engine_spade"]["seed"] for r in ranks}
    assert len(seeds) == 1
    trainer = spade_trainer(TinySpadeModel(), is_ddp=False)
    trainer.step_generator = torch.Generator().manual_seed(seeds.pop())
    initial = weights(trainer.model)
    out = trainer._step(spade_batch()[0], train=True)
    for result in ranks:
        r = result["engine_spade"]
        assert set(r["out"]) == set(out)
        for term, value in out.items():   # the logged loss and terms are the unscaled single-process ones
            _close(torch.as_tensor(r["out"][term]), torch.as_tensor(value))
        for name, w in weights(trainer.model).items():
            assert not torch.equal(w, initial[name])   # the step changed every weight
            # after an SGD step (lr x a gradient summed in another order by gloo's all-reduce, and by however many
            # intra-op threads earlier tests in this process left set) float32 agrees to ~1e-5 relative
            torch.testing.assert_close(r["weights"][name], w, rtol=1e-4, atol=1e-5)


def test_engine_steps_spade_queue_match_one_process(ranks):
    """SpadeQueuePretrainTrainer under DDP: the momentum encoder's keys of the gathered batch enter the same global
    queue on every rank, in the single-process order, and the losses, weights and key weights follow one process."""
    trainer = spade_queue_trainer(TinySpadeModel(), is_ddp=False)
    reference = []
    for step in range(2):
        seeds = {r["engine_spade_queue"]["steps"][step]["seed"] for r in ranks}
        assert len(seeds) == 1
        trainer.step_generator = torch.Generator().manual_seed(seeds.pop())
        out = trainer._step(spade_batch()[0], train=True)
        reference.append({"out": out, "queue": queue_state(trainer.global_queue)})
    assert reference[-1]["queue"]["filled"].all()   # 12 keys through 8 slots
    # the second step contrasts against the first step's queued keys as well
    assert reference[1]["out"]["mean_neg_global"] > reference[0]["out"]["mean_neg_global"]
    for step, ref in enumerate(reference):
        states = [r["engine_spade_queue"]["steps"][step] for r in ranks]
        for key in ref["queue"]:   # every rank enqueued the same gathered keys
            assert torch.equal(states[0]["queue"][key], states[1]["queue"][key]), key
        for s in states:
            for key, value in ref["queue"].items():
                if value.is_floating_point():
                    _close(s["queue"][key], value)
                else:
                    assert torch.equal(s["queue"][key], value), key
            for term, value in ref["out"].items():
                _close(torch.as_tensor(s["out"][term]), torch.as_tensor(value))
    for result in ranks:
        for name, w in weights(trainer.model).items():
            _close(result["engine_spade_queue"]["weights"][name], w)
        for name, w in weights(trainer.key_model).items():
            _close(result["engine_spade_queue"]["key_weights"][name], w)


def test_drasclr_steps_losses_queues_and_weights_match_one_process(ranks):
    trainer = drasclr_trainer(TinyDrasModel(), is_ddp=False)
    reference = []
    for step in range(DRAS_STEPS):
        out = trainer._step(drasclr_batch(step), train=True)
        reference.append({"out": out, "queue": queue_state(trainer.queue)})
    assert reference[-1]["out"]["mean_neg"] > 0   # the last step really contrasts against queued keys
    for step, ref in enumerate(reference):
        states = [r["drasclr"]["steps"][step] for r in ranks]
        for key in ("keys", "subject", "ptr"):   # every rank enqueued the same gathered keys
            assert torch.equal(states[0]["queue"][key], states[1]["queue"][key]), key
        for s in states:
            assert torch.equal(s["queue"]["subject"], ref["queue"]["subject"])
            assert torch.equal(s["queue"]["ptr"], ref["queue"]["ptr"])
            _close(s["queue"]["keys"], ref["queue"]["keys"])
            for term, value in ref["out"].items():
                _close(torch.as_tensor(s["out"][term]), torch.as_tensor(value))
    for result in ranks:
        for name, w in weights(trainer.model).items():
            _close(result["drasclr"]["weights"][name], w)
        for name, w in weights(trainer.key_model).items():
            _close(result["drasclr"]["key_weights"][name], w)


def test_pdcr_heads_start_equal_and_average_their_gradients(ranks):
    heads = pdcr_heads(seed=300)   # rank 0's initialisation
    grads = []
    for rank in range(WORLD):
        heads.zero_grad(set_to_none=True)
        pdcr_local_loss(heads, pdcr_head_inputs(rank)).backward()
        grads.append({k: p.grad.clone() for k, p in heads.named_parameters()})
    for result in ranks:
        for name, w in heads.state_dict().items():
            assert torch.equal(result["pdcr"]["weights"][name], w)
        for name in grads[0]:
            _close(result["pdcr"]["grads"][name], (grads[0][name] + grads[1][name]) / WORLD)


# ----------------------------------------------------------------------------------------- without processes
def test_cases_per_rank_splits_like_nnunet():
    for total in range(2, 12):
        for world in range(1, total + 1):
            split = cases_per_rank(total, world)
            # nnU-Net's _set_batch_size_and_oversample
            expected = [total // world + 1 if (total // world) * world + i < total else total // world
                        for i in range(world)]
            assert split == expected and sum(split) == total
    with pytest.raises(ValueError, match="cases_per_step = 1 cannot be split over 2 DDP processes"):
        cases_per_rank(1, 2, "cases_per_step")


def test_view_major_index():
    assert view_major_index([2, 1], 2).tolist() == [0, 1, 4, 2, 3, 5]
    # three views, equal split: rank r's view v block sits at r * 6 + v * 2
    assert view_major_index([2, 2], 3).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]


def test_single_process_is_a_pass_through():
    batch, inputs = spade_batch()
    outputs = {"global": inputs["vector"]}
    out, gathered = gather_global_batch(outputs, batch, views=2)
    assert out is outputs and set(gathered) == set(batch) - {"data"}
    with pytest.raises(ValueError, match="expected 3 views per case"):
        gather_global_batch(outputs, batch, views=3)


def test_non_finite_loss_is_an_error_and_the_step_is_not_taken():
    # single process: a NaN in the input makes the loss NaN; the engine checks the loss once the step is queued
    # (no synchronisation before the backward pass), so the optimizer step must have been skipped by then
    trainer = spade_trainer(TinySpadeModel(), is_ddp=False)
    trainer.grad_clip = 12.0
    batch, _ = spade_batch()
    batch["data"][0, 0, 0, 0, 0] = float("nan")
    before = weights(trainer.model)
    with pytest.raises(FloatingPointError, match="non-finite pretraining loss"):
        trainer._step(batch, train=True)
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
