"""nnunet_ssl: contrastive self-supervised pretraining with spatial-prior pair selection for nnU-Net v2.

Kept import-light on purpose: the interpreter start-up hook (``nnunet_ssl.pth``) imports
``nnunet_ssl._startup`` in every Python process of the environment, so nothing here may pull in torch.
"""

__version__ = "0.1.0"
