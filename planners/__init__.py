"""nnU-Net experiment planners of nnunet_ssl (installed as ``nnunet_ssl.planners``).

nnU-Net's ``-pl`` only searches its own package; run these with ``nnunet-ssl plan -d D -pl NAME``."""
from nnunet_ssl.planners.fixed import nnUNetPlannerFixed
from nnunet_ssl.planners.small import nnUNetPlannerCPU, nnUNetPlannerCPUWide, nnUNetPlannerSmall, nnUNetPlannerTiny

PLANNERS = {c.__name__: c for c in (nnUNetPlannerSmall, nnUNetPlannerCPU, nnUNetPlannerCPUWide, nnUNetPlannerTiny,
                                    nnUNetPlannerFixed)}

__all__ = ["nnUNetPlannerSmall", "nnUNetPlannerCPU", "nnUNetPlannerCPUWide", "nnUNetPlannerTiny", "nnUNetPlannerFixed", "PLANNERS"]
