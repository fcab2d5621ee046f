"""Small-network plans for CPU runs and quick experiments.

Same topology rules as nnU-Net's default planner (spacing, patch size, pooling, kernel sizes); only the
width of the U-Net and the batch size shrink. Plans made with it are ordinary nnU-Net plans: stock
``nnUNetv2_train -p nnUNetPlansSmall`` trains them, and weights move between datasets planned alike only when the
architecture matches (``nnunet-ssl check-weights`` tells)."""
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class nnUNetPlannerSmall(ExperimentPlanner):
    default_plans_name = "nnUNetPlansSmall"
    base_num_features = 8
    max_num_features = 128
    batch_size = 2

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        # plan with the default width (so patch size and topology are nnU-Net's), then narrow the network
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        kw = plan["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [min(self.max_num_features, self.base_num_features * 2 ** i)
                                    for i in range(kw["n_stages"])]
        plan["batch_size"] = self.batch_size
        return plan


class nnUNetPlannerTiny(nnUNetPlannerSmall):
    """Smallest sensible U-Net; for tests and smoke runs only."""
    default_plans_name = "nnUNetPlansTiny"
    base_num_features = 4
    max_num_features = 16
