"""Read NIfTI, MetaImage, NRRD and DICOM scans into :class:`Volume` with their RAS+ millimetre geometry.

Everything a writer needs to write back into the same geometry stays in ``Volume.meta``:
``format`` (``nifti``, ``nifti-pair``, ``analyze``, ``metaimage``, ``nrrd``, ``dicom``), ``source_files``,
``nifti_header`` (NIfTI), ``sitk_origin`` / ``sitk_spacing`` / ``sitk_direction`` / ``sitk_pixel_type``
(SimpleITK formats) and ``produced_by`` when the file was written by spinesegdiff.
"""

from __future__ import annotations

import re
import stat
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import guard
from .guard import VolumeReadError, check_affine, check_signal
from .labels import as_label_array, is_integral
from .limits import physical_size_problem
from .nifti_header import check_nifti
from .text_headers import check_metaimage, check_nrrd
from .volume import Volume

ReadKind = Literal["auto", "image", "labels"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm",)
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES

#: File-name tokens that mark a label file (see :func:`looks_like_labels_path`).
LABEL_NAME_TOKENS = frozenset(
    {"label", "labels", "labeled", "labelled", "seg", "segmentation", "msk", "mask", "masks"}
)
#: Parent-folder names that mark a label file (compared case-insensitively).
LABEL_FOLDERS = frozenset({"masks", "labels", "labelstr", "labelsts", "segmentations"})
#: Metadata key (MetaImage/NRRD) and NIfTI ``descrip`` prefix that mark files written by spinesegdiff.
PROVENANCE_KEY = "SpineSegDiff_ProducedBy"
#: Metadata key (MetaImage/NRRD) holding ``labels`` or ``image`` in files written by spinesegdiff.
KIND_KEY = "SpineSegDiff_Kind"
#: NIfTI intent code NIFTI_INTENT_LABEL: the voxels are label indices.
NIFTI_INTENT_LABEL = 1002
PROVENANCE_PREFIX = "spinesegdiff"

_SHEAR_TOL = 1e-4


class PairMismatchError(VolumeReadError):
    """An image and its mask do not share one voxel grid."""


# --------------------------------------------------------------------------------------------- helpers


def file_suffix(path: str | Path) -> str:
    """Lower-case extension, with ``.nii.gz`` kept whole (``'foo.gz'`` gives ``'.gz'``)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def file_stem(path: str | Path) -> str:
    """File name without its (known) extension, e.g. ``'IVD_11_image'``."""
    p = Path(path)
    suffix = file_suffix(p)
    return p.name[: len(p.name) - len(suffix)] if suffix else p.name


def is_dicom_file(path: str | Path) -> bool:
    """A ``.dcm`` file, or any file with the ``DICM`` marker at byte 128."""
    p = Path(path)
    if not p.is_file():
        return False
    if file_suffix(p) in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files_in(folder: str | Path, limit: int | None = None) -> list[Path]:
    """DICOM files directly inside ``folder`` (not recursive); stop after ``limit`` hits."""
    found: list[Path] = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return found
    for entry in entries:
        if is_dicom_file(entry):
            found.append(entry)
            if limit is not None and len(found) >= limit:
                break
    return found


def looks_like_labels_path(path: str | Path) -> bool:
    """The file-name rule behind ``kind="auto"``.

    A path names a label file when its name (extension removed, lower case, split at every character
    that is not a letter or digit) holds one of the tokens ``label(s)``, ``labeled``/``labelled``,
    ``seg``, ``segmentation``, ``msk``, ``mask(s)``, or when its folder is called ``masks``, ``labels``,
    ``labelsTr``, ``labelsTs`` or ``segmentations``.  So ``IVD_11_label.nii.gz``,
    ``example_seg_mr.nii.gz`` and ``sub-verse004_seg-vert_msk.nii.gz`` are labels, ``t2.nii.gz`` and
    ``segment_t2.nii.gz`` are not.
    """
    p = Path(path)
    tokens = set(re.split(r"[^a-z0-9]+", file_stem(p).lower()))
    return bool(tokens & LABEL_NAME_TOKENS) or p.parent.name.lower() in LABEL_FOLDERS


def _fail(path: Path, reason: str) -> VolumeReadError:
    return guard.fail(path, reason)


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _to_3d(arr: np.ndarray, path: Path) -> np.ndarray:
    """Accept 3-D arrays (and 3-D with trailing singleton axes); refuse 2-D, 4-D and 5-D data."""
    if arr.ndim == 3:
        return arr
    if arr.ndim > 3 and all(s == 1 for s in arr.shape[3:]):
        return arr.reshape(arr.shape[:3])
    what = f"it is a {arr.ndim}-D image of size {_shape_text(arr.shape)}"
    if arr.ndim < 3:
        raise _fail(path, f"{what} and SpineSegDiff needs a 3-D volume")
    raise _fail(path, f"{what} (a series or a vector field) and SpineSegDiff reads single 3-D volumes only")


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    """Refuse by the header's shape before reading any voxel."""
    _to_3d(np.broadcast_to(np.zeros((), np.uint8), tuple(int(s) for s in shape)), path)


def _check_physical(sizes_mm, shape, path: Path) -> None:
    """Refuse voxel sizes or an extent that no scan has, before any voxel is read."""
    problem = physical_size_problem(sizes_mm, tuple(int(n) for n in tuple(shape)[: len(sizes_mm)]))
    if problem is not None:
        raise _fail(path, problem)


def has_shear(affine: np.ndarray, tol: float = _SHEAR_TOL) -> bool:
    """True when the voxel axes of ``affine`` are not orthogonal (beyond ``tol`` in cosine)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms == 0):
        return False
    u = m / norms
    return bool(np.max(np.abs(u.T @ u - np.eye(3))) > tol)


def _check_affine(affine: np.ndarray, path: Path, shape) -> None:
    """Finite, non-degenerate, each axis its own direction (see :func:`guard.check_affine`), voxel sizes and
    extent a scan can have (:func:`limits.physical_size_problem`, for the first three axes of ``shape``);
    shear warns."""
    _check_physical(np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0), shape, path)
    check_affine(affine, path)
    if has_shear(affine):
        warnings.warn(
            f"{path.name} has a sheared affine; the canonical sagittal view uses the nearest axis-aligned "
            "orientation and the exact affine is kept for writing.",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ NIfTI


def nifti_header_affine(header: Any) -> tuple[np.ndarray, str]:
    """``(affine, source)`` from a NIfTI/Analyze header: sform (code > 0), else qform, else ``'pixdim'``.

    The ``'pixdim'`` fallback is ``diag(voxel size)`` with the origin at 0.
    """
    if hasattr(header, "get_sform"):
        sform, scode = header.get_sform(coded=True)
        if scode and int(scode) > 0:
            return np.asarray(sform, dtype=float), "sform"
        qform, qcode = header.get_qform(coded=True)
        if qcode and int(qcode) > 0:
            return np.asarray(qform, dtype=float), "qform"
    zooms = [abs(float(z)) for z in header.get_zooms()[:3]]
    zooms = [z if z > 0 else 1.0 for z in zooms] + [1.0] * (3 - len(zooms))
    return np.diag([*zooms, 1.0]), "pixdim"


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import nibabel as nib

    check_nifti(path)  # header, extensions and data size, before nibabel reads anything
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel's notes on odd headers; the checks below decide
            img = nib.load(str(path))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any library failure becomes one sentence
        raise _fail(path, "its header is not a valid NIfTI or Analyze header") from exc
    header = img.header
    try:
        dtype = img.get_data_dtype()
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, "its header declares a voxel type nibabel cannot read") from exc
    if dtype.names:
        raise _fail(path, f"its voxels are RGB/vector values ({', '.join(dtype.names)}), not scalar intensities")
    if dtype.kind == "c":
        raise _fail(path, f"its voxels are complex numbers ({dtype}), not real intensities")
    _check_shape(img.shape, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            affine, source = nifti_header_affine(header)
    except Exception as exc:  # noqa: BLE001 - e.g. a qform with negative voxel sizes
        raise _fail(path, "its qform, sform or voxel size cannot be turned into an affine") from exc
    _check_affine(affine, path, img.shape)  # before any voxel is read
    if source == "pixdim":
        warnings.warn(
            f"{path.name} has neither a qform nor an sform; using the voxel size only (origin 0, axes "
            "taken as R, A, S).",
            stacklevel=3,
        )
    try:
        data = _nifti_data(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, "its voxel data cannot be read, so the file is truncated or corrupt") from exc
    data = _to_3d(data, path)
    descrip = _descrip(header)
    meta: dict[str, Any] = {
        "format": _nifti_format(path, header),
        "nifti_header": header.copy(),
        "affine_source": source,
        "dtype": str(data.dtype),
        "descrip": descrip,
        "source_files": _pair_files(path),
        "labels_marked": int(header["intent_code"]) == NIFTI_INTENT_LABEL if "intent_code" in header else False,
    }
    if descrip.lower().startswith(PROVENANCE_PREFIX):
        meta["produced_by"] = descrip
    return data, affine, meta


def _nifti_format(path: Path, header: Any) -> str:
    if file_suffix(path) in (".nii", ".nii.gz"):
        return "nifti"
    return "nifti-pair" if hasattr(header, "get_sform") else "analyze"


def _nifti_data(img: Any) -> np.ndarray:
    """Stored values; scaled data (scl_slope/scl_inter not 1/0) as float32 rather than float64."""
    proxy = img.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if slope == 1.0 and inter == 0.0:
        return np.asarray(proxy)
    return np.asarray(img.get_fdata(dtype=np.float32))


def _descrip(header: Any) -> str:
    try:
        raw = header["descrip"].item()
    except (KeyError, ValueError, AttributeError):
        return ""
    return raw.decode("latin-1", "replace").strip("\x00 ") if isinstance(raw, bytes) else str(raw)


def _pair_files(path: Path) -> list[Path]:
    """The file itself, plus the other half of an Analyze/NIfTI ``.hdr``/``.img`` pair."""
    files = [path]
    if file_suffix(path) in (".hdr", ".img"):
        other = path.with_suffix(".img" if file_suffix(path) == ".hdr" else ".hdr")
        if other.exists():
            files.append(other)
    return files


# ------------------------------------------------------------------------------------ SimpleITK formats


def itk_to_ras_affine(direction, spacing, origin) -> np.ndarray:
    """RAS+ voxel-to-world affine from ITK (LPS) direction (row-major 3x3), spacing and origin."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=float))
    lps[:3, 3] = np.asarray(origin, dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _sitk_checks(path: Path, size, ncomp: int, pixel_id: int) -> None:
    import SimpleITK as sitk

    if ncomp > 1:
        raise _fail(path, f"its voxels are {ncomp}-component RGB/vector values, not scalar intensities")
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise _fail(path, "its voxels are complex numbers, not real intensities")
    _check_shape(tuple(size), path)


def _sitk_geometry(img, dim: int) -> tuple[tuple, tuple, tuple]:
    """Origin, spacing and 3x3 direction (row-major) of the first three axes of an ITK image."""
    origin = tuple(img.GetOrigin())[:3]
    spacing = tuple(img.GetSpacing())[:3]
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return origin, spacing, tuple(direction.ravel())


def _sitk_volume(img, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Voxel array in ITK index order (i, j, k) plus the RAS affine and ITK facts of an sitk image."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    _sitk_checks(path, img.GetSize(), img.GetNumberOfComponentsPerPixel(), img.GetPixelID())
    data = _to_3d(sitk.GetArrayFromImage(img).transpose(), path)
    origin, spacing, direction = _sitk_geometry(img, dim)
    affine = itk_to_ras_affine(direction, spacing, origin)
    meta: dict[str, Any] = {
        "sitk_origin": origin,
        "sitk_spacing": spacing,
        "sitk_direction": direction,
        "sitk_pixel_type": img.GetPixelIDTypeAsString(),
        "dtype": str(data.dtype),
    }
    return data, affine, meta


def _detached_data_files(path: Path) -> list[Path]:
    """The voxel-data file a MetaImage or NRRD header points to (``ElementDataFile`` / ``data file``), so
    that it counts as part of the source scan; none for attached (``LOCAL``) data or a header that the
    checks refuse."""
    try:
        facts = check_nrrd(path) if file_suffix(path) in (".nrrd", ".nhdr") else check_metaimage(path)
    except VolumeReadError:
        return []
    return [f.resolve() for f in facts.data_files]


def _itk_info_affine(reader, path: Path) -> np.ndarray:
    """The RAS affine an ITK reader's header information gives, before any voxel is read."""
    dim = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)
    spacing = np.asarray(reader.GetSpacing(), dtype=float)
    origin = np.asarray(reader.GetOrigin(), dtype=float)
    if not (np.all(np.isfinite(direction)) and np.all(np.isfinite(spacing)) and np.all(np.isfinite(origin))):
        raise _fail(path, "its origin, spacing or direction holds NaN or infinite values")
    if np.any(spacing <= 0):
        raise _fail(path, f"its voxel spacing {' x '.join(f'{v:g}' for v in spacing)} is not positive")
    if dim < 3:
        return np.eye(4)
    return itk_to_ras_affine(tuple(direction[:3, :3].ravel()), tuple(spacing[:3]), tuple(origin[:3]))


_ITK_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import SimpleITK as sitk

    suffix = file_suffix(path)
    nrrd = suffix in (".nrrd", ".nhdr")
    facts = check_nrrd(path) if nrrd else check_metaimage(path)  # before SimpleITK sees the file
    _check_shape(tuple(facts.dims), path)
    what = "NRRD" if nrrd else "MetaImage"
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_ITK_IO[suffix])  # the reader whose header was checked, never one guessed from the content
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, f"its {what} header cannot be read") from exc
    _sitk_checks(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
    _check_affine(_itk_info_affine(reader, path), path, reader.GetSize())
    try:
        img = reader.Execute()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, f"its {what} voxel data cannot be read, so the file is truncated or corrupt") from exc
    data, affine, meta = _sitk_volume(img, path)
    meta["format"] = "nrrd" if nrrd else "metaimage"
    meta["source_files"] = [path, *(f.resolve() for f in facts.data_files)]
    keys = img.GetMetaDataKeys()
    if PROVENANCE_KEY in keys:
        meta["produced_by"] = img.GetMetaData(PROVENANCE_KEY)
    meta["labels_marked"] = KIND_KEY in keys and img.GetMetaData(KIND_KEY).strip() == "labels"
    return data, affine, meta


