"""Write labels and maps into the geometry and array order of the scan they belong to.

Writes are atomic (a temporary file in the target folder, then ``os.replace``) and never go onto the
input scan.  Provenance goes into the NIfTI ``descrip`` field (80 characters at most) and, for
MetaImage/NRRD, into the ``SpineSegDiff_ProducedBy`` metadata key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .guard import resolved
from .labels import is_integral
from .temporaries import make_temporary, remove_stale
from .readers import (
    KIND_KEY,
    PROVENANCE_KEY,
    PROVENANCE_PREFIX,
    file_suffix,
    has_shear,
    nifti_header_affine,
)
from .volume import Volume

WriteKind = Literal["labels", "image"]
NIFTI_WRITE_SUFFIXES = (".nii.gz", ".nii")
ITK_WRITE_SUFFIXES = (".mha", ".nrrd")
WRITE_SUFFIXES = NIFTI_WRITE_SUFFIXES + ITK_WRITE_SUFFIXES
_LPS = np.diag([-1.0, -1.0, 1.0])


class VolumeWriteError(ValueError):
    """A volume that cannot (or must not) be written; the message is one sentence naming the file."""


# ------------------------------------------------------------------------------------------ provenance


def provenance_text(produced_by: str | dict[str, Any], limit: int = 80) -> str:
    """Short ASCII provenance for the NIfTI ``descrip`` field, always starting with ``spinesegdiff``."""
    if isinstance(produced_by, dict):
        body = " ".join(f"{k}={v}" for k, v in produced_by.items() if isinstance(v, str | int | float | bool))
    else:
        body = str(produced_by)
    body = " ".join(body.split())
    text = body if body.lower().startswith(PROVENANCE_PREFIX) else f"{PROVENANCE_PREFIX} {body}".strip()
    return text.encode("ascii", "replace").decode("ascii")[:limit]


def provenance_full(produced_by: str | dict[str, Any]) -> str:
    """Single-line provenance for a metadata key (JSON for a dict)."""
    if isinstance(produced_by, dict):
        return json.dumps(produced_by, default=str, separators=(",", ":"))
    return " ".join(str(produced_by).split())


# ---------------------------------------------------------------------------------------------- checks


def _cast(data: np.ndarray, kind: WriteKind, path: Path) -> np.ndarray:
    """Labels -> uint8 (uint16 above 255); images and maps -> float32."""
    if kind == "image":
        return np.asarray(data, dtype=np.float32)
    if kind != "labels":
        raise ValueError(f"kind must be 'labels' or 'image', not {kind!r}.")
    if not is_integral(data):
        raise VolumeWriteError(f"Cannot write {path} as labels: the array holds non-integer values.")
    if data.size and int(data.min()) < 0:
        raise VolumeWriteError(f"Cannot write {path} as labels: the array holds negative values.")
    top = int(data.max()) if data.size else 0
    if top > 65535:
        raise VolumeWriteError(f"Cannot write {path} as labels: the value {top} does not fit in uint16.")
    return np.asarray(data, dtype=np.uint8 if top <= 255 else np.uint16)


def _refuse_source(path: Path, like: Volume) -> None:
    sources = [like.source, *like.meta.get("source_files", [])]
    target = resolved(path)
    for src in sources:
        if src is not None and resolved(src) == target:
            raise VolumeWriteError(
                f"Refusing to write {path} because it is the input scan; choose another file name."
            )


# ----------------------------------------------------------------------------------------------- NIfTI


def _nifti_image(arr: np.ndarray, like: Volume, descrip: str):
    import nibabel as nib

    source_header = like.meta.get("nifti_header")
    if source_header is not None:
        header = nib.Nifti1Header.from_header(source_header)
        img = nib.Nifti1Image(arr, None, header=header)
        header_affine, _ = nifti_header_affine(img.header)
        if not np.allclose(header_affine, like.affine, atol=1e-6, rtol=0):
            _set_forms(img, like.affine)
    else:
        img = nib.Nifti1Image(arr, like.affine)
        _set_forms(img, like.affine)
    hdr = img.header
    hdr.set_data_dtype(arr.dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr.set_intent("label" if arr.dtype.kind == "u" else "none")  # NIFTI_INTENT_LABEL marks label files
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    hdr["descrip"] = descrip.encode("ascii")
    return img


def _set_forms(img, affine: np.ndarray) -> None:
    """sform = affine (scanner code 1); qform the same unless the affine is sheared (qform cannot be)."""
    img.set_sform(affine, code=1)
    if has_shear(affine):
        img.set_qform(None, code=0)
    else:
        img.set_qform(affine, code=1)


def _write_nifti(arr: np.ndarray, tmp: Path, like: Volume, descrip: str) -> None:
    import nibabel as nib

    nib.save(_nifti_image(arr, like, descrip), str(tmp))


# ------------------------------------------------------------------------------------ MetaImage / NRRD


def ras_affine_to_itk(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(origin, spacing, direction)`` in ITK's LPS convention (direction row-major) from a RAS affine."""
    aff = np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    direction = _LPS @ (aff[:3, :3] / spacing)
    origin = _LPS @ aff[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _itk_geometry(like: Volume) -> tuple[tuple, tuple, tuple]:
    """The source's own ITK geometry when it still matches the affine (bit-exact), else a conversion."""
    keys = ("sitk_origin", "sitk_spacing", "sitk_direction")
    if all(k in like.meta for k in keys):
        from .readers import itk_to_ras_affine

        origin, spacing, direction = (tuple(like.meta[k]) for k in keys)
        if np.allclose(itk_to_ras_affine(direction, spacing, origin), like.affine, atol=1e-9, rtol=0):
            return origin, spacing, direction
    return ras_affine_to_itk(like.affine)


def _write_itk(arr: np.ndarray, tmp: Path, like: Volume, full: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose()))
    origin, spacing, direction = _itk_geometry(like)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetMetaData(PROVENANCE_KEY, full)
    img.SetMetaData(KIND_KEY, "labels" if arr.dtype.kind == "u" else "image")
    sitk.WriteImage(img, str(tmp), True)


