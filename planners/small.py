"""Small-network plans for CPU runs and quick experiments.

Same topology rules as nnU-Net's default planner (spacing, patch size, pooling, kernel sizes); only the
width of the U-Net and the batch size shrink. Plans made with it are ordinary nnU-Net plans: stock
``nnUNetv2_train -p nnUNetPlansSmall`` trains them, and weights move between datasets planned alike only when the
architecture matches (``nnunet-ssl check-weights`` tells)."""
import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props


class PluginPlanner(ExperimentPlanner):
    """nnU-Net's planner with the plugin planner's own plans name as default (``default_plans_name``)."""
    default_plans_name = "nnUNetPlans"

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)


class nnUNetPlannerSmall(PluginPlanner):
    default_plans_name = "nnUNetPlansSmall"
    base_num_features = 8
    max_num_features = 128
    batch_size = 2

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        # plan with the default width (so patch size and topology are nnU-Net's), then narrow the network
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        kw = plan["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = self.features_per_stage(kw["n_stages"])
        plan["batch_size"] = self.batch_size
        return plan

    def features_per_stage(self, n_stages: int) -> list:
        return [min(self.max_num_features, self.base_num_features * 2 ** i) for i in range(n_stages)]


class nnUNetPlannerCPU(nnUNetPlannerSmall):
    """The CPU benchmark budget's network: 4-32 features, batch 2, and at most ``max_patch_voxels`` per patch.

    A patch over the cap shrinks with nnU-Net's own rule (the axis largest relative to the median shape loses one
    divisor step, then the topology is recomputed), exactly as nnU-Net shrinks a patch that exceeds its GPU memory
    target. On Hippocampus: 32x48x32 instead of 40x56x40 (0.55x the voxels), about half the time per step of
    nnUNetPlansSmall on a 2-core CPU."""
    default_plans_name = "nnUNetPlansCPU"
    base_num_features = 4
    max_num_features = 32
    max_patch_voxels = 50_000

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        patch = [int(i) for i in plan["patch_size"]]
        if np.prod(patch, dtype=np.int64) <= self.max_patch_voxels:
            return plan
        min_edge = self.UNet_featuremap_min_edge_length
        divisible_by = get_pool_and_conv_props(spacing, patch, min_edge, 999999)[-1]
        while np.prod(patch, dtype=np.int64) > self.max_patch_voxels:
            axis = int(np.argsort([i / j for i, j in zip(patch, median_shape[:len(spacing)])])[-1])
            trial = list(patch)
            trial[axis] -= divisible_by[axis]
            divisible_by = get_pool_and_conv_props(spacing, trial, min_edge, 999999)[-1]
            patch[axis] -= divisible_by[axis]
            _, strides, kernels, patch, divisible_by = get_pool_and_conv_props(spacing, patch, min_edge, 999999)
            patch = [int(i) for i in patch]
        n = len(strides)
        plan["patch_size"] = patch
        plan["architecture"]["arch_kwargs"].update({
            "n_stages": n,
            "kernel_sizes": kernels,
            "strides": strides,
            "features_per_stage": self.features_per_stage(n),
            "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:n]),
            "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:n - 1]),
        })
        return plan


class nnUNetPlannerCPUWide(nnUNetPlannerCPU):
    """The CPU benchmark budget's network: nnUNetPlannerCPU's patch and topology with twice the width, 8-64 features,
    batch 2 (Hippocampus: 32x48x32). The 4-32-feature network often never learned one of Hippocampus' two classes
    from 5 labelled cases; this one learned both in every run (BENCHMARKS.md). A fine-tuning step costs 0.10 s in
    bf16 / 0.17 s in fp32 on the 2-core development CPU (4-32 features: 0.06 / 0.14 s)."""
    default_plans_name = "nnUNetPlansCPUWide"
    base_num_features = 8
    max_num_features = 64


class nnUNetPlannerTiny(nnUNetPlannerSmall):
    """Smallest sensible U-Net; for tests and smoke runs only."""
    default_plans_name = "nnUNetPlansTiny"
    base_num_features = 4
    max_num_features = 16
