"""Header checks that run before any voxel array is allocated or a file is handed to SimpleITK.

A hostile or broken header must never crash the process, hang it or make it allocate far more memory
than the file can hold.  So every reader first parses the header itself and refuses, with
:class:`VolumeReadError` and one sentence naming the file:

* a number of dimensions outside ``MIN_DIMS..MAX_DIMS``, a dimension that is not a positive whole number;
* more than :data:`MAX_VOXELS` voxels or :data:`MAX_DATA_BYTES` bytes of voxel data;
* uncompressed voxel data larger than what the file holds after its header (truncated files), and
  compressed data larger than its compressed bytes can possibly expand to (deflate cannot exceed
  :data:`DEFLATE_MAX_RATIO` to 1);
* spacing that is not finite and positive, a direction or affine that is not finite or whose axes are
  (nearly) parallel;
* detached voxel-data files (MetaImage ``ElementDataFile``, NRRD ``data file``) that are not regular files
  (devices such as ``/dev/zero``, fifos, ``/dev/stdin``), list or pattern forms of them, and unknown or
  repeated header fields.

Voxel sizes outside ``USUAL_VOXEL_MM`` only give a warning.  :func:`check_signal` refuses a scan that
holds no signal (every voxel the same value), for the segmentation entry points.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Fewest and most dimensions a header may declare (a 3-D volume, or 2-D/4-D/5-D refused by shape later).
MIN_DIMS, MAX_DIMS = 2, 5
#: Most voxels (all components) a header may declare.
MAX_VOXELS = 2**31
#: Most bytes of decoded voxel data a header may declare.
MAX_DATA_BYTES = 2**34
#: Deflate (gzip, zlib) expands at most 1032-fold; more declared data than that cannot be in the file.
DEFLATE_MAX_RATIO = 1032
#: Most bytes of a text header (MetaImage, NRRD) and of NIfTI header extensions.
MAX_HEADER_BYTES = 1 << 20
MAX_NIFTI_EXTENSION_BYTES = 64 << 20
#: Voxel sizes (mm) outside this range are read with a warning.
USUAL_VOXEL_MM = (0.05, 20.0)
#: Smallest |determinant| of the unit axis vectors: below it the axes are (nearly) parallel.
MIN_AXIS_DETERMINANT = 1e-3
#: System folders whose entries are never voxel data (devices, kernel files, process files).
SYSTEM_FOLDERS = ("/dev", "/proc", "/sys")


class VolumeReadError(ValueError):
    """A file that cannot be opened as one 3-D scalar volume; the message is one sentence naming it."""


def fail(path: str | Path, reason: str) -> VolumeReadError:
    """The refusal ``Cannot open <path>: <reason>.`` (``reason`` is one clause without a full stop)."""
    return VolumeReadError(f"Cannot open {path}: {reason.rstrip('.')}.")


def quote(text: str, limit: int = 40) -> str:
    """A header value shown inside a sentence: quoted, shortened, on one line, without a full stop and
    space that would end the sentence."""
    text = " ".join(str(text).split())
    text = text[:limit] + ("..." if len(text) > limit else "")
    return "'" + re.sub(r"\.\s+", ".", text) + "'"


def _num(value: float) -> str:
    return f"{value:g}"


def _size_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ------------------------------------------------------------------------------------- files on disk


def is_system_path(path: str | Path) -> bool:
    """True for paths in ``/dev``, ``/proc`` or ``/sys`` (given or after resolving links)."""
    candidates = [os.path.abspath(str(path))]
    try:
        candidates.append(str(Path(path).resolve()))
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL character
        pass
    return any(c == root or c.startswith(root + "/") for c in candidates for root in SYSTEM_FOLDERS)


def regular_file_size(path: Path, owner: Path, role: str) -> int:
    """Size of ``path`` after checking it is a regular file outside the system folders.

    ``owner`` is the file named in the refusal and ``role`` says what ``path`` is to it.
    """
    shown = quote(str(path), 160)
    if is_system_path(path):
        raise fail(owner, f"{role} {shown} is a system file, not a file of voxel data")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise fail(owner, f"{role} {shown} does not exist") from None
    except OSError as exc:
        raise fail(owner, f"{role} {shown} cannot be examined ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise fail(owner, f"{role} {shown} is {kind}, not a regular file")
    return int(st.st_size)


def resolved(path: str | Path) -> Path:
    """``path`` absolute with its links resolved as far as they lead; a symlink loop or a path the system
    cannot resolve (too long, a NUL character) stays as given, made absolute (``Path.resolve`` raises
    ``RuntimeError`` on a loop)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(path))


def _unreachable(path: Path, exc: BaseException) -> VolumeReadError:
    """The refusal of a path that ``os.stat`` cannot follow: missing, a broken or looping link, or other."""
    if isinstance(exc, ValueError):
        return fail(path, "its name holds a NUL character, which no file name can")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        if os.path.islink(path):
            return fail(path, "it is a symbolic link in a loop of links that never reaches a file")
        return fail(path, "its path passes through a loop of symbolic links that never reaches a file")
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            try:
                target = quote(os.readlink(path), 160)
            except OSError:
                target = "a file"
            return fail(path, f"it is a symbolic link to {target}, which does not exist")
        return fail(path, "the file does not exist")
    reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
    return fail(path, f"it cannot be examined ({reason})")


