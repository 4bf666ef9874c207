"""napari writers (npe2 single-layer signature): labels and images/maps back in the scan's geometry.

A layer read by this plugin (or made by the widget) carries the source geometry in ``metadata`` (see
:func:`~napari_spinesegdiff.io.geometry_metadata`): its canonical array is mapped back to the file's own
array order and written with the source affine/header.  Any other layer is written as an axis-aligned
canonical volume (axes R, I, P) using the layer's ``scale`` (mm) and ``translate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io.readers import file_suffix
from .io.volume import Volume
from .io.writers import (
    WRITE_SUFFIXES,
    VolumeWriteError,
    like_from_metadata,
    write_canonical,
    write_volume,
)


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write a Labels layer (uint8, uint16 above 255) to ``.nii.gz``, ``.nii`` or ``.mha``."""
    return [str(_write_layer(path, data, attributes or {}, "labels"))]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write an Image layer (e.g. an uncertainty map) as float32 to ``.nii.gz``, ``.nii`` or ``.mha``."""
    return [str(_write_layer(path, data, attributes or {}, "image"))]


def _with_extension(path: str | Path) -> Path:
    p = Path(path)
    return p if file_suffix(p) in WRITE_SUFFIXES else p.with_name(p.name + ".nii.gz")


def _layer_array(data: Any, attributes: dict[str, Any]) -> np.ndarray:
    if attributes.get("rgb"):
        raise VolumeWriteError("Cannot write an RGB image layer: SpineSegDiff writes scalar volumes only.")
    if attributes.get("multiscale") or isinstance(data, list | tuple):
        data = data[0]  # the full-resolution level
    return np.asarray(data)


def _write_layer(path: str | Path, data: Any, attributes: dict[str, Any], kind: str) -> Path:
    out = _with_extension(path)
    arr = _layer_array(data, attributes)
    meta = attributes.get("metadata") or {}
    produced_by = f"spinesegdiff napari {kind} layer '{attributes.get('name', '')}'"
    like = like_from_metadata(meta)
    if like is not None and arr.shape == like.orientation.canonical_shape:
        return write_canonical(arr, out, like, kind=kind, produced_by=produced_by)  # type: ignore[arg-type]
    like = _axis_aligned_like(arr, attributes)
    if meta.get("source") and Path(meta["source"]).resolve() == out.resolve():
        raise VolumeWriteError(f"Refusing to write {out} because it is the input scan; choose another file name.")
    return write_volume(like.data, out, like, kind=kind, produced_by=produced_by)  # type: ignore[arg-type]


def _last3(values: Any, ndim: int, default: float) -> tuple[float, float, float]:
    vals = [float(v) for v in (values if values is not None else [])][-ndim:] if ndim else []
    vals = [default] * (ndim - len(vals)) + vals
    return tuple(([default] * (3 - len(vals)) + vals)[-3:])  # type: ignore[return-value]


def _axis_aligned_like(arr: np.ndarray, attributes: dict[str, Any]) -> Volume:
    """A canonical (R, I, P) volume from the layer's own scale/translate; 2-D layers become one slice."""
    ndim = arr.ndim
    if ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise VolumeWriteError(
            f"Cannot write a {ndim}-D layer of shape {arr.shape}: SpineSegDiff writes 3-D volumes only."
        )
    scale = _last3(attributes.get("scale"), ndim, 1.0)
    translate = _last3(attributes.get("translate"), ndim, 0.0)
    spacing = tuple(abs(s) if s else 1.0 for s in scale)
    # napari_geometry shows world (x, -z, -y); invert it for the RAS origin.
    origin = (translate[0], -translate[2], -translate[1])
    return Volume.from_canonical(arr, spacing, origin)  # type: ignore[arg-type]
