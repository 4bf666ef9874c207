"""Parse and check MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) text headers before
SimpleITK reads the file.

Each parser reads at most :data:`MAX_HEADER_BYTES` of header and refuses, with :class:`~.guard.VolumeReadError`
and one sentence naming the file: unknown, misspelt or repeated fields, values that are not the numbers
they should be, spacing that is not finite and positive, directions that are not finite or whose axes are
(nearly) parallel, detached voxel-data files (MetaImage ``ElementDataFile``, NRRD ``data file``) that are
not one regular file (devices such as ``/dev/zero``, fifos, list or pattern forms), and more declared
voxel data than the file's bytes can hold in their encoding (see :func:`.guard.check_data_size`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .guard import (
    MAX_DIMS,
    MIN_DIMS,
    check_data_size,
    check_dims,
    check_direction,
    fail,
    num_text,
    quote,
    regular_file_size,
)

#: Most bytes of a text header (MetaImage, NRRD).
MAX_HEADER_BYTES = 1 << 20


# ------------------------------------------------------------------------------ header lines and values


def _read_head(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise fail(path, f"it cannot be read ({exc.strerror or type(exc).__name__})") from None


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
            raise fail(path, f"its header field {field_name} holds {num_text(v)}, and it must be positive")


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