def check_input_path(path: Path) -> None:
    """The path given to a reader must be a regular file or a folder (never a device, fifo or socket) that
    can be read; a missing path, a broken or looping link and an unreadable file are refused by name."""
    if is_system_path(path):
        raise fail(path, "it is a system file, not a scan")
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise _unreachable(path, exc) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise fail(path, "it is a device, pipe or socket, not a file")
    needed = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
    if not os.access(path, needed):
        raise fail(path, f"{'the folder' if stat.S_ISDIR(st.st_mode) else 'the file'} is not readable "
                         "(permission denied)")


def _read_head(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise fail(path, f"it cannot be read ({exc.strerror or type(exc).__name__})") from None


# ------------------------------------------------------------------------------------- shared checks


def check_dims(path: Path, dims: list[int] | tuple[int, ...], what: str = "its header") -> None:
    """Number of dimensions in range, every dimension positive, voxel count under :data:`MAX_VOXELS`."""
    if not MIN_DIMS <= len(dims) <= MAX_DIMS:
        raise fail(path, f"{what} declares {len(dims)} dimensions, and a scan has {MIN_DIMS} to {MAX_DIMS}")
    bad = [int(d) for d in dims if int(d) < 1]
    if bad:
        raise fail(path, f"{what} declares a dimension of size {bad[0]}, and every size must be at least 1")
    total = math.prod(int(d) for d in dims)
    if total > MAX_VOXELS:
        raise fail(path, f"{what} declares {_size_text(dims)} = {total:,} voxels, more than the "
                         f"{MAX_VOXELS:,} SpineSegDiff reads")


def check_data_size(
    path: Path,
    dims,
    itemsize: int,
    available: int,
    encoding: str,
    where: str = "the file",
    components: int = 1,
) -> None:
    """Declared voxel bytes against what ``available`` bytes of ``encoding`` data can hold.

    ``encoding``: ``raw`` (bytes as stored), ``deflate`` (gzip/zlib), ``ascii`` (numbers as text, at least
    two characters each) or ``hex`` (two characters per byte).
    """
    voxels = math.prod(int(d) for d in dims) * max(int(components), 1)
    declared = voxels * int(itemsize)
    shape = _size_text(dims)
    if declared > MAX_DATA_BYTES:
        raise fail(path, f"its header declares {shape} voxels of {itemsize} bytes ({declared:,} bytes), more "
                         f"than the {MAX_DATA_BYTES:,} bytes SpineSegDiff reads")
    available = max(int(available), 0)
    if encoding == "raw":
        capacity, unit = available, "bytes"
    elif encoding == "deflate":
        capacity, unit = available * DEFLATE_MAX_RATIO + 1024, "compressed bytes"
    elif encoding == "ascii":
        capacity, unit = (available + 1) // 2 * int(itemsize), "bytes of text"
    elif encoding == "hex":
        capacity, unit = available // 2, "bytes of hexadecimal text"
    else:  # pragma: no cover - callers pass one of the four
        raise ValueError(f"unknown encoding {encoding!r}")
    if declared > capacity:
        if encoding == "raw":
            raise fail(path, f"its header declares {shape} voxels ({declared:,} bytes) but {where} holds only "
                             f"{available:,} bytes of voxel data, so it is truncated or its header is wrong")
        raise fail(path, f"its header declares {shape} voxels ({declared:,} bytes) but {where} holds only "
                         f"{available:,} {unit}, which cannot decode to that much")


def _unit_det(matrix: np.ndarray) -> float:
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        return 0.0
    return float(abs(np.linalg.det(matrix / norms)))


def check_direction(path: Path, matrix, what: str = "its direction matrix") -> None:
    """A square direction matrix (columns = axes) must be finite with independent, non-zero columns."""
    m = np.asarray(matrix, dtype=float)
    if not np.all(np.isfinite(m)):
        raise fail(path, f"{what} holds NaN or infinite values")
    if np.any(np.linalg.norm(m, axis=0) == 0):
        raise fail(path, f"{what} has an axis of length zero")
    if _unit_det(m) < MIN_AXIS_DETERMINANT:
        raise fail(path, f"{what} has (nearly) parallel axes, so it does not define a 3-D grid")


def check_affine(affine: np.ndarray, path: Path) -> None:
    """A RAS voxel-to-world affine must be finite, with non-zero, independent axes that map to R, A, S.

    Voxel sizes outside :data:`USUAL_VOXEL_MM` give a warning.
    """
    from nibabel import orientations as nio

    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise fail(path, "its affine holds NaN or infinite values")
    sizes = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(sizes == 0):
        raise fail(path, "its affine has a zero voxel size")
    if _unit_det(aff[:3, :3]) < MIN_AXIS_DETERMINANT:
        raise fail(path, "its affine has (nearly) parallel axes, so it does not define a 3-D grid")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise fail(path, "its affine has a voxel volume of (nearly) zero")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ornt = nio.io_orientation(aff)
    except Exception:  # noqa: BLE001 - any failure here means the axes cannot be told apart
        ornt = np.full((3, 2), np.nan)
    if not np.all(np.isfinite(ornt)) or len({int(a) for a in ornt[:, 0]}) != 3:
        raise fail(path, "its affine does not give each voxel axis its own world direction")
    low, high = USUAL_VOXEL_MM
    if np.any(sizes < low) or np.any(sizes > high):
        warnings.warn(
            f"{path} has voxels of {' x '.join(_num(s) for s in sizes)} mm, outside the usual {_num(low)}-"
            f"{_num(high)} mm, so its header's voxel size is probably wrong.",
            stacklevel=3,
        )


def check_signal(volume: Any) -> None:
    """Refuse a scan with no signal (no finite voxel, or every voxel the same value) in one sentence."""
    data = np.asarray(volume.data)
    name = getattr(volume, "source", None) or "the scan"
    if data.size == 0:
        raise VolumeReadError(f"Cannot segment {name}: it holds no voxels.")
    if data.dtype.kind in "fc":
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            lo, hi = np.nanmin(data), np.nanmax(data)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            if not np.any(np.isfinite(data)):
                raise VolumeReadError(f"Cannot segment {name}: none of its voxels holds a finite value.")
            finite = data[np.isfinite(data)]
            lo, hi = finite.min(), finite.max()
    else:
        lo, hi = data.min(), data.max()
    if lo == hi:
        raise VolumeReadError(
            f"Cannot segment {name}: every voxel holds the value {_num(float(lo))}, so the scan has no signal."
        )


# --------------------------------------------------------------------------------------- text values


_INT = re.compile(r"[+-]?\d+\Z")


def _parse_int(path: Path, field_name: str, text: str) -> int:
    text = text.strip()
    if not _INT.match(text) or len(text) > 20:
        raise fail(path, f"its header field {field_name} should be a whole number, not {quote(text)}")
    return int(text)


def _parse_float(path: Path, field_name: str, text: str, allow_nan: bool = False) -> float:
    text = text.strip()
    try:
        value = float(text) if len(text) <= 64 else float("nan")
    except ValueError:
        raise fail(path, f"its header field {field_name} holds {quote(text)}, which is not a number") from None
    if math.isnan(value) and allow_nan and text.lower() == "nan":
        return value
    if not math.isfinite(value):
        raise fail(path, f"its header field {field_name} holds {quote(text)}, which is not a finite number")
    return value


def _numbers(path: Path, field_name: str, text: str, count: int, kind: str = "float") -> list:
    parts = text.split()
    if len(parts) != count:
        raise fail(path, f"its header field {field_name} has {len(parts)} values where {count} are needed")
    parse = _parse_int if kind == "int" else _parse_float
    return [parse(path, field_name, p) for p in parts]


def _positive(path: Path, field_name: str, values) -> None:
    for v in values:
        if not v > 0:
            raise fail(path, f"its header field {field_name} holds {_num(v)}, and it must be positive")


def _header_lines(path: Path, head: bytes, stop, comment: str | None = None):
    """Yield ``(number, text, end_offset)`` of header lines (ASCII, no control characters) until ``stop``."""
    pos = 0
    number = 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        end = len(head) if nl < 0 else nl + 1
        raw = head[pos : end].rstrip(b"\r\n")
        number += 1
        if nl < 0 and len(head) > MAX_HEADER_BYTES:
            raise fail(path, f"its header is longer than {MAX_HEADER_BYTES:,} bytes")
        if any(b < 32 and b != 9 for b in raw) or any(b > 126 for b in raw):
            raise fail(path, f"line {number} of its header holds binary or non-ASCII characters")
        text = raw.decode("ascii")
        yield number, text, end
        if stop(text):
            return
        pos = end


def _data_file(path: Path, name: str, form: str) -> Path:
    """The detached data file a header names, refused unless it is one plain file name."""
    if name.upper() in ("LOCAL", "LIST") and name not in ("LOCAL", "LIST"):
        raise fail(path, f"its {form} {quote(name)} must be written in capitals")
    if name.upper().startswith("LIST"):
        raise fail(path, f"its {form} is a list of files, and SpineSegDiff reads one data file only")
    if not name or any(ch.isspace() for ch in name):
        raise fail(path, f"its {form} {quote(name)} is a file pattern or empty, and SpineSegDiff reads one named "
                         "data file only")
    target = Path(name)
    return target if target.is_absolute() else path.parent / target


# -------------------------------------------------------------------------------------------- MetaImage

_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
_MET_BOOLS = ("BinaryData", "CompressedData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB")
_MET_GEOMETRY = {  # synonyms read by MetaIO; all present ones must agree
    "origin": ("Offset", "Position", "Origin"),
    "direction": ("TransformMatrix", "Rotation", "Orientation"),
    "spacing": ("ElementSpacing", "ElementSize"),
}
_MET_STRINGS = ("ObjectType", "ObjectSubType", "TransformType", "Name", "Comment", "Modality",
                "AcquisitionDate", "AnatomicalOrientation", "ElementType", "DistanceUnits")
_MET_KNOWN = {
    "NDims", "DimSize", "ElementType", "ElementNumberOfChannels", "ElementDataFile", "HeaderSize",
    "HeaderSizePerSlice", "CompressedDataSize", "CenterOfRotation", "ID", "ParentID", "Color", "ElementMin",
    "ElementMax", "SequenceID", *_MET_BOOLS, *_MET_STRINGS,
    *(name for group in _MET_GEOMETRY.values() for name in group),
}
_MET_KNOWN_LOWER = {k.lower(): k for k in _MET_KNOWN}
_MET_KEY = re.compile(r"[A-Za-z0-9_|.()\[\]-]{1,128}\Z")


@dataclass
class HeaderFacts:
    """What a text header declares, checked: sizes, detached data files and the data's layout."""

    dims: list[int]
    data_files: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def check_metaimage(path: Path) -> HeaderFacts:
    """Parse and check a MetaImage header (``.mha`` or ``.mhd``) before SimpleITK reads it."""
    file_size = regular_file_size(path, path, "the file")
    head = _read_head(path, MAX_HEADER_BYTES + 1)
    fields: dict[str, str] = {}
    order: list[str] = []
    header_end = None
    for number, text, end in _header_lines(path, head, stop=lambda t: t.split("=")[0].split(":")[0].strip()
                                          == "ElementDataFile"):
        if not text.strip():
            continue
        cut = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=-1)
        if cut < 0:
            raise fail(path, f"line {number} of its header is not of the form 'Field = value'")
        key, value = text[:cut].strip(), text[cut + 1 :].strip()
        if not _MET_KEY.match(key):
            raise fail(path, f"line {number} of its header has an invalid field name {quote(key)}")
        canonical = _MET_KNOWN_LOWER.get(key.lower())
        if canonical is not None and canonical != key:
            raise fail(path, f"its header spells the field {canonical} as {quote(key)}, and MetaImage field names are "
                             "case-sensitive")
        if canonical is not None:
            if key in fields:
                raise fail(path, f"its header declares the field {key} twice")
            if key in _MET_STRINGS and len(value) > 200:
                raise fail(path, f"its header field {key} is longer than 200 characters")
            fields[key] = value
            order.append(key)
        if key == "ElementDataFile":
            header_end = end
            break
    if header_end is None:
        if len(head) > MAX_HEADER_BYTES:
            raise fail(path, f"its header is longer than {MAX_HEADER_BYTES:,} bytes")
        raise fail(path, "its header has no ElementDataFile field, so it is not a complete MetaImage header")

    if "ObjectType" in fields and fields["ObjectType"].lower() != "image":
        raise fail(path, f"it holds a MetaImage object of type {quote(fields['ObjectType'])}, not an Image")
    if "NDims" not in fields:
        raise fail(path, "its header has no NDims field")
    ndims = _parse_int(path, "NDims", fields["NDims"])
    if not MIN_DIMS <= ndims <= MAX_DIMS:
        raise fail(path, f"its header declares NDims = {ndims}, and a scan has {MIN_DIMS} to {MAX_DIMS} dimensions")
    first = order.index("NDims")
    early = [k for k in order[:first] if k in ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Position",
                                               "Origin", "TransformMatrix", "Rotation", "Orientation",
                                               "CenterOfRotation", "AnatomicalOrientation")]
    if early:
        raise fail(path, f"its header declares {early[0]} before NDims")
    if "DimSize" not in fields:
        raise fail(path, "its header has no DimSize field")
    dims = _numbers(path, "DimSize", fields["DimSize"], ndims, "int")
    check_dims(path, dims, "its DimSize")

    element_type = fields.get("ElementType")
    if element_type is None:
        raise fail(path, "its header has no ElementType field")
    if element_type.endswith("_ARRAY") and element_type[: -len("_ARRAY")] in _MET_SIZES:
        raise fail(path, f"its voxels are {element_type} vectors, not scalar intensities")
    if element_type not in _MET_SIZES:
        raise fail(path, f"its ElementType {quote(element_type)} is not a scalar MetaImage type")
    itemsize = _MET_SIZES[element_type]
    channels = 1
    if "ElementNumberOfChannels" in fields:
        channels = _parse_int(path, "ElementNumberOfChannels", fields["ElementNumberOfChannels"])
        if channels < 1:
            raise fail(path, f"its header declares {channels} channels per voxel")
        if channels > 1:
            raise fail(path, f"its voxels are {channels}-component RGB/vector values, not scalar intensities")

    flags = {}
    for key in _MET_BOOLS:
        if key in fields:
            word = fields[key].lower()
            if word not in ("true", "false"):
                raise fail(path, f"its header field {key} is {quote(fields[key])}, not True or False")
            flags[key] = word == "true"
    geometry: dict[str, list[float]] = {}
    for role, names in _MET_GEOMETRY.items():
        count = ndims * ndims if role == "direction" else ndims
        values = None
        for name in names:
            if name in fields:
                these = _numbers(path, name, fields[name], count)
                if values is not None and these != values:
                    raise fail(path, f"its header declares {' and '.join(n for n in names if n in fields)} "
                                     "with different values")
                values = these
                if role == "spacing":
                    _positive(path, name, these)
        if values is not None:
            geometry[role] = values
    if "direction" in geometry:  # MetaIO stores the matrix row by row; ITK takes its columns as axes
        check_direction(path, np.asarray(geometry["direction"]).reshape(ndims, ndims).T,
                        "its TransformMatrix")
    if "CenterOfRotation" in fields:
        _numbers(path, "CenterOfRotation", fields["CenterOfRotation"], ndims)
    for key in ("ElementMin", "ElementMax"):
        if key in fields:
            _parse_float(path, key, fields[key])
    for key in ("ID", "ParentID"):
        if key in fields:
            _parse_int(path, key, fields[key])
    if "Color" in fields:
        _numbers(path, "Color", fields["Color"], 4)
    if "SequenceID" in fields:
        _numbers(path, "SequenceID", fields["SequenceID"], ndims)
    if "AnatomicalOrientation" in fields:
        code = fields["AnatomicalOrientation"]
        if not 0 < len(code) <= MAX_DIMS or any(ch not in "RLAPSI?" for ch in code.upper()):
            raise fail(path, f"its AnatomicalOrientation {quote(code)} is not up to {MAX_DIMS} of the letters R, L, "
                             "A, P, S, I or ?")
    if "HeaderSizePerSlice" in fields and _parse_int(path, "HeaderSizePerSlice", fields["HeaderSizePerSlice"]):
        raise fail(path, "its voxel data has a header per slice, which SpineSegDiff does not read")

    header_size = 0
    if "HeaderSize" in fields:
        header_size = _parse_int(path, "HeaderSize", fields["HeaderSize"])
        if header_size < -1:
            raise fail(path, f"its HeaderSize is {header_size}, and it must be -1 or more")
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        data_path, start, size, where, data_files = path, header_end, file_size, "the file", []
    else:
        data_path = _data_file(path, name, "ElementDataFile")
        size = regular_file_size(data_path, path, "its data file")
        start, where, data_files = 0, f"its data file {data_path.name}", [data_path]
    available = size - start
    if header_size > 0:
        available -= header_size
        if available < 0:
            raise fail(path, f"its HeaderSize of {header_size:,} bytes goes past the end of {where}")
    compressed = flags.get("CompressedData", False)
    binary = flags.get("BinaryData", True)
    if compressed:
        if not binary:
            raise fail(path, "its header declares compressed text data, which MetaImage does not have")
        if "CompressedDataSize" in fields:
            csize = _parse_int(path, "CompressedDataSize", fields["CompressedDataSize"])
            if csize < 0 or csize > available:
                raise fail(path, f"its CompressedDataSize of {csize:,} bytes does not fit in the {available:,} "
                                 f"bytes of {where} after the header")
            available = csize if csize > 0 else available
        check_data_size(path, dims, itemsize, available, "deflate", where, channels)
    else:
        check_data_size(path, dims, itemsize, available, "raw" if binary else "ascii", where, channels)
    return HeaderFacts(dims=dims, data_files=data_files, extra={"geometry": geometry})


