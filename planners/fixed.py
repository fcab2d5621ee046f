"""A dataset-independent architecture, so that weights move between datasets (``-pretrained_weights`` across
datasets)."""
from nnunet_ssl.planners.small import PluginPlanner


class nnUNetPlannerFixed(PluginPlanner):
    """Dataset-independent patch size and U-Net topology, so any two datasets planned with it can exchange weights
    (``-pretrained_weights`` across datasets). Spacing, normalisation and resampling remain nnU-Net's per-dataset
    choices; only the architecture and patch are pinned. Input channels still have to match."""
    default_plans_name = "nnUNetPlansFixed"
    patch_size_3d = (64, 64, 64)
    patch_size_2d = (128, 128)
    features = (32, 64, 128, 256, 320)
    batch_size = 2

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        dim = len(spacing)
        n = len(self.features)
        kw = plan["architecture"]["arch_kwargs"]
        kw.update({
            "n_stages": n,
            "features_per_stage": list(self.features),
            "kernel_sizes": [[3] * dim] * n,
            "strides": [[1] * dim] + [[2] * dim] * (n - 1),
            "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:n]),
            "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:n - 1]),
        })
        plan["patch_size"] = list(self.patch_size_3d if dim == 3 else self.patch_size_2d)
        plan["batch_size"] = self.batch_size
        return plan
