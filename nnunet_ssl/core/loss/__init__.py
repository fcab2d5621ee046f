"""Losses of the plugin's methods, one per file, each with its paper in the module docstring (in the manner of
lightly's ``loss`` package).

The rule: a module here turns network outputs (and the batch metadata the loader provides) into a scalar loss and
its logged statistics. Everything a loss is built from — pair selection, voxel correspondences, coordinate frames,
affinities, label compositions, input masks, heads, queues — lives one level up in ``nnunet_ssl.core``."""
from .affinity_weighted import affinity_weighted_loss
from .dense_correspondence import dense_correspondence_loss
from .drasclr import drasclr_loss
from .info_nce import info_nce
from .masked_reconstruction import masked_reconstruction_loss
from .pdcr import pdcr_loss
from .spade_global import spade_global_loss

__all__ = ["affinity_weighted_loss", "dense_correspondence_loss", "drasclr_loss", "info_nce",
           "masked_reconstruction_loss", "pdcr_loss", "spade_global_loss"]