# ------------------------------------------------------------------------------------------------- NRRD

_NRRD_TYPES: dict[str, int] = {}
for _size, _names in {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
        "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
        "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}.items():
    _NRRD_TYPES.update(dict.fromkeys(_names, _size))
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "ascii": "ascii", "text": "ascii",
                   "txt": "ascii", "hex": "hex"}
_NRRD_ALIASES = {"datafile": "data file", "lineskip": "line skip", "byteskip": "byte skip",
                 "blocksize": "block size", "oldmin": "old min", "oldmax": "old max", "axismins": "axis mins",
                 "axismaxs": "axis maxs", "centerings": "centers", "sampleunits": "sample units"}
_NRRD_PER_AXIS = ("sizes", "spacings", "thicknesses", "axis mins", "axis maxs", "centers", "kinds", "labels",
                  "units", "space directions")
_NRRD_FIELDS = {"dimension", "type", "block size", "encoding", "endian", "content", "min", "max", "old min",
                "old max", "data file", "line skip", "byte skip", "number", "sample units", "space",
                "space dimension", "space units", "space origin", "measurement frame", *_NRRD_PER_AXIS}
_NRRD_SPACES = {
    "right-anterior-superior": 3, "ras": 3, "left-anterior-superior": 3, "las": 3,
    "left-posterior-superior": 3, "lps": 3, "scanner-xyz": 3, "3d-right-handed": 3, "3d-left-handed": 3,
}
_NRRD_KINDS = {"domain", "space", "time", "list", "point", "vector", "covariant-vector", "normal", "stub",
               "scalar", "complex", "2-vector", "3-color", "rgb-color", "hsv-color", "xyz-color", "4-color",
               "rgba-color", "3-vector", "3-gradient", "3-normal", "4-vector", "2d-symmetric-matrix",
               "2d-masked-symmetric-matrix", "2d-matrix", "2d-masked-matrix", "3d-symmetric-matrix",
               "3d-masked-symmetric-matrix", "3d-matrix", "3d-masked-matrix", "???", "none"}
