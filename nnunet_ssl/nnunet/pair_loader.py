"""Two-view pretraining loader with exact spatial metadata for every crop.

For each sampled case it draws two crops whose (un-augmented) overlap lies in a chosen range, carries the
preprocessed voxel coordinates of every voxel as extra channels through nnU-Net's spatial augmentation, then
applies nnU-Net's intensity augmentation to the image channels of each view independently.

Batch layout is "view-major": for B sampled cases, rows 0..B-1 are view 0 and rows B..2B-1 are view 1 of
the same cases, so ``sample_index = [0..B-1, 0..B-1]``. Methods that contrast a crop with its anatomical
neighbours (DrasCLR) ask for ``num_neighbors`` further crops per case, placed near view 0 (their own overlap
range); they follow as blocks of B rows, each a crop of its own (``sample_index`` B.., ``case_index`` 0..B-1).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from threadpoolctl import threadpool_limits

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_ssl.core.frames import case_frame
from nnunet_ssl.nnunet.transforms import MIRROR_PARAMS_KEY, SPATIAL_PARAMS_KEY


def frame_from_properties(properties: dict, preprocessed_shape: Sequence[int], transpose_forward: Sequence[int]):
    """CaseFrame of a preprocessed case from the properties nnU-Net saved at preprocessing."""
    try:
        bbox = properties["bbox_used_for_cropping"]
        before = properties["shape_before_cropping"]
        after = properties["shape_after_cropping_and_before_resampling"]
        spacing = properties["spacing"]
    except KeyError as e:
        raise KeyError(f"case properties lack {e}: re-run nnUNetv2_preprocess for this dataset "
                       f"(nnU-Net >= 2.0 writes it)") from None
    spacing_t = [spacing[i] for i in transpose_forward]
    return case_frame([b[0] for b in bbox], after, preprocessed_shape, before, spacing_t)


def box_overlap(shift: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Fraction of voxels two equal boxes of ``size`` share when offset by ``shift`` (..., dim)."""
    return np.prod(np.clip(size - np.abs(shift), 0, None) / size, axis=-1)


def loader_thread_limit(owner_pid: int):
    """One thread in a background loader process (nnU-Net's rule: the workers share the cores), i.e. wherever the
    loader runs outside the process that built it (``owner_pid``); loading in the training process itself
    (nnUNet_n_proc_DA=0, the CPU default; also each DDP rank's own) uses the training's threads, which are idle
    meanwhile (Spade's CPU-budget batch: 23-33 against 36-41 ms with the limit, BENCHMARKS.md)."""
    return threadpool_limits(limits=1, user_api=None) if os.getpid() != owner_pid else nullcontext()


