# nnU-Net imports this file as a top-level module while searching the folders in nnUNet_extTrainer.
# Absolute imports only: the classes found here are the very objects `import nnunet_ssl.trainers` gives.
from nnunet_ssl.trainers import *  # noqa: F401,F403
