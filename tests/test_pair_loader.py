"""Geometric truth of the two-view loader.

The raw images encode their own canonical coordinates: channel k holds 1 + (i_k + 0.5) / N_k along raw array axis
k (noNorm channels, so preprocessing keeps the values). The cases have anisotropic, differing spacings (nnU-Net
transposes and resamples them) and a zero slab (nnU-Net crops it away). Whatever nnU-Net's preprocessing and the
loader's augmentation do, the image a view shows must equal the canonical position the loader reports for it.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

SHAPES = [(20, 26, 22), (22, 24, 20), (18, 28, 24)]  # raw numpy (z, y, x)
X_SPACINGS = [1.6, 2.0, 2.4]  # the x axis is coarse -> nnU-Net moves it first (transpose) and resamples to 2.0
ZERO_SLAB = 3  # rows y < 3 are zero in every channel -> cropped by crop_to_nonzero


def _write_dataset(raw_root):
    ds = raw_root / "Dataset801_Coords"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i, (shape, sx) in enumerate(zip(SHAPES, X_SPACINGS)):
        grids = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
        for k in range(3):
            img = (1.0 + grids[k]).astype(np.float32)
            img[:, :ZERO_SLAB] = 0
            im = sitk.GetImageFromArray(img)
            im.SetSpacing((sx, 1.0, 1.0))  # sitk order (x, y, z)
            sitk.WriteImage(im, str(ds / "imagesTr" / f"case_{i:03d}_{k:04d}.nii.gz"))
        seg = np.zeros(shape, np.uint8)
        seg[5:10, 8:14, 6:12] = 1
        lab = sitk.GetImageFromArray(seg)
        lab.SetSpacing((sx, 1.0, 1.0))
        sitk.WriteImage(lab, str(ds / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "noNorm", "1": "noNorm", "2": "noNorm"}, "labels": {"background": 0, "box": 1},
        "numTraining": len(SHAPES), "file_ending": ".nii.gz"}))


@pytest.fixture(scope="module")
def coord_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    mp = pytest.MonkeyPatch()
    for name, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir()
        mp.setenv(name, str(root / sub))
    _write_dataset(root / "raw")
    from nnunet_ssl.nnunet.planning import plan_and_preprocess
    plan_and_preprocess(801, "ExperimentPlanner", ["3d_fullres", "2d"], num_processes=1)
    yield root
    mp.undo()


def _trainer(root, configuration):
    from nnunet_ssl.trainers import SpadePretrainTrainer
    pre = root / "preprocessed" / "Dataset801_Coords"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    return SpadePretrainTrainer(plans, configuration, "all", json.loads((pre / "dataset.json").read_text()),
                                device=torch.device("cpu"))


def _loader(root, configuration, patch_size, p_rot=0.0, p_scale=0.0, p_elastic=0.0, mirror=True,
            overlap=(0.3, 0.9), batch_size=6, **loader_kwargs):
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunet_ssl.nnunet.pair_loader import TwoViewDataLoader

    tr = _trainer(root, configuration)
    rot, _, _, mirror_axes = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    dim = len(patch_size)
    initial = get_patch_size(patch_size, rot, rot, rot, (0.7, 1.43))
    spatial, _ = tr.get_pretraining_transforms(patch_size, rot, mirror_axes if mirror else None, False)
    for t in spatial.transforms:
        if isinstance(t, SpatialTransform):  # force every augmentation on
            t.p_rotation, t.p_scaling, t.p_elastic_deform = p_rot, p_scale, p_elastic
            t.elastic_deform_magnitude = (2.0, 4.0)
    folder = str(root / "preprocessed" / "Dataset801_Coords" / tr.configuration_manager.data_identifier)
    ds = infer_dataset_class(folder)(folder)
    loader = TwoViewDataLoader(ds, batch_size, initial, patch_size, tr.label_manager, spatial, ComposeTransforms([]),
                               tr.plans_manager.transpose_forward, overlap_range=overlap, **loader_kwargs)
    assert dim in (2, 3)
    return loader, tr


def _truth_vs_reported(batch, transpose_forward, shapes_before):
    """Max error in original voxels between image-encoded and reported canonical positions, over valid voxels."""
    data, coords, valid = batch["data"], batch["coords"], batch["valid"]
    n = data.shape[0]
    view = (n, 3) + (1,) * (coords.ndim - 2)
    reported = coords * batch["canonical_scale"].view(view) + batch["canonical_offset"].view(view)
    truth = torch.stack([data[:, transpose_forward[d]] - 1.0 for d in range(3)], 1)
    err = (reported - truth).abs() * shapes_before.view(view)
    return err.permute(0, *range(2, err.ndim), 1)[valid]  # (n_valid, 3)


def _shapes_before(batch, tr):
    tf = tr.plans_manager.transpose_forward
    return torch.tensor([[SHAPES[int(k.split("_")[1])][tf[d]] for d in range(3)] for k in batch["keys"] * 2],
                        dtype=torch.float32)


@pytest.mark.parametrize("aug", ["none", "mirror", "rotation+scaling", "elastic", "all"])
def test_canonical_positions_match_truth_3d(coord_dataset, aug):
    torch.manual_seed(0); np.random.seed(0)
    kw = {"none": dict(mirror=False), "mirror": dict(), "rotation+scaling": dict(p_rot=1, p_scale=1, mirror=False),
          "elastic": dict(p_elastic=1, mirror=False), "all": dict(p_rot=1, p_scale=1, p_elastic=1)}[aug]
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), **kw)
    assert tr.plans_manager.transpose_forward == [2, 0, 1]
    for _ in range(3):
        batch = loader.generate_train_batch()
        err = _truth_vs_reported(batch, tr.plans_manager.transpose_forward, _shapes_before(batch, tr))
        assert err.shape[0] > 500, "too few valid voxels to test"
        # voxel centres: a dropped half-voxel offset of nnU-Net's resampling convention would shift every voxel of a
        # resampled axis by 0.5 |s - 1| (s: cropped / preprocessed shape); interpolation at crop borders costs ~0.1
        axis_median = err.median(dim=0).values
        assert axis_median.max() < 0.01, f"systematic offset {axis_median.tolist()} voxels ({aug})"
        assert err.max() < 0.2, f"canonical position off by {err.max():.3f} voxels ({aug})"


def test_canonical_positions_match_truth_2d(coord_dataset):
    torch.manual_seed(1); np.random.seed(1)
    loader, tr = _loader(coord_dataset, "2d", (12, 12), p_rot=1, p_scale=1)
    batch = loader.generate_train_batch()
    assert batch["data"].ndim == 4 and batch["coords"].shape[1] == 3
    err = _truth_vs_reported(batch, tr.plans_manager.transpose_forward, _shapes_before(batch, tr))
    assert err.shape[0] > 200 and err.max() < 0.01
    # both views show the same slice: the slice coordinate is constant and equal across the pair
    b = len(batch["keys"])
    z, valid = batch["coords"][:, 0], batch["valid"]
    big, small = torch.full_like(z, 1e9), torch.full_like(z, -1e9)
    zmin, zmax = torch.where(valid, z, big).amin((1, 2)), torch.where(valid, z, small).amax((1, 2))
    assert torch.allclose(zmin, zmax, atol=1e-4)  # bilinear weights of a constant sum to 1 up to rounding
    assert torch.allclose(zmin[:b], zmin[b:], atol=1e-4)
    assert torch.allclose(zmin, zmin.round(), atol=1e-4)  # and it is a slice index


def test_view_correspondences_are_exact(coord_dataset):
    """Voxels the loader reports as showing the same position show the same content in both views."""
    from nnunet_ssl.core.correspondence import sample_correspondences, gather_at
    torch.manual_seed(2); np.random.seed(2)
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), p_rot=1, p_scale=1, p_elastic=1)
    batch = loader.generate_train_batch()
    b = len(batch["keys"])
    c, v, d = batch["coords"], batch["valid"], batch["data"]
    corr = sample_correspondences(c[:b], v[:b], c[b:], v[b:], 64, tolerance=0.5)
    assert corr["mask"].sum() > 50
    ia, ib, m = corr["index_a"], corr["index_b"], corr["mask"]
    va, vb = gather_at(d[:b], ia)[m], gather_at(d[b:], ib)[m]  # encoded positions (1 + u) of matched voxels
    sb = _shapes_before(batch, tr)[:b]
    tf = tr.plans_manager.transpose_forward
    scale = torch.stack([sb[:, tf.index(k)] for k in range(3)], 1)  # raw channel k <-> transposed axis
    err = (va - vb).abs() * scale[:, None, :].expand(-1, m.shape[1], -1)[m]
    assert err.max() < 1.0


@pytest.mark.parametrize("p_elastic", [0, 1])
def test_window_search_finds_the_brute_force_pairs_in_real_views(coord_dataset, p_elastic):
    """nnU-Net's own rotation, scaling and mirroring: the affine-fit window is taken and matches the same voxels as
    the distance matrix over the whole view. nnU-Net's elastic deformation of a 12-voxel view moves voxels by more
    than the box would save: the search hands over to brute force, with the same pairs. The C matching's grid
    needs no fit: the same pairs either way."""
    from nnunet_ssl.core import correspondence
    from nnunet_ssl.core.correspondence import sample_correspondences
    torch.manual_seed(4); np.random.seed(4)
    loader, _ = _loader(coord_dataset, "3d_fullres", (12, 12, 12), p_rot=1, p_scale=1, p_elastic=p_elastic)
    batch = loader.generate_train_batch()
    b = len(batch["keys"])
    c, v = batch["coords"], batch["valid"]
    args = (c[:b], v[:b], c[b:], v[b:], 64, 1.0)
    p = c[b:].flatten(2).transpose(1, 2).float()
    vb = v[b:].flatten(1)
    taken = correspondence._window_nearest(p[:, :8], torch.where(vb[..., None], p, 0.0), vb, (12, 12, 12), 1.0)
    assert (taken is not None) == (p_elastic == 0)
    w = sample_correspondences(*args, generator=torch.Generator().manual_seed(0), search="window")
    br = sample_correspondences(*args, generator=torch.Generator().manual_seed(0), search="brute")
    assert w["mask"].sum() > 50
    assert torch.equal(w["mask"], br["mask"]) and torch.equal(w["index_a"], br["index_a"])
    torch.testing.assert_close(w["distance"], br["distance"], rtol=0, atol=1e-5)
    assert (w["index_b"] == br["index_b"]).float().mean() > 0.99
    # the C matching (the default on CPU; the window without a compiler): the window's pairs, elastic or not
    nat = sample_correspondences(*args, generator=torch.Generator().manual_seed(0), search="native")
    assert all(torch.equal(nat[k], w[k]) for k in ("mask", "index_a", "index_b"))


def test_metadata_without_augmentation(coord_dataset):
    np.random.seed(3); torch.manual_seed(3)
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), mirror=False, overlap=(0.4, 0.8))
    batch = loader.generate_train_batch()
    n = batch["data"].shape[0]
    b = n // 2
    assert batch["keys"] == list(batch["keys"]) and len(batch["keys"]) == b
    assert torch.equal(batch["sample_index"], torch.arange(b).repeat(2))
    # identity geometry: coords are the voxel grid of the final box, its centre is the box centre
    bbox = batch["bbox"].float()
    centre_box = (bbox[..., 0] + bbox[..., 1] - 1) / 2
    can_centre = centre_box * batch["canonical_scale"] + batch["canonical_offset"]
    assert torch.allclose(can_centre, batch["canonical_center"], atol=1e-5)
    assert torch.equal(batch["coords"][:, :, 0, 0, 0], bbox[..., 0])
    # physical size: 12 voxels x effective spacing = original extent (mm) / preprocessed voxels per axis
    tf = tr.plans_manager.transpose_forward
    for row, key in enumerate(batch["keys"] * 2):
        i = int(key.split("_")[1])
        raw_shape = np.array(SHAPES[i], float); raw_shape[1] -= ZERO_SLAB  # the cropped slab
        extent_mm = (raw_shape * np.array([1.0, 1.0, X_SPACINGS[i]]))[tf]
        pre_shape = np.array(loader._data.load_case(key)[0].shape[1:], float)
        expected = torch.tensor(12 * extent_mm / pre_shape, dtype=torch.float32)
        assert torch.allclose(batch["size_mm"][row], expected, atol=1e-3), (key, batch["size_mm"][row], expected)
    assert torch.allclose(batch["size_mm"], torch.tensor([24.0, 12.0, 12.0]).expand(n, 3), rtol=0.05)
    # overlap of the un-augmented boxes, recomputed from the reported boxes, lies in the range and is reported
    lo0, lo1 = bbox[:b, :, 0], bbox[b:, :, 0]
    ov = torch.clamp(12 - (lo0 - lo1).abs(), min=0).prod(1) / 12 ** 3
    assert torch.allclose(ov, batch["overlap"], atol=1e-6)
    assert (ov >= 0.4 - 1e-6).all() and (ov <= 0.8 + 1e-6).all()
    assert torch.equal(batch["aug_affine"], torch.eye(3).expand(n, 3, 3))
    assert not batch["aug_mirror"].any() and not batch["aug_elastic"].any()


def test_mirroring_is_reported(coord_dataset):
    np.random.seed(4); torch.manual_seed(4)
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), batch_size=8)
    batch = loader.generate_train_batch()
    c = batch["coords"]
    for ax in range(3):
        step = c.select(ax + 2, 1)[:, ax] - c.select(ax + 2, 0)[:, ax]  # d coord_ax / d patch index along ax
        step = step.flatten(1)[:, 0]
        assert torch.equal(step < 0, batch["aug_mirror"][:, ax])
    assert batch["aug_mirror"].any()


def test_rotation_and_scaling_reported(coord_dataset):
    np.random.seed(5); torch.manual_seed(5)
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), p_rot=1, p_scale=1, mirror=False)
    batch = loader.generate_train_batch()
    a = batch["aug_affine"]
    assert not torch.allclose(a, torch.eye(3).expand_as(a))
    # the reported affine maps output-patch steps to source-voxel steps: compare with the coordinate field
    c = batch["coords"]
    jac = torch.stack([c[:, :, 7, 6, 6] - c[:, :, 5, 6, 6], c[:, :, 6, 7, 6] - c[:, :, 6, 5, 6],
                       c[:, :, 6, 6, 7] - c[:, :, 6, 6, 5]], 2) / 2  # (n, 3 source axes, 3 patch axes)
    sv_field = torch.linalg.svdvals(jac)
    sv_rep = torch.linalg.svdvals(a)
    assert torch.allclose(sv_field, sv_rep, atol=1e-3)


def test_small_volume_is_refused(coord_dataset):
    loader, _ = _loader(coord_dataset, "3d_fullres", (64, 96, 96))
    with pytest.raises(ValueError, match="fills only"):
        loader.generate_train_batch()


def test_neighbour_crops_layout_and_overlap(coord_dataset):
    np.random.seed(6); torch.manual_seed(6)
    loader, tr = _loader(coord_dataset, "3d_fullres", (12, 12, 12), mirror=False, batch_size=3, num_neighbors=2,
                         neighbor_overlap=(0.1, 0.4))
    batch = loader.generate_train_batch()
    b = 3
    assert batch["data"].shape[0] == 4 * b
    assert batch["view_index"].tolist() == [0] * b + [1] * b + [2] * b + [3] * b
    assert batch["case_index"].tolist() == list(range(b)) * 4
    assert batch["sample_index"].tolist() == list(range(b)) * 2 + list(range(b, 2 * b)) + list(range(2 * b, 3 * b))
    lo = batch["bbox"][..., 0].float()
    for k in range(2):  # each neighbour's overlap with view 0, recomputed from the boxes
        ov = torch.clamp(12 - (lo[:b] - lo[(2 + k) * b:(3 + k) * b]).abs(), min=0).prod(1) / 12 ** 3
        assert torch.allclose(ov, batch["neighbor_overlap"][:, k], atol=1e-6)
        assert (ov >= 0.1 - 1e-6).all() and (ov <= 0.4 + 1e-6).all()
    err = _truth_vs_reported(batch, tr.plans_manager.transpose_forward,
                             torch.cat([_shapes_before({"keys": batch["keys"]}, tr)] * 2))
    assert err.max() < 1.0


def _threads_inside_loader_limit(owner_pid: int) -> int:
    import torch  # noqa: F401  (its OpenMP runtime is what the limit acts on)
    from threadpoolctl import threadpool_info, threadpool_limits

    from nnunet_ssl.nnunet.pair_loader import loader_thread_limit
    with threadpool_limits(limits=2, user_api=None):  # two threads outside, whatever the machine or OMP_NUM_THREADS
        with loader_thread_limit(owner_pid):
            return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp")


def test_loading_in_the_training_process_keeps_its_threads_a_worker_gets_one():
    import multiprocessing
    import os
    # in the process that built the loader (the training process, nnUNet_n_proc_DA=0) the batch is built with the
    # training's threads, idle meanwhile
    assert _threads_inside_loader_limit(os.getpid()) == 2
    # a background loader process runs a copy of the loader and shares the cores with the others: one thread each
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_threads_inside_loader_limit, (os.getpid(),)) == 1