class TwoViewDataLoader(nnUNetDataLoader):
    """nnU-Net DataLoader that yields two augmented views per case plus their spatial metadata."""

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 spatial_transforms, intensity_transforms, transpose_forward: Sequence[int],
                 overlap_range: Tuple[float, float] = (0.3, 0.9), num_overlap_candidates: int = 32,
                 min_content_fraction: float = 0.1, num_neighbors: int = 0,
                 neighbor_overlap: Tuple[float, float] = (0.1, 0.5)):
        self.owner_pid = os.getpid()  # background workers run copies of this loader in other processes
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=None)
        for name, (lo, hi) in (("crop overlap", overlap_range), ("neighbour overlap", neighbor_overlap)):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} range must satisfy 0 <= min <= max <= 1, got {(lo, hi)}")
        if num_neighbors < 0:
            raise ValueError(f"num_neighbors must be >= 0, got {num_neighbors}")
        self.num_neighbors = int(num_neighbors)
        self.neighbor_overlap = (float(neighbor_overlap[0]), float(neighbor_overlap[1]))
        self.spatial_transforms = spatial_transforms
        self.intensity_transforms = intensity_transforms
        self.transpose_forward = list(transpose_forward)
        self.overlap_range = (float(overlap_range[0]), float(overlap_range[1]))
        self.num_overlap_candidates = num_overlap_candidates
        self.min_content_fraction = min_content_fraction
        self._checked_keys = set()

    # ---------------------------------------------------------------- crop placement
    def _final_offset(self) -> np.ndarray:
        # SpatialTransform crops the final patch around floor(initial/2) of the loaded (initial) patch
        ps = np.asarray(self.patch_size)
        fs = np.asarray(self.final_patch_size)
        return ps // 2 - fs // 2

    def second_view_bbox(self, data_shape, lbs0: Sequence[int], overlap_range=None) -> Tuple[np.ndarray, float]:
        """Lower bbox corner of a crop whose final-patch overlap with view 0 lies in ``overlap_range``
        (default: the view-pair range).

        Target overlaps are drawn uniformly in the range and split over the axes with random weights; the shift
        is clipped to nnU-Net's admissible bbox range and the achieved overlap re-measured. The candidate
        closest to the range wins (exactly in range whenever the volume allows it)."""
        dim = len(data_shape)
        fs = np.asarray(self.final_patch_size, dtype=np.float64)
        need_to_pad = self.need_to_pad.copy()
        for d in range(dim):
            if need_to_pad[d] + data_shape[d] < self.patch_size[d]:
                need_to_pad[d] = self.patch_size[d] - data_shape[d]
        lbs = np.array([-need_to_pad[i] // 2 for i in range(dim)])
        ubs = np.array([data_shape[i] + need_to_pad[i] // 2 + need_to_pad[i] % 2 - self.patch_size[i]
                        for i in range(dim)])
        n = self.num_overlap_candidates
        lo, hi = overlap_range or self.overlap_range
        target = np.random.uniform(max(lo, 1e-3), max(hi, 1e-3), size=n)
        movable = fs > 1  # 2D: the slice axis has size 1 and never moves (both views show the same slice)
        w = np.random.dirichlet(np.ones(int(movable.sum())), size=n)
        per_axis = np.ones((n, dim))
        per_axis[:, movable] = target[:, None] ** w
        shift = np.round((1 - per_axis) * fs) * np.random.choice([-1, 1], size=(n, dim))
        cand = np.clip(np.asarray(lbs0)[None] + shift, lbs[None], ubs[None]).astype(int)
        achieved = box_overlap(cand - np.asarray(lbs0)[None], fs)
        miss = np.maximum(lo - achieved, 0) + np.maximum(achieved - hi, 0)
        best = int(np.argmin(miss))
        return cand[best], float(achieved[best])

    # ---------------------------------------------------------------- one view
    def _make_view(self, data: np.ndarray, lbs: np.ndarray):
        shape = np.asarray(data.shape[1:])
        ps = np.asarray(self.patch_size)
        bbox = [[int(l), int(l + p)] for l, p in zip(lbs, ps)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        axes = [torch.arange(l, l + p, dtype=torch.float32) for l, p in zip(lbs, ps)]
        grids = torch.meshgrid(*axes, indexing="ij")
        coords = torch.stack(grids)  # preprocessed voxel index of every loaded voxel (also in padding)
        inside = torch.ones(tuple(ps), dtype=torch.float32)
        for d, g in enumerate(grids):
            inside *= ((g >= 0) & (g <= shape[d] - 1)).float()
        stacked = torch.cat((image, coords, inside[None]), 0)
        if self.patch_size_was_2d:
            stacked = stacked[:, 0]
        out = self.spatial_transforms(image=stacked)
        stacked = out["image"]
        c = image.shape[0]
        img = stacked[:c]
        # bilinear interpolation is exact on the (affine) coordinate field wherever its whole footprint lies
        # inside real image content; 'inside' drops below 1 as soon as any neighbour is padding
        view_coords = stacked[c:c + 3]
        valid = stacked[c + 3] > 0.999
        img = self.intensity_transforms(image=img)["image"]
        return img, view_coords, valid, out.get(SPATIAL_PARAMS_KEY), out.get(MIRROR_PARAMS_KEY, [])

    # ---------------------------------------------------------------- batch
    def generate_train_batch(self):
        keys = self.get_indices()
        b = len(keys)
        dim = len(self.final_patch_size) - (1 if self.patch_size_was_2d else 0)
        n_views = 2 + self.num_neighbors
        n = n_views * b
        data_all = coords_all = valid_all = None
        can_scale = np.zeros((n, 3)); can_off = np.zeros((n, 3))
        mm_scale = np.zeros((n, 3)); mm_off = np.zeros((n, 3))
        bbox = np.zeros((n, 3, 2), dtype=np.int64)
        overlap = np.zeros((b, n_views - 1))
        aug_affine = np.tile(np.eye(3), (n, 1, 1)); aug_mirror = np.zeros((n, 3), dtype=bool)
        aug_elastic = np.zeros(n, dtype=bool)
        final_off = self._final_offset()
        fs = np.asarray(self.final_patch_size)
        spatial_axes = [0, 1, 2] if not self.patch_size_was_2d else [1, 2]  # volume axes the patch spans

        with torch.no_grad(), loader_thread_limit(self.owner_pid):
            for j, key in enumerate(keys):
                data, _seg, _prev, properties = self._data.load_case(key)
                shape = data.shape[1:]
                self._check_case(key, data)
                frame = frame_from_properties(properties, shape, self.transpose_forward)
                lbs0, _ = self.get_bbox(shape, False, None)
                boxes = [np.asarray(lbs0)]
                for v in range(1, n_views):
                    lbs_v, overlap[j, v - 1] = self.second_view_bbox(
                        shape, lbs0, self.overlap_range if v == 1 else self.neighbor_overlap)
                    boxes.append(lbs_v)
                for v, lbs in enumerate(boxes):
                    row = v * b + j
                    img, crd, val, sp, mirror = self._make_view(data, lbs)
                    if data_all is None:
                        data_all = torch.empty((n, *img.shape), dtype=torch.float32)
                        coords_all = torch.empty((n, 3, *img.shape[1:]), dtype=torch.float32)
                        valid_all = torch.empty((n, *img.shape[1:]), dtype=torch.bool)
                    data_all[row] = img
                    coords_all[row] = crd
                    valid_all[row] = val
                    can_scale[row], can_off[row] = frame.canonical_scale, frame.canonical_offset
                    mm_scale[row], mm_off[row] = frame.mm_scale, frame.mm_offset
                    lo = lbs + final_off
                    bbox[row, :, 0] = lo
                    bbox[row, :, 1] = lo + fs
                    if sp is not None:
                        aug_elastic[row] = sp["elastic"]
                        if sp["affine"] is not None:
                            a = sp["affine"]
                            aug_affine[row][np.ix_(spatial_axes[-a.shape[0]:], spatial_axes[-a.shape[0]:])] = a
                    for ax in mirror:
                        aug_mirror[row, spatial_axes[ax]] = True

        coords_t = coords_all
        centre = _patch_centre(coords_t)  # (n,3) preprocessed coords of the patch centre
        can_scale_t = torch.from_numpy(can_scale).float(); can_off_t = torch.from_numpy(can_off).float()
        mm_scale_t = torch.from_numpy(mm_scale).float(); mm_off_t = torch.from_numpy(mm_off).float()
        return {
            "data": data_all,
            "coords": coords_t,
            "valid": valid_all,
            "keys": list(keys),
            "sample_index": torch.cat([torch.arange(b)] * 2 + [torch.arange(b) + b * (k + 1)
                                                               for k in range(self.num_neighbors)]),
            "case_index": torch.arange(b).repeat(n_views),
            "view_index": torch.arange(n_views).repeat_interleave(b),
            "bbox": torch.from_numpy(bbox),
            "overlap": torch.from_numpy(overlap[:, 0]).float(),
            "neighbor_overlap": torch.from_numpy(overlap[:, 1:]).float(),
            "canonical_scale": can_scale_t, "canonical_offset": can_off_t,
            "mm_scale": mm_scale_t, "mm_offset": mm_off_t,
            "canonical_center": centre * can_scale_t + can_off_t,
            "size_mm": _extent_mm(coords_t, mm_scale_t, dim),
            "aug_affine": torch.from_numpy(aug_affine).float(),
            "aug_mirror": torch.from_numpy(aug_mirror),
            "aug_elastic": torch.from_numpy(aug_elastic),
        }

    def _check_case(self, key, data):
        # once per case and worker: reading a whole (possibly compressed) volume is not free
        if key in self._checked_keys:
            return
        shape = np.asarray(data.shape[1:])
        fs = np.asarray(self.final_patch_size)
        content = float(np.prod(np.minimum(shape, fs) / fs))
        if content < self.min_content_fraction:
            raise ValueError(f"case {key} (preprocessed shape {tuple(shape.tolist())}) fills only {content:.0%} of "
                             f"the pretraining crop {tuple(fs.tolist())}: exclude it from the split or plan a smaller "
                             f"patch size")
        image = np.asarray(data)
        if not np.all(np.isfinite(image)):
            raise ValueError(f"case {key} contains NaN/inf after preprocessing: fix the image and re-run "
                             f"nnUNetv2_preprocess")
        flat = image.reshape(image.shape[0], -1)
        if np.all(flat.min(axis=1) == flat.max(axis=1)):
            # every crop of it is the same image: it has no content to contrast, and normalisation made it all 0
            raise ValueError(f"case {key} is constant in every image channel after preprocessing (no contrastive "
                             f"signal): check the image file, then remove the case from the dataset (or from the "
                             f"fold's split) and re-run nnUNetv2_preprocess")
        self._checked_keys.add(key)


def _patch_centre(coords: torch.Tensor) -> torch.Tensor:
    """Mean coordinate of the 2^d central voxels of each patch (exact centre for even and odd sizes)."""
    sl = [slice(None), slice(None)]
    for s in coords.shape[2:]:
        sl.append(slice((s - 1) // 2, s // 2 + 1))
    return coords[tuple(sl)].flatten(2).mean(-1)


def _extent_mm(coords: torch.Tensor, mm_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Physical extent of each patch per volume axis: patch voxels x local voxel step in mm (after augmentation).

    For 2D patches the slice axis gets the slice thickness."""
    n = coords.shape[0]
    spatial = coords.shape[2:]
    mm = coords * mm_scale.reshape(n, 3, *([1] * len(spatial)))
    ext = torch.zeros(n, 3)
    centre_idx = [s // 2 for s in spatial]
    vol_axes = [0, 1, 2] if dim == 3 else [1, 2]
    for k, s in enumerate(spatial):
        a = list(centre_idx); b = list(centre_idx)
        if s < 2:
            continue
        a[k] = s // 2 - 1
        step = mm[(slice(None), slice(None), *b)] - mm[(slice(None), slice(None), *a)]
        ext[:, vol_axes[k]] = step.norm(dim=1) * s
    if dim == 2:
        ext[:, 0] = mm_scale[:, 0]
    return ext
