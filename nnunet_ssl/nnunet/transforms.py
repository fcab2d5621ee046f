"""nnU-Net's own augmentation, split into a spatial part (applied to image + coordinate channels) and an
intensity part (applied to the image only).

The pretraining loader carries the preprocessed voxel coordinates of every voxel as extra channels through
exactly the spatial transforms the trainer's ``get_training_transforms`` configures (rotation, scaling,
elastic deformation, mirroring, pseudo-2D), so the correspondence between two views is known exactly.
Intensity transforms must never touch those channels, hence the split. Label-only transforms are dropped:
pretraining does not use labels.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

SPATIAL_PARAMS_KEY = "ssl_spatial"
MIRROR_PARAMS_KEY = "ssl_mirror_axes"

# Value-wise (or symmetric-kernel) image transforms: they never move content, so coordinates stay valid.
INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)
LABEL_TRANSFORMS = (RemoveLabelTansform, DownsampleSegForDSTransform, ConvertSegmentationToRegionsTransform,
                    MaskImageTransform)


class RecordingSpatialTransform(SpatialTransform):
    """nnU-Net's SpatialTransform that also reports what it did (affine, elastic or not, crop centre)."""

    @classmethod
    def from_transform(cls, t: SpatialTransform) -> "RecordingSpatialTransform":
        new = cls.__new__(cls)
        new.__dict__.update(t.__dict__)
        new._grid_cache = {}
        return new

    def apply(self, data_dict, **params):
        data_dict = super().apply(data_dict, **params)
        data_dict[SPATIAL_PARAMS_KEY] = {
            "affine": None if params["affine"] is None else np.asarray(params["affine"], dtype=np.float64),
            "elastic": params["elastic_offsets"] is not None,
            "center": list(params["center_location_in_pixels"]),
        }
        return data_dict


class RecordingMirrorTransform(MirrorTransform):
    @classmethod
    def from_transform(cls, t: MirrorTransform) -> "RecordingMirrorTransform":
        return cls(allowed_axes=t.allowed_axes)

    def apply(self, data_dict, **params):
        data_dict = super().apply(data_dict, **params)
        data_dict[MIRROR_PARAMS_KEY] = list(params["axes"])
        return data_dict


def _inner(t: BasicTransform) -> BasicTransform:
    return t.transform if isinstance(t, RandomTransform) else t


def split_training_transforms(transforms: BasicTransform) -> Tuple[ComposeTransforms, ComposeTransforms]:
    """Split nnU-Net training transforms into (spatial, intensity) pipelines, preserving order within each."""
    items = transforms.transforms if isinstance(transforms, ComposeTransforms) else [transforms]
    spatial: List[BasicTransform] = []
    intensity: List[BasicTransform] = []
    for t in items:
        inner = _inner(t)
        if isinstance(inner, SpatialTransform):
            if inner is not t:
                raise ValueError("a randomly applied SpatialTransform is not supported by the pretraining loader; "
                                 "use SpatialTransform's own p_rotation/p_scaling/p_elastic_deform instead")
            spatial.append(RecordingSpatialTransform.from_transform(inner))
        elif isinstance(inner, MirrorTransform):
            if inner is not t:
                raise ValueError("a randomly applied MirrorTransform is not supported by the pretraining loader")
            spatial.append(RecordingMirrorTransform.from_transform(inner))
        elif isinstance(inner, (Convert3DTo2DTransform, Convert2DTo3DTransform)):
            spatial.append(t)
        elif isinstance(inner, INTENSITY_TRANSFORMS):
            intensity.append(t)
        elif isinstance(inner, LABEL_TRANSFORMS):
            continue
        else:
            raise ValueError(
                f"unknown augmentation {type(inner).__name__} in get_training_transforms: the pretraining loader "
                f"cannot tell whether it moves voxels; register it in nnunet_ssl.nnunet.transforms "
                f"(INTENSITY_TRANSFORMS or LABEL_TRANSFORMS) or override get_pretraining_transforms")
    return ComposeTransforms(spatial), ComposeTransforms(intensity)