# ------------------------------------------------------------------------------------------------ DICOM


def _check_dicom_folder(folder: Path, owner: Path) -> None:
    """Every entry GDCM would open must be a regular file (a fifo or device would block or never end)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise _fail(owner, f"its folder cannot be listed ({exc.strerror or type(exc).__name__})") from None
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            raise _fail(owner, f"the entry {entry.name} of its folder is a broken link or cannot be examined") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode) or guard.is_system_path(entry):
            raise _fail(owner, f"the entry {entry.name} of its folder is a device, pipe or socket, not a file")


def _series_files(folder: Path, owner: Path | None = None) -> list[tuple[str, list[str]]]:
    import SimpleITK as sitk

    _check_dicom_folder(folder, owner or folder)
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        # An empty series UID ("") is a valid ID: GDCM then groups the files that lack one.
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            series.append((uid, files))
    return series


def _check_dicom_header(files: list[str], path: Path) -> None:
    """Size, spacing and direction of the series' first file, and the voxel cap for the whole series."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, "its DICOM header cannot be read") from exc
    size = list(reader.GetSize())
    if len(files) > 1:
        size = [*size[:2], int(np.prod(size[2:], dtype=np.int64)) * len(files)]
    guard.check_dims(path, size, "its DICOM header")
    _itk_info_affine(reader, path)
    _check_physical(reader.GetSpacing()[:2], size[:2], path)  # in-plane; the slice spacing once stacked
    if reader.GetNumberOfComponents() > 4:
        raise _fail(path, f"its voxels are {reader.GetNumberOfComponents()}-component values, not scalar intensities")
    _check_dicom_pixel_bytes(reader, Path(files[0]), path)


