"""nnU-Net's training augmentation splits into spatial (coordinates follow) and intensity (image only) parts."""
import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.nnunet.transforms import (INTENSITY_TRANSFORMS, RecordingMirrorTransform, RecordingSpatialTransform,
                                          split_training_transforms)


def _stock(patch=(16, 16, 16), dummy_2d=False):
    rot = (-np.pi / 6, np.pi / 6)
    return nnUNetTrainer.get_training_transforms(patch, rot, [[1, 1, 1], [0.5, 0.5, 0.5]], (0, 1, 2), dummy_2d,
                                                 use_mask_for_norm=[False], foreground_labels=[1])


def test_split_of_stock_pipeline():
    spatial, intensity = split_training_transforms(_stock())
    kinds = [type(t) for t in spatial.transforms]
    assert kinds == [RecordingSpatialTransform, RecordingMirrorTransform]
    assert len(intensity.transforms) == 7
    assert all(isinstance(t.transform, INTENSITY_TRANSFORMS) for t in intensity.transforms)
    # the recorded spatial transform keeps nnU-Net's settings
    orig = [t for t in _stock().transforms if type(t).__name__ == "SpatialTransform"][0]
    rec = spatial.transforms[0]
    for k in ("patch_size", "p_rotation", "rotation", "p_scaling", "scaling", "p_elastic_deform"):
        assert getattr(rec, k) == getattr(orig, k)


def test_pseudo_2d_is_kept_spatial():
    spatial, _ = split_training_transforms(_stock(dummy_2d=True))
    names = [type(t).__name__ for t in spatial.transforms]
    assert names == ["Convert3DTo2DTransform", "RecordingSpatialTransform", "Convert2DTo3DTransform",
                     "RecordingMirrorTransform"]
    out = spatial(image=torch.rand(2, 16, 20, 20))
    assert out["image"].shape == (2, 16, 16, 16)


def test_recording_reports_parameters():
    spatial, _ = split_training_transforms(_stock())
    spatial.transforms[0].p_rotation = 1
    out = spatial(image=torch.rand(1, 20, 20, 20))
    assert out["ssl_spatial"]["affine"].shape == (3, 3) and not out["ssl_spatial"]["elastic"]
    assert isinstance(out["ssl_mirror_axes"], list)


def test_unknown_transform_is_refused():
    class Warp(BasicTransform):
        pass
    with pytest.raises(ValueError, match="unknown augmentation Warp"):
        split_training_transforms(ComposeTransforms([Warp()]))
