"""nnU-Net experiment planners of nnunet_ssl (installed as ``nnunet_ssl.planners``)."""