#: Transfer syntaxes whose pixel data is stored as is (implicit and explicit VR little endian, big endian).
_NATIVE_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _dicom_transfer_syntax(file: Path) -> str | None:
    """The transfer syntax UID of a DICOM file's meta group (explicit VR little endian after ``DICM`` at
    byte 128), or ``None`` when it has none (then the data set is implicit VR little endian)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head) and head[pos : pos + 2] == b"\x02\x00":
        element, vr = int.from_bytes(head[pos + 2 : pos + 4], "little"), head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            start, length = pos + 12, int.from_bytes(head[pos + 8 : pos + 12], "little")
        else:
            start, length = pos + 8, int.from_bytes(head[pos + 6 : pos + 8], "little")
        if element == 0x0010:
            return head[start : start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    return None


def _check_dicom_pixel_bytes(reader, file: Path, path: Path) -> None:
    """Uncompressed pixel data cannot be larger than its file: rows, columns, frames, samples and bits
    allocated that declare more are refused (GDCM would read past the data it has)."""
    if _dicom_transfer_syntax(file) not in (None, *_NATIVE_TRANSFER_SYNTAXES):
        return  # compressed: the declared size may well exceed the file
    try:
        bits = int(str(reader.GetMetaData("0028|0100")).strip()) if reader.HasMetaDataKey("0028|0100") else 16
    except ValueError:
        raise _fail(path, "its DICOM header's bits allocated is not a number") from None
    where = "its file" if file == path else f"its file {file.name}"
    guard.check_data_size(path, list(reader.GetSize()), max(1, -(-bits // 8)), guard.regular_file_size(file, path, where),
                          "raw", where, components=reader.GetNumberOfComponents())


def _read_dicom_series(files: list[str], path: Path, uid: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import SimpleITK as sitk

    _check_dicom_header(files, path)
    try:
        if len(files) == 1:
            img = sitk.ReadImage(files[0], imageIO="GDCMImageIO")  # a multi-frame (enhanced) DICOM or one slice
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileNames(files)
            img = reader.Execute()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, "its DICOM voxel data cannot be read") from exc
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        raise _fail(path, "it is a single 2-D DICOM slice and no other slice of its series is beside it")
    data, affine, meta = _sitk_volume(img, path)
    _check_affine(affine, path, data.shape)  # a series' slice spacing is only known once its files are stacked
    meta.update(format="dicom", source_files=[Path(f) for f in files], series_uid=uid)
    return data, affine, meta


def _read_dicom_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    if not dicom_files_in(folder, limit=1):
        raise _fail(folder, "the folder holds no DICOM file")
    try:
        series = _series_files(folder)
    except VolumeReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(folder, "its DICOM files cannot be listed") from exc
    if not series:
        raise _fail(folder, "the folder holds no readable DICOM series")
    uid, files = max(series, key=lambda s: len(s[1]))
    if len(series) > 1:
        warnings.warn(
            f"{folder} holds {len(series)} DICOM series; reading the largest ({len(files)} files).", stacklevel=3
        )
    return _read_dicom_series(files, folder, uid)


def _read_dicom_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One DICOM file: the whole series it belongs to, or the file alone (multi-frame)."""
    try:
        series = _series_files(path.parent, owner=path)
    except VolumeReadError:
        raise
    except Exception:  # noqa: BLE001 - fall back to the file alone
        series = []
    target = path.resolve()
    for uid, files in series:
        if any(Path(f).resolve() == target for f in files):
            return _read_dicom_series(files, path, uid)
    return _read_dicom_series([str(path)], path, "")