_NRRD_VECTOR = re.compile(r"\(([^()]*)\)\Z")


def _nrrd_vector(path: Path, field_name: str, text: str, count: int) -> list[float]:
    m = _NRRD_VECTOR.match(text.strip())
    if not m:
        raise fail(path, f"its header field {field_name} holds {quote(text)}, which is not a vector like (1,0,0)")
    parts = m.group(1).split(",")
    if len(parts) != count:
        raise fail(path, f"its header field {field_name} has a vector of {len(parts)} values where {count} are "
                         "needed")
    return [_parse_float(path, field_name, p) for p in parts]


def check_nrrd(path: Path) -> HeaderFacts:
    """Parse and check a NRRD header (``.nrrd`` or ``.nhdr``) before SimpleITK reads it."""
    file_size = regular_file_size(path, path, "the file")
    head = _read_head(path, MAX_HEADER_BYTES + 1)
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if not re.fullmatch(rb"NRRD000[1-5]", first):
        raise fail(path, "it does not start with a NRRD magic line such as NRRD0004")
    fields: dict[str, str] = {}
    header_end = None
    for number, text, end in _header_lines(path, head, stop=lambda t: t == ""):
        if number == 1:
            continue
        if text == "":
            header_end = end
            break
        if text.startswith("#"):
            continue
        kv, fs = text.find(":="), text.find(": ")
        if kv >= 0 and (fs < 0 or kv < fs):
            if kv == 0:
                raise fail(path, f"line {number} of its header has an empty key")
            continue  # key/value metadata, kept as text by ITK
        if fs <= 0:
            raise fail(path, f"line {number} of its header is not of the form 'field: value'")
        key = text[:fs].lower()
        key = _NRRD_ALIASES.get(key, key)
        if key not in _NRRD_FIELDS:
            raise fail(path, f"line {number} of its header has the unknown field {quote(text[:fs])}")
        if key in fields:
            raise fail(path, f"its header declares the field {quote(key)} twice")
        if key in _NRRD_PER_AXIS and "dimension" not in fields:
            raise fail(path, f"its header declares {quote(key)} before 'dimension'")
        fields[key] = text[fs + 2 :]
        if key == "data file":
            _data_file(path, fields[key].strip(), "data file")  # a list of files follows LIST: refused here
    if header_end is None:
        if len(head) > MAX_HEADER_BYTES:
            raise fail(path, f"its header is longer than {MAX_HEADER_BYTES:,} bytes")
        header_end = len(head)
        if "data file" not in fields:
            raise fail(path, "its header does not end with a blank line before the voxel data")
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise fail(path, f"its header has no '{required}' field")

    ndims = _parse_int(path, "dimension", fields["dimension"])
    if not MIN_DIMS <= ndims <= MAX_DIMS:
        raise fail(path, f"its header declares dimension {ndims}, and a scan has {MIN_DIMS} to {MAX_DIMS} "
                         "dimensions")
    dims = _numbers(path, "sizes", fields["sizes"], ndims, "int")
    check_dims(path, dims, "its sizes")
    type_name = " ".join(fields["type"].split()).lower()
    if type_name == "block":
        raise fail(path, "its voxels are opaque blocks, not scalar intensities")
    if type_name not in _NRRD_TYPES:
        raise fail(path, f"its type {quote(fields['type'])} is not a NRRD scalar type")
    itemsize = _NRRD_TYPES[type_name]
    encoding_name = fields["encoding"].strip().lower()
    if encoding_name in ("bzip2", "bz2"):
        raise fail(path, "its voxel data is bzip2-compressed, and SpineSegDiff reads raw, gzip, ascii or hex "
                         "NRRD data")
    if encoding_name not in _NRRD_ENCODINGS:
        raise fail(path, f"its encoding {quote(fields['encoding'])} is not one NRRD defines")
    encoding = _NRRD_ENCODINGS[encoding_name]
    if "endian" in fields:
        if fields["endian"].strip().lower() not in ("little", "big"):
            raise fail(path, f"its endian field is {quote(fields['endian'])}, not little or big")
    elif itemsize > 1 and encoding in ("raw", "deflate"):
        raise fail(path, "its header lacks the endian field its multi-byte voxels need")

    if "kinds" in fields:
        kinds = fields["kinds"].split()
        if len(kinds) != ndims or any(k.lower() not in _NRRD_KINDS for k in kinds):
            raise fail(path, f"its kinds field {quote(fields['kinds'])} does not give one known kind per axis")
    if "spacings" in fields:
        spacings = [_parse_float(path, "spacings", p, allow_nan=True) for p in fields["spacings"].split()]
        if len(spacings) != ndims:
            raise fail(path, f"its header field spacings has {len(spacings)} values where {ndims} are needed")
        _positive(path, "spacings", [s for s in spacings if not math.isnan(s)])
        if "space directions" in fields:
            raise fail(path, "its header declares both spacings and space directions")
    for key in ("thicknesses", "axis mins", "axis maxs"):
        if key in fields:
            values = fields[key].split()
            if len(values) != ndims:
                raise fail(path, f"its header field {key} has {len(values)} values where {ndims} are needed")
            for v in values:
                _parse_float(path, key, v, allow_nan=True)
    space_dim = None
    if "space" in fields:
        space = fields["space"].strip().lower()
        if space not in _NRRD_SPACES:
            raise fail(path, f"its space {quote(fields['space'])} is not a 3-D patient or scanner space")
        space_dim = _NRRD_SPACES[space]
        if "space dimension" in fields:
            raise fail(path, "its header declares both space and space dimension")
    elif "space dimension" in fields:
        space_dim = _parse_int(path, "space dimension", fields["space dimension"])
        if space_dim not in (2, 3):
            raise fail(path, f"its space dimension is {space_dim}, and SpineSegDiff reads 2-D or 3-D spaces")
    for key in ("space directions", "space origin", "measurement frame", "space units"):
        if key in fields and space_dim is None:
            raise fail(path, f"its header declares {quote(key)} without a space")
    if "space directions" in fields:
        tokens = fields["space directions"].split()
        if len(tokens) != ndims:
            raise fail(path, f"its space directions give {len(tokens)} entries for {ndims} axes")
        vectors = [_nrrd_vector(path, "space directions", t, space_dim) for t in tokens if t.lower() != "none"]
        if len(vectors) != space_dim:
            raise fail(path, f"its space directions give {len(vectors)} spatial axes in a {space_dim}-D space")
        check_direction(path, np.asarray(vectors, dtype=float).T, "its space directions")
    if "space origin" in fields:
        _nrrd_vector(path, "space origin", fields["space origin"], space_dim)
    if "measurement frame" in fields:
        frame = fields["measurement frame"].split()
        if len(frame) != space_dim:
            raise fail(path, f"its measurement frame has {len(frame)} vectors in a {space_dim}-D space")
        for t in frame:
            _nrrd_vector(path, "measurement frame", t, space_dim)
    for key in ("min", "max", "old min", "old max"):
        if key in fields:
            _parse_float(path, key, fields[key], allow_nan=True)

    line_skip = _parse_int(path, "line skip", fields["line skip"]) if "line skip" in fields else 0
    byte_skip = _parse_int(path, "byte skip", fields["byte skip"]) if "byte skip" in fields else 0
    if line_skip < 0:
        raise fail(path, f"its line skip is {line_skip}, and it must be 0 or more")
    if byte_skip < -1:
        raise fail(path, f"its byte skip is {byte_skip}, and it must be -1 or more")
    if byte_skip == -1 and encoding != "raw":
        raise fail(path, "its byte skip of -1 is only allowed for raw data")
    if "data file" in fields:
        data_path = _data_file(path, fields["data file"].strip(), "data file")
        size = regular_file_size(data_path, path, "its data file")
        available, where, data_files = size, f"its data file {data_path.name}", [data_path]
    else:
        available, where, data_files = file_size - header_end, "the file", []
    available -= line_skip
    if byte_skip > 0:
        available -= byte_skip
    if available < 0:
        raise fail(path, f"its line skip and byte skip go past the end of {where}")
    check_data_size(path, dims, itemsize, available, encoding, where)
    return HeaderFacts(dims=dims, data_files=data_files)


