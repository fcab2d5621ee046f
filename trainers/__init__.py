"""nnU-Net trainer classes of nnunet_ssl (installed as ``nnunet_ssl.trainers``).

Every public class here is found by ``nnUNetv2_train -tr NAME`` through the discovery hook.
"""