# ------------------------------------------------------------------------------------------- public API


def _resolve_kind(data: np.ndarray, path: Path, kind: ReadKind, marked: bool) -> tuple[np.ndarray, str]:
    if kind not in ("auto", "image", "labels"):
        raise ValueError(f"kind must be 'auto', 'image' or 'labels', not {kind!r}.")
    if kind == "image":
        return data, "image"
    if kind == "labels" or ((marked or looks_like_labels_path(path)) and is_integral(data)):
        if not is_integral(data):
            raise _fail(path, "it holds non-integer values, so it cannot be read as labels")
        return as_label_array(data), "labels"
    return data, "image"


def read_volume(path: str | Path, kind: ReadKind = "auto") -> Volume:
    """Read one 3-D scan or mask into a :class:`Volume` (file voxel order, RAS+ mm affine).

    Formats: NIfTI ``.nii``/``.nii.gz`` and ``.hdr``/``.img`` pairs (nibabel; sform if its code > 0, else
    qform, else voxel size only with a warning; a warning also for a sheared affine), MetaImage
    ``.mha``/``.mhd`` and NRRD ``.nrrd``/``.nhdr`` (SimpleITK, LPS converted to RAS), DICOM (a folder,
    one ``.dcm`` of a series -- the whole series is read -- or one multi-frame file).

    ``kind="auto"`` returns labels when the values are whole numbers (integer dtype, or float holding
    integers) *and* either :func:`looks_like_labels_path` matches the path or the file marks itself as
    labels (NIfTI intent code NIFTI_INTENT_LABEL, or ``SpineSegDiff_Kind = labels`` in a MetaImage/NRRD
    header, as :func:`~.writers.write_volume` writes); labels come back as uint8, uint16 or int32,
    whichever fits.  ``"labels"`` forces labels (refusing non-integer values) and
    ``"image"`` keeps the stored values.

    Raises :class:`VolumeReadError` (a ``ValueError``) with one sentence naming the file and the reason
    for 2-D, 4-D or 5-D data, RGB/vector or complex voxels, unreadable or truncated files and unknown
    extensions.  Every header is checked by :mod:`.guard` before any voxel array is allocated or the file
    is handed to SimpleITK (dimensions, voxel count, declared bytes against the file, spacing, direction,
    detached data files); any other library failure, including running out of memory, is also a
    :class:`VolumeReadError`.  Voxel sizes outside 0.05-20 mm give a warning.
    """
    if kind not in ("auto", "image", "labels"):
        raise ValueError(f"kind must be 'auto', 'image' or 'labels', not {kind!r}.")
    p = Path(path)
    try:
        return _read_volume(p, kind)
    except VolumeReadError:
        raise
    except MemoryError:
        raise _fail(p, "its voxel data does not fit in the memory available") from None
    except RecursionError:
        raise _fail(p, "its header is nested too deeply to be read") from None
    except Exception as exc:  # noqa: BLE001 - a library's own failure still becomes one sentence naming the file
        raise _fail(p, "it cannot be read as a scan, so it is corrupt or not a format SpineSegDiff reads") from exc


