"""Parse and check a NIfTI-1, NIfTI-2 or Analyze header (single file, ``.hdr``/``.img`` pair, gzip) and
its extensions before nibabel loads it.

Refused with :class:`~.guard.VolumeReadError` and one sentence naming the file: a header size that is
neither 348 nor 540, a byte order the header contradicts, dimensions outside what a scan has, an unknown
voxel type, a voxel offset outside the file, an extension chain whose sizes do not fit (nibabel reads each
extension whole) and more declared voxel data than the file can hold.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .guard import (
    DEFLATE_MAX_RATIO,
    MAX_DIMS,
    MIN_DIMS,
    check_data_size,
    check_dims,
    fail,
    num_text,
    regular_file_size,
)

#: Most bytes of NIfTI header extensions read.
MAX_NIFTI_EXTENSION_BYTES = 64 << 20

#: NIfTI datatype code -> bytes per voxel (complex and RGB are refused later by name).
NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                  1536: 16, 1792: 16, 2048: 32, 2304: 4}


@dataclass
class NiftiFacts:
    """What a NIfTI or Analyze header declares, checked: the shape, the version and the file holding the voxels."""

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
        raise fail(path, f"its voxel data offset {num_text(vox_offset)} is not a position in the file")
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