# ------------------------------------------------------------------------------------------------ NIfTI

#: NIfTI datatype code -> bytes per voxel (complex and RGB are refused later by name).
NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                  1536: 16, 1792: 16, 2048: 32, 2304: 4}


@dataclass
class NiftiFacts:
    dims: list[int]
    version: int  # 1 (NIfTI-1 or Analyze) or 2
    data_file: Path


def _nifti_pair(path: Path) -> tuple[Path, Path]:
    suffix = path.suffix
    swap = {".hdr": ".img", ".img": ".hdr", ".HDR": ".IMG", ".IMG": ".HDR"}
    other = path.with_suffix(swap.get(suffix, ".img" if suffix.lower() == ".hdr" else ".hdr"))
    return (path, other) if suffix.lower() == ".hdr" else (other, path)


def check_nifti(path: Path) -> NiftiFacts:
    """Parse and check a NIfTI-1/NIfTI-2/Analyze header (and its extensions) before nibabel loads it."""
    lower = path.name.lower()
    compressed = lower.endswith(".gz")
    pair = lower.endswith((".hdr", ".img"))
    if pair:
        hdr_path, img_path = _nifti_pair(path)
        if not hdr_path.exists():
            raise fail(path, f"its header half {hdr_path.name} is missing")
        if not img_path.exists():
            raise fail(path, f"its image half {img_path.name} is missing")
        hdr_size = regular_file_size(hdr_path, path, "its header file")
        data_size = regular_file_size(img_path, path, "its image file")
    else:
        hdr_path = img_path = path
        hdr_size = data_size = regular_file_size(path, path, "the file")

    def read_header_bytes(limit: int) -> bytes:
        try:
            if compressed:
                with gzip.open(hdr_path, "rb") as fh:
                    return fh.read(limit)
            with open(hdr_path, "rb") as fh:
                return fh.read(limit)
        except (OSError, EOFError, zlib.error) as exc:
            what = "a valid gzip file" if compressed else "readable"
            raise fail(path, f"it is not {what} ({type(exc).__name__})") from None

    raw = read_header_bytes(544)
    if len(raw) < 348:
        raise fail(path, f"it holds {len(raw)} header bytes, fewer than the 348 of a NIfTI or Analyze header")
    version, endian = _nifti_version(raw)
    if version == 0:
        raise fail(path, "it is not a NIfTI or Analyze file (its header size field is neither 348 nor 540)")
    if not endian:
        raise fail(path, "its header size and its number of dimensions disagree on the byte order")
    if version == 2 and len(raw) < 540:
        raise fail(path, f"it holds {len(raw)} header bytes, fewer than the 540 of a NIfTI-2 header")
    if version == 1:
        dim = struct.unpack_from(endian + "8h", raw, 40)
        datatype = struct.unpack_from(endian + "h", raw, 70)[0]
        vox_offset = struct.unpack_from(endian + "f", raw, 108)[0]
        magic = raw[344:348]
        header_bytes = 348
    else:
        datatype = struct.unpack_from(endian + "h", raw, 12)[0]
        dim = struct.unpack_from(endian + "8q", raw, 16)
        vox_offset = struct.unpack_from(endian + "q", raw, 168)[0]
        magic = raw[4:8]
        header_bytes = 540
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        raise fail(path, f"its header declares {ndim} dimensions, and NIfTI allows 1 to 7")
    shape = [int(d) for d in dim[1 : ndim + 1]]
    while len(shape) > MAX_DIMS and shape[-1] == 1:
        shape.pop()
    if len(shape) < MIN_DIMS:
        shape += [1] * (MIN_DIMS - len(shape))
    check_dims(path, shape)
    if datatype not in NIFTI_ITEMSIZE:
        raise fail(path, f"its header declares the unknown voxel type code {datatype}")
    itemsize = NIFTI_ITEMSIZE[datatype]
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise fail(path, f"its voxel data offset {_num(vox_offset)} is not a position in the file")
    vox_offset = int(vox_offset)
    single = not pair and magic[:3] in (b"n+1", b"n+2")
    if single and vox_offset > MAX_NIFTI_EXTENSION_BYTES:
        raise fail(path, f"its voxel data offset of {vox_offset:,} bytes leaves more room for header extensions "
                         f"than the {MAX_NIFTI_EXTENSION_BYTES:,} bytes SpineSegDiff reads")
    # Header extensions: nibabel reads each one whole, so their sizes must fit where they are stored.
    ext_flag = raw[header_bytes : header_bytes + 1]
    if ext_flag not in (b"", b"\x00"):
        if single:
            region = vox_offset - (header_bytes + 4)
        else:
            region = hdr_size - (header_bytes + 4) if not compressed else MAX_NIFTI_EXTENSION_BYTES
        region = min(region, MAX_NIFTI_EXTENSION_BYTES)
        if region >= 8:
            ext = read_header_bytes(header_bytes + 4 + region + 1)[header_bytes + 4 :]
            _check_nifti_extensions(path, ext[:region], endian, bounded=single)
    if compressed:
        limit = hdr_size * DEFLATE_MAX_RATIO + 1024
        if vox_offset > limit:
            raise fail(path, f"its voxel data offset of {vox_offset:,} bytes lies beyond what its {hdr_size:,} "
                             "compressed bytes can decode to")
        check_data_size(path, shape, itemsize, max(hdr_size - 16, 0) if not pair else data_size, "deflate")
    else:
        if vox_offset > data_size:
            raise fail(path, f"its voxel data offset of {vox_offset:,} bytes lies beyond the end of the "
                             f"{data_size:,}-byte {'image file' if pair else 'file'}")
        where = f"its image file {img_path.name}" if pair else "the file"
        check_data_size(path, shape, itemsize, data_size - vox_offset, "raw", where)
    return NiftiFacts(dims=shape, version=version, data_file=img_path)