def _read_volume(p: Path, kind: ReadKind) -> Volume:
    guard.check_input_path(p)
    if p.is_dir():
        data, affine, meta = _read_dicom_folder(p)
    else:
        suffix = file_suffix(p)
        if suffix in NIFTI_SUFFIXES:
            data, affine, meta = _read_nifti(p)
        elif suffix in ITK_SUFFIXES:
            data, affine, meta = _read_itk(p)
        elif suffix in DICOM_SUFFIXES or is_dicom_file(p):
            data, affine, meta = _read_dicom_file(p)
        else:
            raise _fail(p, f"the extension '{suffix or p.name}' is not one SpineSegDiff reads "
                        f"({', '.join(READ_SUFFIXES)} or a DICOM folder)")
    data, resolved = _resolve_kind(data, p, kind, bool(meta.pop("labels_marked", False)))
    return Volume(data, affine, kind=resolved, source=p, meta=meta)  # type: ignore[arg-type]


def _case_name(image_path: Path, labels_path: Path) -> str:
    a, b = file_stem(image_path), file_stem(labels_path)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    case = a[:n].rstrip("_-. ") or a
    return f"{image_path.parent.name}/{case}" if image_path.parent.name else case


def read_pair(
    image_path: str | Path, labels_path: str | Path, atol_mm: float = 1e-3
) -> tuple[Volume, Volume]:
    """Read a scan and its mask and check they share one grid (same shape, affines within ``atol_mm``).

    A mismatch raises :class:`PairMismatchError` naming both shapes (the data are never cropped).
    """
    image = read_volume(image_path, kind="image")
    labels = read_volume(labels_path, kind="labels")
    case = _case_name(Path(image_path), Path(labels_path))
    if image.shape != labels.shape:
        raise PairMismatchError(
            f"{case} image {_shape_text(image.shape)} vs mask {_shape_text(labels.shape)}: the mask does not "
            "have the image's shape, so the pair is refused rather than cropped."
        )
    if not np.allclose(image.affine, labels.affine, atol=atol_mm, rtol=0):
        worst = float(np.max(np.abs(image.affine - labels.affine)))
        raise PairMismatchError(
            f"{case} image and mask (both {_shape_text(image.shape)}) have affines that differ by up to "
            f"{worst:.4g} mm, so the mask does not lie on the image's grid."
        )
    return image, labels


def geometry_metadata(volume: Volume) -> dict[str, Any]:
    """Facts a napari layer carries so a writer can map its canonical array back to the source file.

    Keys: ``source``, ``source_files``, ``format``, ``file_affine``, ``file_shape``, ``file_axcodes``,
    ``canonical_affine``, ``canonical_shape``, ``canonical_axcodes``, ``kind`` and, when present,
    ``nifti_header``, ``sitk_*`` and ``produced_by``.
    """
    from .orientation import CANONICAL_AXCODES

    orient = volume.orientation
    meta: dict[str, Any] = {
        "source": str(volume.source) if volume.source is not None else None,
        "source_files": [str(f) for f in volume.meta.get("source_files", [])],
        "format": volume.meta.get("format"),
        "file_affine": volume.affine.copy(),
        "file_shape": volume.shape,
        "file_axcodes": orient.file_axcodes,
        "canonical_affine": orient.canonical_affine,
        "canonical_shape": orient.canonical_shape,
        "canonical_axcodes": CANONICAL_AXCODES,
        "kind": volume.kind,
    }
    for key in ("nifti_header", "sitk_origin", "sitk_spacing", "sitk_direction", "produced_by"):
        if key in volume.meta:
            meta[key] = volume.meta[key]
    return meta
