"""Volume I/O without torch or Qt: readers, writers, orientation, label maps."""

from .guard import check_signal
from .labels import is_spider_mask, spider_to_classes, to_classes
from .orientation import CANONICAL_AXCODES, SagittalOrientation, napari_geometry
from .readers import (
    PairMismatchError,
    VolumeReadError,
    geometry_metadata,
    looks_like_labels_path,
    read_pair,
    read_volume,
)
from .volume import Volume
from .writers import VolumeWriteError, like_from_metadata, write_canonical, write_volume

__all__ = [
    "CANONICAL_AXCODES",
    "PairMismatchError",
    "SagittalOrientation",
    "Volume",
    "VolumeReadError",
    "VolumeWriteError",
    "check_signal",
    "geometry_metadata",
    "is_spider_mask",
    "like_from_metadata",
    "looks_like_labels_path",
    "napari_geometry",
    "read_pair",
    "read_volume",
    "spider_to_classes",
    "to_classes",
    "write_canonical",
    "write_volume",
]