# ------------------------------------------------------------------------------------------- public API


def checked_write(data: np.ndarray, path: Path, like: Volume) -> tuple[str, np.ndarray]:
    """The checks of every volume write, in one sentence each: not onto the source scan, an extension a
    writer supports, the scan's shape.  Returns the suffix and the array."""
    _refuse_source(path, like)
    suffix = file_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise VolumeWriteError(f"Cannot write {path}: use one of the extensions {', '.join(WRITE_SUFFIXES)}.")
    arr = np.asarray(data)
    if arr.shape != like.shape:
        raise VolumeWriteError(
            f"Cannot write {path}: the array of shape {arr.shape} does not match the scan's shape {like.shape}."
        )
    return suffix, arr


def write_file(arr: np.ndarray, target: Path, suffix: str, like: Volume,
               produced_by: str | dict[str, Any]) -> None:
    """Write the cast ``arr`` to ``target`` (a temporary) in the format of ``suffix``, readable by all."""
    if suffix in NIFTI_WRITE_SUFFIXES:
        _write_nifti(arr, target, like, provenance_text(produced_by))
    else:
        _write_itk(arr, target, like, provenance_full(produced_by))
    os.chmod(target, 0o644)


def write_volume(
    data: np.ndarray,
    path: str | Path,
    like: Volume,
    kind: WriteKind = "labels",
    produced_by: str | dict[str, Any] = "spinesegdiff",
    overwrite: bool = True,
) -> Path:
    """Write ``data`` (in ``like``'s file voxel order) to ``path`` in ``like``'s geometry; return the path.

    ``.nii.gz``/``.nii`` keep the affine (and, for a NIfTI source, its header with sform/qform codes and
    the new dtype); ``.mha``/``.nrrd`` get the equivalent ITK origin/spacing/direction.  Labels are
    stored as uint8 (uint16 above 255), images and maps as float32.  Refuses to write onto the source scan.
    """
    path = Path(path)
    suffix, arr = checked_write(data, path, like)
    if path.exists() and not overwrite:
        raise VolumeWriteError(f"Cannot write {path}: the file exists and overwrite is off.")
    arr = _cast(arr, kind, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)  # what a killed earlier write of this file left behind
    tmp = make_temporary(path)
    try:
        write_file(arr, tmp, suffix, like, produced_by)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_canonical(
    canonical: np.ndarray,
    path: str | Path,
    like: Volume,
    kind: WriteKind = "labels",
    produced_by: str | dict[str, Any] = "spinesegdiff",
    overwrite: bool = True,
) -> Path:
    """Like :func:`write_volume` for an array in the canonical sagittal view of ``like``."""
    data = like.orientation.from_canonical(np.asarray(canonical))
    return write_volume(data, path, like, kind=kind, produced_by=produced_by, overwrite=overwrite)


def like_from_metadata(meta: dict[str, Any] | None) -> Volume | None:
    """A data-less stand-in for the source scan from :func:`~.readers.geometry_metadata`, or ``None``.

    Its ``data`` is a zero-size broadcast view; it only serves as ``like`` for the writers.
    """
    if not meta or meta.get("file_affine") is None or meta.get("file_shape") is None:
        return None
    try:
        affine = np.asarray(meta["file_affine"], dtype=float).reshape(4, 4)
        shape = tuple(int(s) for s in meta["file_shape"])
        if len(shape) != 3:
            return None
        source = Path(meta["source"]) if meta.get("source") else None
        extra = {k: meta[k] for k in ("nifti_header", "sitk_origin", "sitk_spacing", "sitk_direction", "format")
                 if meta.get(k) is not None}
        extra["source_files"] = [Path(f) for f in meta.get("source_files", [])]
        placeholder = np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
        return Volume(placeholder, affine, kind="image", source=source, meta=extra)
    except (TypeError, ValueError, KeyError):
        return None
