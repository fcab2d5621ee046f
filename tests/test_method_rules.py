"""Selection rules of the trainers on hand-built batches whose right answer is known."""
from types import SimpleNamespace

import torch

from nnunet_ssl.core.frames import canonical_boxes
from nnunet_ssl.core.queue import LocationBinnedQueue
from nnunet_ssl.trainers import DrasCLRPretrainTrainer, PCLPretrainTrainer, SpadeSoftPretrainTrainer


def _grid(lo, size):
    axes = [torch.arange(l, l + s, dtype=torch.float32) for l, s in zip(lo, size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def test_canonical_boxes():
    coords = torch.stack([_grid((0, 0, 0), (4, 4, 4)), _grid((2, 0, 0), (4, 4, 4))])
    valid = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    valid[1, 3] = False  # last slice of crop 1 is padding
    boxes = canonical_boxes(coords, valid, torch.full((2, 3), 0.1), torch.full((2, 3), 0.05))
    assert torch.allclose(boxes[0], torch.tensor([[0.05, 0.35]] * 3))
    assert torch.allclose(boxes[1, 0], torch.tensor([0.25, 0.45]))  # rows 2..4 valid (5 is padding)


def test_pcl_positions_2d_are_the_papers_slice_positions():
    n = 20
    idx = torch.tensor([0, 4, 19, 4])
    batch = {"canonical_center": torch.stack([(idx + 0.5) / n, torch.full((4,), 0.3), torch.full((4,), 0.7)], 1),
             "canonical_scale": torch.tensor([[1 / n, 0.01, 0.01]] * 4)}
    fake = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=[32, 32]))
    p = PCLPretrainTrainer.positions(fake, batch)
    assert torch.allclose(p, (idx + 1).float() / n)
    fake3d = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=[16, 32, 32]))
    assert torch.allclose(PCLPretrainTrainer.positions(fake3d, batch), (idx + 0.5) / n)
    # selection: slices 4 and 4 (two cases) positive, 0 and 19 negative to them (delta 0.1 = 2 slices)
    fake.delta = 0.1
    fake.positions = lambda b: PCLPretrainTrainer.positions(fake, b)
    batch["sample_index"] = torch.tensor([0, 1, 2, 3])
    pos, neg = PCLPretrainTrainer.pair_selection(fake, batch)
    assert pos[1].tolist() == [False, False, False, True] and neg[1].tolist() == [True, False, True, False]


def test_spade_soft_affinity_from_boxes():
    # crops 0/1: two views of one crop (affinity 1 whatever their overlap); crop 2 shares half of crop 0's box
    # along the first axis; crop 3 is far away
    coords = torch.stack([_grid((0, 0, 0), (4, 4, 4)), _grid((1, 0, 0), (4, 4, 4)), _grid((2, 0, 0), (4, 4, 4)),
                          _grid((20, 0, 0), (4, 4, 4))])
    batch = {"coords": coords, "valid": torch.ones(4, 4, 4, 4, dtype=torch.bool),
             "canonical_scale": torch.full((4, 3), 1.0), "canonical_offset": torch.zeros(4, 3),
             "sample_index": torch.tensor([0, 0, 1, 2])}
    a = SpadeSoftPretrainTrainer.affinity(SimpleNamespace(), batch)
    assert a[0, 1] == 1 and a[1, 0] == 1
    assert torch.isclose(a[0, 2], torch.tensor(1 / 3))  # boxes [0,3] and [2,5]: 1 of 3 units shared
    assert a[0, 3] == 0 and a[2, 3] == 0
    pos, neg = SpadeSoftPretrainTrainer.pair_selection(SimpleNamespace(affinity=lambda b: a), batch)
    assert pos[0].tolist() == [False, True, True, False] and neg[0].tolist() == [False, False, False, True]


def test_drasclr_selection_uses_scan_and_location_bin():
    # 2 cases, views 0/1 and one neighbour each: rows [c0v0, c1v0, c0v1, c1v1, c0n, c1n]
    centres = torch.tensor([[0.1, 0.1, 0.1], [0.15, 0.1, 0.1], [0.1, 0.2, 0.1], [0.9, 0.9, 0.9],
                            [0.2, 0.1, 0.1], [0.12, 0.1, 0.1]])
    batch = {"case_index": torch.tensor([0, 1, 0, 1, 0, 1]), "canonical_center": centres}
    fake = SimpleNamespace(queue=LocationBinnedQueue(8, 64, bins_per_axis=3))
    pos, neg = DrasCLRPretrainTrainer.pair_selection(fake, batch)
    assert pos[0].tolist() == [False, False, True, False, True, False]  # same scan: other view + neighbour
    assert neg[0].tolist() == [False, True, False, False, False, True]  # other subject, same location bin


def test_batch_to_device_checks_layout_and_skips_unread_per_voxel_maps():
    import pytest
    from nnunet_ssl.trainers import SimCLRPretrainTrainer, SpadePretrainTrainer
    b = 3
    batch = {"data": torch.zeros(2 * b, 1, 4, 4, 4), "coords": torch.zeros(2 * b, 3, 4, 4, 4),
             "valid": torch.ones(2 * b, 4, 4, 4, dtype=torch.bool), "canonical_center": torch.rand(2 * b, 3),
             "sample_index": torch.arange(b).repeat(2), "keys": ["a", "b", "c"],
             "bbox": torch.zeros(2 * b, 3, 2), "overlap": torch.ones(b), "aug_affine": torch.eye(3).repeat(2 * b, 1, 1)}
    for cls, keeps in ((SimCLRPretrainTrainer, False), (SpadePretrainTrainer, True), (SpadeSoftPretrainTrainer, True)):
        fake = SimpleNamespace(device=torch.device("cpu"), host_only_batch_keys=cls.host_only_batch_keys)
        moved = cls.batch_to_device(fake, batch)
        assert ("coords" in moved and "valid" in moved) == keeps, cls.__name__
        assert moved["keys"] == batch["keys"] and torch.equal(moved["canonical_center"], batch["canonical_center"])
        assert not {"bbox", "overlap", "aug_affine"} & set(moved)  # descriptive entries no loss reads stay behind
    bad = dict(batch, sample_index=torch.tensor([0, 1, 2, 0, 1, 1]))  # crop 2 has one view, crop 1 three
    with pytest.raises(ValueError, match="exactly twice"):
        SpadePretrainTrainer.batch_to_device(fake, bad)
