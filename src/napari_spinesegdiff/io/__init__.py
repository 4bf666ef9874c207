"""Volume I/O without torch or Qt: readers, writers, orientation, label maps."""

from .orientation import CANONICAL_AXCODES, SagittalOrientation, napari_geometry
from .volume import Volume

__all__ = ["CANONICAL_AXCODES", "SagittalOrientation", "Volume", "napari_geometry"]
