"""napari reader: spine scans and masks as canonical sagittal layers in millimetres.

Every layer shows the canonical sagittal array (slices left->right, rows superior->inferior, columns
anterior->posterior) with ``scale``/``translate`` from :func:`~napari_spinesegdiff.io.napari_geometry`.
Its ``metadata`` holds :func:`~napari_spinesegdiff.io.geometry_metadata` (file affine and shape, file
axis codes, canonical affine, source path, header) so the writers can put results back in the file's
own geometry and array order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import CLASS_COLORS
from .io.labels import is_spider_mask, to_classes
from .io.orientation import napari_geometry
from .io.readers import (
    PROVENANCE_PREFIX,
    READ_SUFFIXES,
    VolumeReadError,
    dicom_files_in,
    file_stem,
    file_suffix,
    geometry_metadata,
    is_dicom_file,
    read_volume,
)
from .io.volume import Volume

LayerData = tuple[Any, dict[str, Any], str]



def _claims(path: str | Path) -> bool:
    """A DICOM folder, a regular file with an extension we read, or a DICOM file without one (``DICM``
    at byte 128), as :func:`~napari_spinesegdiff.io.read_volume` opens them.

    A name with an extension we read that exists but is no regular file (a looping or broken link, a device
    or pipe) or that the system cannot examine (too long, through a file) is claimed too, so that opening it
    shows :func:`read_volume`'s sentence rather than napari's "no reader"; a missing name is not claimed."""
    p = Path(path)
    try:
        if p.is_dir():
            return bool(dicom_files_in(p, limit=1))
        if p.is_file():
            return file_suffix(p) in READ_SUFFIXES or is_dicom_file(p)
        os.lstat(p)  # the name exists (a link, a device, a pipe): claimed when its extension is ours
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        pass  # it cannot even be examined: read_volume says why
    return file_suffix(p) in READ_SUFFIXES


def napari_get_reader(path: str | Path | Sequence[str | Path]) -> Callable[..., list[LayerData]] | None:
    """The reader for ``path`` (a file, a DICOM folder, or a list of them), or ``None``; never raises."""
    try:
        paths = [path] if isinstance(path, str | Path) else list(path)
        if paths and all(_claims(p) for p in paths):
            return read_layers
    except Exception:  # noqa: BLE001 - a reader hook must never raise
        return None
    return None


def read_layers(path: str | Path | Sequence[str | Path]) -> list[LayerData]:
    """Read each path into a layer-data tuple; a claimed file that cannot be read raises ``ValueError``."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers = []
    for p in paths:
        volume = read_volume(p)  # refusals are VolumeReadError (a ValueError): one sentence naming the file
        try:
            layers.append(volume_to_layer_data(volume))
        except MemoryError:
            raise VolumeReadError(f"Cannot open {p}: its layer does not fit in the memory available.") from None
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one sentence naming the file
            raise VolumeReadError(f"Cannot open {p}: it was read but cannot be shown as a layer.") from exc
    return layers


def layer_name(volume: Volume) -> str:
    """File name without extension (folder name for DICOM folders)."""
    return file_stem(volume.source) if volume.source is not None else "volume"


def _contrast_limits(canonical: np.ndarray) -> list[float]:
    finite = canonical[np.isfinite(canonical)] if canonical.dtype.kind == "f" else canonical
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return [lo, hi if hi > lo else lo + 1.0]


def _is_product(volume: Volume, values: np.ndarray) -> bool:
    """A spinesegdiff output (its provenance names spinesegdiff) holding only the classes 0-3."""
    produced = str(volume.meta.get("produced_by", "")).lower()
    return PROVENANCE_PREFIX in produced and bool(np.isin(values, [0, 1, 2, 3]).all())


def volume_to_layer_data(volume: Volume, name: str | None = None) -> LayerData:
    """``(canonical_array, kwargs, layer_type)`` for one volume (labels or image)."""
    orientation = volume.orientation
    scale, translate = napari_geometry(orientation)
    metadata = geometry_metadata(volume)
    kwargs: dict[str, Any] = {
        "name": name or layer_name(volume),
        "scale": tuple(scale),
        "translate": tuple(translate),
        "metadata": metadata,
    }
    canonical = np.ascontiguousarray(volume.canonical())
    if volume.kind == "labels":
        spider = is_spider_mask(canonical)
        classes = to_classes(canonical, scheme="spider" if spider else "keep")
        metadata["label_scheme"] = "spider" if spider else "keep"
        if spider or _is_product(volume, np.unique(classes)):
            kwargs["colormap"] = dict(CLASS_COLORS)
        return classes, kwargs, "labels"
    kwargs["contrast_limits"] = _contrast_limits(canonical)
    return canonical, kwargs, "image"
