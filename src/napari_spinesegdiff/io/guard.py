"""The checks every reader shares, run before any voxel array is allocated or a file is handed to a library.

A hostile or broken input must never crash the process, hang it or make it allocate far more memory than
the file can hold.  This module holds the refusal (:class:`VolumeReadError`, one sentence naming the file)
and the checks that do not depend on a format:

* paths: a missing file, a broken or looping link, a device, fifo or socket, a path in ``/dev``, ``/proc``
  or ``/sys`` and an unreadable file are refused by name (:func:`check_input_path`,
  :func:`regular_file_size`);
* sizes: a number of dimensions outside ``MIN_DIMS..MAX_DIMS``, a dimension that is not a positive whole
  number, more than :data:`MAX_VOXELS` voxels or :data:`MAX_DATA_BYTES` bytes of voxel data, and voxel
  data larger than what the file holds (truncated files) or than its compressed bytes can expand to
  (deflate cannot exceed :data:`DEFLATE_MAX_RATIO` to 1) (:func:`check_dims`, :func:`check_data_size`);
* geometry: a direction or affine that is not finite or whose axes are (nearly) parallel
  (:func:`check_direction`, :func:`check_affine`); voxel sizes outside ``USUAL_VOXEL_MM`` only warn.

:func:`check_signal` refuses a scan that holds no signal (every voxel the same value), for the
segmentation entry points.  The header parsers built on these checks are in :mod:`.text_headers`
(MetaImage, NRRD) and :mod:`.nifti_header` (NIfTI-1/-2, Analyze).
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import warnings
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


def num_text(value: float) -> str:
    """A number in a sentence, as short as it reads (``0.5``, ``1e+09``)."""
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
            f"{path} has voxels of {' x '.join(num_text(s) for s in sizes)} mm, outside the usual {num_text(low)}-"
            f"{num_text(high)} mm, so its header's voxel size is probably wrong.",
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
            f"Cannot segment {name}: every voxel holds the value {num_text(float(lo))}, so the scan has no signal."
        )