def _nifti_version(raw: bytes) -> tuple[int, str]:
    """``(1 or 2, byte order)`` as nibabel decides it: the byte order in which dim[0] is 1..7 (native,
    little-endian here, otherwise swapped; the header size breaks a tie at 0); ``(0, '')`` when the header
    size is neither 348 nor 540, ``(version, '')`` when the header size and dim[0] disagree."""
    for version, size, dim_fmt, dim_at in ((1, 348, "h", 40), (2, 540, "q", 16)):
        if size not in (struct.unpack_from("<i", raw, 0)[0], struct.unpack_from(">i", raw, 0)[0]):
            continue
        dim0 = struct.unpack_from("<" + dim_fmt, raw, dim_at)[0]
        if dim0 == 0:
            endian = "<" if struct.unpack_from("<i", raw, 0)[0] == size else ">"
        else:
            endian = "<" if 1 <= dim0 <= 7 else ">"
        return (version, endian) if struct.unpack_from(endian + "i", raw, 0)[0] == size else (version, "")
    return 0, ""


def _check_nifti_extensions(path: Path, data: bytes, endian: str, bounded: bool) -> None:
    """Walk the extension chain: every size must be at least 8 bytes and fit in the room left."""
    pos, room = 0, len(data)
    while room >= 16 or (not bounded and room >= 8):
        if len(data) - pos < 8:
            raise fail(path, "its header extensions end in the middle of an extension header")
        esize = struct.unpack_from(endian + "i", data, pos)[0]
        if esize < 8 or esize > room:
            raise fail(path, f"its header extension of declared size {esize:,} bytes does not fit in the "
                             f"{room:,} bytes left for extensions")
        pos += esize
        room -= esize
