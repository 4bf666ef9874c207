"""The reader cases of ``benchmarks/fuzz.py``: seeded hostile files and the named crash classes.

A :class:`Case` is the files (bytes, links, fifos, folders) to lay out in a folder of its own and the one
to open.  :func:`make_case` draws one from a seed and an index, reproducibly, from the families in
:data:`GENERATORS`: NIfTI-1 (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs, big-endian) and NIfTI-2
headers with mutated fields, MetaImage (``.mha``, ``.mhd`` + raw/zraw) and NRRD (``.nrrd``, ``.nhdr``)
headers with mutated, repeated or missing fields and cut or padded bodies, data-file traps (``/dev/zero``,
``/dev/stdin``, fifos, links, lists, patterns), junk bytes under a scan's name, targets that are devices,
fifos or folders, and DICOM series with mutated tags (``fuzz_dicom.py``).  :func:`explicit_cases` gives
one named case per crash class the hostile tester found, each with the phrase its refusal must contain.
"""

from __future__ import annotations

import gzip
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------------------ case model


@dataclass
class Case:
    """One fuzz case: files to write into its folder and the file to open."""

    name: str
    target: str
    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # name -> symlink target
    fifos: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    note: str = ""
    expect: str | None = None  # for explicit cases: a phrase the refusal must contain


def _gz(data: bytes) -> bytes:
    """gzip with a fixed time stamp, so a seed always gives the same bytes."""
    return gzip.compress(data, compresslevel=1, mtime=0)


def _dtype_for(rng: random.Random) -> np.dtype:
    return np.dtype(rng.choice(["uint8", "int16", "uint16", "int32", "float32", "float64"]))


def _base_array(rng: random.Random) -> np.ndarray:
    shape = (rng.randint(3, 9), rng.randint(3, 9), rng.randint(2, 6))
    dtype = _dtype_for(rng)
    values = np.random.default_rng(rng.randrange(2**32)).integers(0, 200, size=shape)
    return values.astype(dtype)


# ------------------------------------------------------------------------------------------------ NIfTI

_NIFTI_CODES = {"uint8": 2, "int16": 4, "int32": 8, "float32": 16, "float64": 64, "int8": 256, "uint16": 512}


def nifti_header(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), single: bool = True) -> bytearray:
    """A NIfTI-1 header (348 bytes) written by hand, little-endian, sform = qform = diag(spacing)."""
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    dim = [arr.ndim, *arr.shape] + [1] * (7 - arr.ndim)
    struct.pack_into("<8h", h, 40, *dim)
    code = _NIFTI_CODES[str(arr.dtype)]
    struct.pack_into("<hh", h, 70, code, arr.dtype.itemsize * 8)
    struct.pack_into("<8f", h, 76, 1.0, *spacing, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, 352.0 if single else 0.0)
    struct.pack_into("<ff", h, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<hh", h, 252, 1, 1)  # qform_code, sform_code
    struct.pack_into("<6f", h, 256, 0, 0, 0, 0, 0, 0)  # quatern b, c, d, qoffset x, y, z
    struct.pack_into("<4f", h, 280, spacing[0], 0, 0, 0)
    struct.pack_into("<4f", h, 296, 0, spacing[1], 0, 0)
    struct.pack_into("<4f", h, 312, 0, 0, spacing[2], 0)
    h[344:348] = b"n+1\x00" if single else b"ni1\x00"
    return h


_NIFTI_FIELDS = {  # name -> (offset, struct format)
    "sizeof_hdr": (0, "i"), "dim0": (40, "h"), "dim1": (42, "h"), "dim2": (44, "h"), "dim3": (46, "h"),
    "dim4": (48, "h"), "datatype": (70, "h"), "bitpix": (72, "h"), "qfac": (76, "f"), "pixdim1": (80, "f"),
    "pixdim2": (84, "f"), "pixdim3": (88, "f"), "vox_offset": (108, "f"), "scl_slope": (112, "f"),
    "scl_inter": (116, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"), "quatern_b": (256, "f"),
    "quatern_c": (260, "f"), "quatern_d": (264, "f"), "qoffset_x": (268, "f"), "srow_x0": (280, "f"),
    "srow_x1": (284, "f"), "srow_y0": (296, "f"), "srow_y1": (300, "f"), "srow_z2": (320, "f"),
}
_WEIRD_INTS = [-32768, -5, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 1024, 4000, 32767]
_WEIRD_FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-10, 2e-10, 6.7e7, 1e30, 3.4e38, 0.5, 1.0,
                 352.0, 1e9]


def _mutate_nifti_header(rng: random.Random, h: bytearray) -> str:
    choice = rng.random()
    if choice < 0.1:  # the shape of the memory bomb
        struct.pack_into("<3h", h, 42, 4000, 4000, 100)
        return "dims 4000x4000x100"
    if choice < 0.15:
        struct.pack_into("<i", h, 0, rng.choice([0, 347, 540, 1543569408, -1]))
        return "sizeof_hdr"
    if choice < 0.2:
        h[344:348] = rng.choice([b"n+2\x00", b"ni1\x00", b"xxxx", b"\x00\x00\x00\x00", b"n+1\x00"])
        return "magic"
    name = rng.choice(sorted(_NIFTI_FIELDS))
    offset, fmt = _NIFTI_FIELDS[name]
    if fmt in "hi":
        value = rng.choice(_WEIRD_INTS + [rng.randint(-40000, 40000)])
        value = max(-32768, min(32767, value)) if fmt == "h" else value
    else:
        value = rng.choice(_WEIRD_FLOATS + [rng.uniform(-1e6, 1e6)])
    struct.pack_into("<" + fmt, h, offset, value)
    return f"{name}={value}"


def nifti_case(rng: random.Random, index: int) -> Case:
    arr = _base_array(rng)
    spacing = tuple(round(rng.uniform(0.3, 4.0), 3) for _ in range(3))
    kind = rng.choice(["nii", "nii.gz", "pair"])
    single = kind != "pair"
    h = nifti_header(arr, spacing, single)
    notes = []
    ext = b"\x00\x00\x00\x00"
    if rng.random() < 0.15:  # header extensions, sometimes with lying sizes
        esize = rng.choice([-8, 0, 4, 8, 16, 32, 2**31 - 1, 1 << 20])
        ext = b"\x01\x00\x00\x00" + struct.pack("<ii", esize, 6) + bytes(8)
        struct.pack_into("<f", h, 108, 352.0 + 16)
        notes.append(f"extension esize={esize}")
    for _ in range(rng.randint(1, 3)):
        notes.append(_mutate_nifti_header(rng, h))
    body = arr.tobytes(order="F")
    body, body_note = _mutate_body(rng, body)
    if body_note:
        notes.append(body_note)
    stem = f"case{index}"
    case = Case(name=stem, target="")
    if kind == "pair":
        case.files[stem + ".hdr"] = bytes(h) + (ext if ext[0] else b"")
        case.files[stem + ".img"] = body
        case.target = stem + rng.choice([".hdr", ".img"])
        r = rng.random()
        if r < 0.05:
            del case.files[stem + ".img"]
            case.links[stem + ".img"] = "/dev/zero"
            notes.append(".img -> /dev/zero")
        elif r < 0.08:
            del case.files[stem + ".img"]
            notes.append(".img missing")
    else:
        raw = bytes(h) + ext + body
        if kind == "nii.gz":
            raw = _gz(raw)
            if rng.random() < 0.2:
                cut = rng.randint(10, max(11, len(raw) - 1))
                raw = raw[:cut]
                notes.append(f"gzip cut at {cut}")
        case.files[stem + "." + kind] = raw
        case.target = stem + "." + kind
    case.note = "nifti " + kind + ": " + ", ".join(notes)
    return case


_NIFTI2_FIELDS = {  # name -> (offset, struct format), NIfTI-2 little-endian
    "dim0": (16, "q"), "dim1": (24, "q"), "dim2": (32, "q"), "dim3": (40, "q"), "datatype": (12, "h"),
    "pixdim1": (112, "d"), "pixdim2": (120, "d"), "vox_offset": (168, "q"), "qform_code": (344, "i"),
    "sform_code": (348, "i"), "srow_x0": (400, "d"), "srow_y1": (440, "d"),
}


def nifti2_case(rng: random.Random, index: int) -> Case:
    """A NIfTI-2 file (or a big-endian NIfTI-1) written by nibabel, then mutated."""
    import nibabel as nib

    arr = _base_array(rng)
    affine = np.diag([*(round(rng.uniform(0.3, 4.0), 3) for _ in range(3)), 1.0])
    notes = []
    if rng.random() < 0.5:
        img = nib.Nifti2Image(arr, affine)
        raw = bytearray(img.to_bytes())
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(sorted(_NIFTI2_FIELDS))
            offset, fmt = _NIFTI2_FIELDS[name]
            if fmt in "qih":
                value = rng.choice([-(2**40), -5, -1, 0, 1, 3, 7, 8, 4000, 2**31, 2**40, 2**62])
                value = max(-32768, min(32767, value)) if fmt == "h" else value
                value = max(-(2**31), min(2**31 - 1, value)) if fmt == "i" else value
            else:
                value = rng.choice(_WEIRD_FLOATS)
            struct.pack_into("<" + fmt, raw, offset, value)
            notes.append(f"{name}={value}")
        kind = "nifti2"
    else:
        img = nib.Nifti1Image(arr, affine, header=nib.Nifti1Header(endianness=">"))
        raw = bytearray(img.to_bytes())
        name = rng.choice(sorted(_NIFTI_FIELDS))
        offset, fmt = _NIFTI_FIELDS[name]
        value = rng.choice(_WEIRD_INTS) if fmt in "hi" else rng.choice(_WEIRD_FLOATS)
        value = max(-32768, min(32767, value)) if fmt == "h" else value
        struct.pack_into(">" + fmt, raw, offset, value)
        notes.append(f"big-endian {name}={value}")
        kind = "nifti1-be"
    body, body_note = _mutate_body(rng, bytes(raw[544 if kind == "nifti2" else 352 :]))
    raw = bytes(raw[: 544 if kind == "nifti2" else 352]) + body
    if body_note:
        notes.append(body_note)
    ext = rng.choice([".nii", ".nii.gz"])
    case = Case(name=f"case{index}", target=f"case{index}{ext}")
    case.files[case.target] = _gz(raw) if ext == ".nii.gz" else raw
    case.note = f"{kind} {ext}: " + ", ".join(notes)
    return case


# -------------------------------------------------------------------------------------------- MetaImage

_MET_TYPES = {"uint8": "MET_UCHAR", "int16": "MET_SHORT", "uint16": "MET_USHORT", "int32": "MET_INT",
              "float32": "MET_FLOAT", "float64": "MET_DOUBLE"}
_DATA_FILE_TRAPS = ["/dev/zero", "/dev/stdin", "/dev/urandom", "/dev/null", "/proc/self/mem", "LIST", "LIST 2D",
                    "case%03d.raw 1 3 1", "missing.raw", ".", "..", "local", "Local", "", "fifo.raw",
                    "zero_link.raw", "folder.raw", "../../../../../../dev/zero", "/etc/passwd", "a b.raw",
                    "loop.raw", "/proc/self/fd/0", "/sys/kernel/notes"]


def _mutate_body(rng: random.Random, body: bytes) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.25:
        cut = rng.randint(0, max(len(body) - 1, 0))
        return body[:cut], f"body cut to {cut}"
    if r < 0.35:
        b = bytearray(body)
        for _ in range(rng.randint(1, 16)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "body bytes flipped"
    if r < 0.4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))), "body random"
    if r < 0.45:
        return body + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "body extended"
    return body, ""


def _traps(case: Case, rng: random.Random) -> None:
    """Files the data-file traps point to: a fifo, a link to /dev/zero, a folder."""
    case.fifos.append("fifo.raw")
    case.links["zero_link.raw"] = "/dev/zero"
    case.links["loop.raw"] = "loop.raw"  # a link to itself
    case.folders.append("folder.raw")


def _place(case: Case, header: bytes, body: bytes, data_name: str | None) -> None:
    """The case's header file, with the voxel data after it or, given ``data_name``, in that detached file."""
    if data_name is None:
        case.files[case.target] = header + body
    else:
        case.files[case.target] = header
        case.files[data_name] = body


def _mutate_fields(rng: random.Random, fields: list[list[str]], values: dict[str, list], sep: str) -> str:
    """Mutate a list of ``[key, value]`` header fields in place; return what was done."""
    r = rng.random()
    keys = [f[0] for f in fields]
    if r < 0.55:
        key = rng.choice(sorted(values))
        value = str(rng.choice(values[key]))
        if key in keys:
            fields[keys.index(key)][1] = value
        else:
            fields.insert(rng.randint(0, len(fields) - 1), [key, value])
        return f"{key}={value[:40]}"
    if r < 0.62 and fields:
        i = rng.randrange(len(fields))
        fields.insert(i, [fields[i][0], str(rng.choice(values.get(fields[i][0], ["7"])))])
        return f"duplicate {fields[i][0]}"
    if r < 0.69 and len(fields) > 1:
        i = rng.randrange(len(fields) - 1)
        removed = fields.pop(i)
        return f"removed {removed[0]}"
    if r < 0.75 and len(fields) > 1:
        i = rng.randrange(len(fields) - 1)
        fields[i][0] = rng.choice([fields[i][0].lower(), fields[i][0].upper(), fields[i][0] + "x"])
        return f"renamed {fields[i][0]}"
    if r < 0.81 and len(fields) > 2:
        i, j = rng.sample(range(len(fields) - 1), 2)
        fields[i], fields[j] = fields[j], fields[i]
        return "swapped fields"
    if r < 0.87:
        junk = rng.choice(["garbage", "# comment", "\x00\x01\x02", "A" * 100000, "key" + sep + "\xff\xfe",
                           "Unknown" + sep + "1 2 3", sep + " value", "  "])
        fields.insert(rng.randint(0, len(fields) - 1), [junk, None])
        return f"junk line {junk[:12]!r}"
    if r < 0.93 and fields:
        i = rng.randrange(len(fields))
        if fields[i][1] is not None:
            fields[i][1] = fields[i][1] + rng.choice([" 1", " nan", "x", " " * 3, "\t2"])
        return f"appended to {fields[i][0]}"
    i = rng.randrange(len(fields)) if fields else 0
    if fields and fields[i][1] is not None:
        fields[i][1] = "".join(rng.choice("0123456789 .-+eE") for _ in range(rng.randint(0, 12)))
        return f"random number in {fields[i][0]}"
    return "nothing"


def metaimage_case(rng: random.Random, index: int) -> Case:
    arr = _base_array(rng)
    spacing = [round(rng.uniform(0.3, 4.0), 3) for _ in range(3)]
    detached = rng.random() < 0.5
    ext = ".mhd" if detached and rng.random() < 0.8 else ".mha"
    compressed = rng.random() < 0.4
    body = arr.tobytes(order="F")
    if compressed:
        body = zlib.compress(body)
    stem = f"case{index}"
    data_name = stem + (".zraw" if compressed else ".raw")
    fields = [["ObjectType", "Image"], ["NDims", "3"], ["BinaryData", "True"], ["BinaryDataByteOrderMSB", "False"],
              ["CompressedData", "True" if compressed else "False"]]
    if compressed:
        fields.append(["CompressedDataSize", str(len(body))])
    fields += [["TransformMatrix", "1 0 0 0 1 0 0 0 1"], ["Offset", "0 0 0"], ["CenterOfRotation", "0 0 0"],
               ["AnatomicalOrientation", "RAI"], ["ElementSpacing", " ".join(map(str, spacing))],
               ["DimSize", " ".join(map(str, arr.shape))], ["ElementType", _MET_TYPES[str(arr.dtype)]],
               ["ElementDataFile", data_name if detached else "LOCAL"]]
    values = {
        "NDims": [-3, -1, 0, 1, 2, 3, 4, 5, 6, 10, 100000, 2**31, "abc", "3.0", ""],
        "DimSize": ["1024 1024 1024", "4000 4000 100", "4 -5 6", "0 5 6", "4 5", "4 5 6 7", "4.5 5 6", "0x6 5 5",
                    "99999999999 9 9", "-1 -1 -1", " ".join(str(s) for s in arr.shape[::-1])],
        "ElementType": ["MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG", "MET_UCHAR_ARRAY", "MET_STRING",
                        "MET_OTHER", "met_uchar", "MET_ASCII_CHAR", ""],
        "ElementSpacing": ["nan 1 1", "inf 1 1", "0 1 1", "-1 1 1", "6.7e7 1 1", "2e-10 2e-10 2e-10", "1 1",
                           "1 1 1 1", "1e400 1 1", "1abc 1 1"],
        "ElementSize": ["0 0 0", "1 2 3", "nan nan nan"],
        "TransformMatrix": ["0 0 0 0 0 0 0 0 0", "1 0 0 1 0 0 0 0 1", "nan 0 0 0 1 0 0 0 1", "1 0 0 0 1 0",
                            "0 1 0 1 0 0 0 0 1", "1e300 0 0 0 1e300 0 0 0 1e300"],
        "Offset": ["nan 0 0", "1e308 1e308 1e308", "0 0", "1 2 3"],
        "Position": ["5 5 5"],
        "ElementDataFile": _DATA_FILE_TRAPS + [data_name, "LOCAL"],
        "HeaderSize": [-1, -2, 0, 16, 10**12, -10**6],
        "CompressedData": ["True", "False", "yes", "1"],
        "CompressedDataSize": [0, -1, 1, 10**15, len(body) + 1],
        "BinaryData": ["False", "True", "maybe"],
        "ElementNumberOfChannels": [0, 1, 3, -1, 10**9],
        "ObjectType": ["Image", "Tube", "", "image"],
        "AnatomicalOrientation": ["RAI", "R", "????????????", "XYZ", "RA", "LPS" * 100],
        "ElementByteOrderMSB": ["True", "False", "x"],
        "HeaderSizePerSlice": [0, 4, -1],
    }
    notes = [_mutate_fields(rng, fields, values, "=") for _ in range(rng.randint(1, 3))]
    body, body_note = _mutate_body(rng, body)
    if body_note:
        notes.append(body_note)
    lines = []
    for key, value in fields:
        lines.append(key if value is None else f"{key} = {value}")
    header = ("\n".join(lines) + "\n").encode("latin-1", "replace")
    case = Case(name=stem, target=stem + ext)
    _traps(case, rng)
    _place(case, header, body, data_name if detached else None)
    case.note = f"metaimage {ext}{' compressed' if compressed else ''}: " + ", ".join(notes)
    return case


# ------------------------------------------------------------------------------------------------- NRRD

_NRRD_TYPES = {"uint8": "uint8", "int16": "short", "uint16": "ushort", "int32": "int", "float32": "float",
               "float64": "double"}


def nrrd_case(rng: random.Random, index: int) -> Case:
    arr = _base_array(rng)
    spacing = [round(rng.uniform(0.3, 4.0), 3) for _ in range(3)]
    detached = rng.random() < 0.4
    ext = ".nhdr" if detached and rng.random() < 0.8 else ".nrrd"
    encoding = rng.choice(["raw", "gzip", "ascii"])
    raw = arr.tobytes(order="F")
    if encoding == "gzip":
        body = _gz(raw)
    elif encoding == "ascii":
        body = (" ".join(str(v) for v in arr.ravel(order="F")) + "\n").encode()
    else:
        body = raw
    stem = f"case{index}"
    data_name = stem + ".raw" + (".gz" if encoding == "gzip" else "")
    fields = [["type", _NRRD_TYPES[str(arr.dtype)]], ["dimension", "3"], ["space", "left-posterior-superior"],
              ["sizes", " ".join(map(str, arr.shape))],
              ["space directions", f"({spacing[0]},0,0) (0,{spacing[1]},0) (0,0,{spacing[2]})"],
              ["kinds", "domain domain domain"], ["endian", "little"], ["encoding", encoding],
              ["space origin", "(0,0,0)"]]
    if detached:
        fields.append(["data file", data_name])
    values = {
        "dimension": [-3, 0, 1, 2, 3, 4, 5, 6, 17, 100000, "x"],
        "sizes": ["1024 1024 1024", "4000 4000 100", "4 -5 6", "0 5 6", "4 5", "4 5 6 7", "99999999999 9 9"],
        "type": ["uchar", "float", "double", "block", "int128", "unsigned long long", ""],
        "encoding": ["raw", "gzip", "bzip2", "ascii", "hex", "zstd", "none"],
        "endian": ["little", "big", "middle"],
        "space directions": ["(0,0,0) (0,1,0) (0,0,1)", "(1,0,0) (1,0,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)",
                             "none (0,1,0) (0,0,1)", "(1,0,0) (0,1,0)", "(1,0) (0,1) (1,1)",
                             "(1e300,0,0) (0,1e300,0) (0,0,1e300)"],
        "spacings": ["nan 1 1", "0 1 1", "-1 1 1", "6.7e7 1 1", "2e-10 1 1", "1 1"],
        "space origin": ["(nan,0,0)", "(0,0)", "(1e308,1e308,1e308)", "0 0 0"],
        "space": ["right-anterior-superior", "scanner-xyz", "nonsense", "right-anterior-superior-time"],
        "space dimension": [-1, 0, 2, 3, 4, 100],
        "kinds": ["vector domain domain", "RGB-color domain domain", "domain domain", "bogus domain domain"],
        "data file": _DATA_FILE_TRAPS + [data_name],
        "byte skip": [-1, -2, 0, 16, 10**12],
        "line skip": [-1, 0, 3, 10**9],
        "measurement frame": ["(1,0,0) (0,1,0) (0,0,1)", "(nan,0,0)"],
    }
    notes = [_mutate_fields(rng, fields, values, ": ") for _ in range(rng.randint(1, 3))]
    body, body_note = _mutate_body(rng, body)
    if body_note:
        notes.append(body_note)
    magic = rng.choice(["NRRD0004"] * 9 + ["NRRD0001", "NRRD0009", "NRRX0004"])
    lines = [magic] + [key if value is None else f"{key}: {value}" for key, value in fields]
    header = "\n".join(lines) + "\n"
    if rng.random() < 0.05:
        header = header.rstrip("\n")
        notes.append("no blank line")
    elif not detached or ext == ".nrrd":
        header += "\n"
    case = Case(name=stem, target=stem + ext)
    _traps(case, rng)
    _place(case, header.encode("latin-1", "replace"), body, data_name if detached else None)
    case.note = f"nrrd {ext} {encoding}: " + ", ".join(notes)
    return case


def junk_case(rng: random.Random, index: int) -> Case:
    ext = rng.choice([".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".dcm"])
    r = rng.random()
    if r < 0.3:
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2048)))
        note = "random bytes"
    elif r < 0.5:
        data = _gz(bytes(rng.randrange(256) for _ in range(rng.randint(0, 2048))))
        note = "gzip of random bytes"
    elif r < 0.7:
        data = b"\x00" * 128 + b"DICM" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
        note = "DICM preamble and junk"
    else:
        data = b""
        note = "empty file"
    case = Case(name=f"case{index}", target=f"case{index}{ext}")
    case.files[case.target] = data
    case.note = f"junk {ext}: {note}"
    return case


def special_target_case(rng: random.Random, index: int) -> Case:
    """The file to open is itself a link to a device, a fifo or a folder with a scan's extension."""
    ext = rng.choice([".nii", ".nii.gz", ".mha", ".nrrd", ".dcm"])
    case = Case(name=f"case{index}", target=f"case{index}{ext}")
    r = rng.random()
    if r < 0.4:
        case.links[case.target] = rng.choice(["/dev/zero", "/dev/stdin", "/dev/urandom", "/dev/null"])
        case.note = f"target -> {case.links[case.target]}"
    elif r < 0.7:
        case.fifos.append(case.target)
        case.note = "target is a fifo"
    else:
        case.folders.append(case.target)
        case.note = "target is a folder"
    return case


def dicom_case(rng: random.Random, index: int) -> Case:
    """A SimpleITK-written DICOM series (a folder or one of its files) with mutated tags (fuzz_dicom.py)."""
    from fuzz_dicom import mutated_series

    files, target, note = mutated_series(rng)
    return Case(name=f"case{index}", target=target, files=files, folders=["series"], note="dicom: " + note)


GENERATORS = [(nifti_case, 0.25), (nifti2_case, 0.06), (metaimage_case, 0.27), (nrrd_case, 0.24), (junk_case, 0.06),
              (special_target_case, 0.04), (dicom_case, 0.08)]


def make_case(seed: int, index: int) -> Case:
    rng = random.Random(seed * 1_000_003 + index)
    r, acc = rng.random(), 0.0
    for gen, weight in GENERATORS:
        acc += weight
        if r < acc:
            return gen(rng, index)
    return GENERATORS[0][0](rng, index)


# ------------------------------------------------------------------------------------ explicit cases


def explicit_cases() -> list[Case]:
    """One case per crash class the hostile tester found; each must be refused with the given phrase."""
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    raw = arr.tobytes(order="F")

    def mha(name, ndims="3", dims="4 5 6", extra="", datafile="LOCAL", body=raw, ext=".mha"):
        header = (f"ObjectType = Image\nNDims = {ndims}\nDimSize = {dims}\nElementType = MET_UCHAR\n"
                  f"ElementSpacing = 1 1 1\n{extra}ElementDataFile = {datafile}\n").encode()
        return Case(name=name, target=name + ext, files={name + ext: header + (body if datafile == "LOCAL" else b"")})

    cases = [
        mha("ndims_negative", ndims="-3"),
        mha("ndims_zero", ndims="0", dims=""),
        mha("ndims_huge", ndims="100000"),
        mha("ndims_int_max", ndims=str(2**31 - 1)),
        mha("dim_negative", dims="4 -5 6"),
        mha("dim_zero", dims="4 0 6"),
        mha("devzero", datafile="/dev/zero", dims="1024 1024 1024", ext=".mhd"),
        mha("devstdin", datafile="/dev/stdin", ext=".mhd"),
    ]
    cases[0].expect = cases[1].expect = cases[2].expect = cases[3].expect = "NDims"
    cases[4].expect = "size -5"
    cases[5].expect = "size 0"
    cases[6].expect = "/dev/zero"
    cases[7].expect = "/dev/stdin"
    bomb = zlib.compress(bytes(1 << 22), 9)  # 4 MiB of zeros in about 4 KB
    c = mha("compressed_1024cubed", dims="1024 1024 1024", body=bomb,
            extra=f"CompressedData = True\nCompressedDataSize = {len(bomb)}\n")
    c.expect = "cannot decode"
    cases.append(c)
    h = nifti_header(arr)
    struct.pack_into("<3h", h, 42, 4000, 4000, 100)
    cases.append(Case(name="nii_stub_4000x4000x100", target="stub.nii",
                      files={"stub.nii": bytes(h) + bytes(4) + bytes(5000)}, expect="truncated"))
    h = nifti_header(arr)
    struct.pack_into("<12f", h, 280, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0)  # axes i and j both along x
    cases.append(Case(name="degenerate_affine", target="degenerate.nii",
                      files={"degenerate.nii": bytes(h) + bytes(4) + raw}, expect="parallel axes"))
    h = nifti_header(arr)
    struct.pack_into("<h", h, 44, -5)
    cases.append(Case(name="nii_negative_dim", target="negdim.nii",
                      files={"negdim.nii": bytes(h) + bytes(4) + raw}, expect="size -5"))
    h = nifti_header(arr)
    struct.pack_into("<h", h, 40, -1)
    cases.append(Case(name="nii_negative_ndim", target="negndim.nii",
                      files={"negndim.nii": bytes(h) + bytes(4) + raw}))
    nrrd = ("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: /dev/zero\n").encode()
    cases.append(Case(name="nhdr_devzero", target="z.nhdr", files={"z.nhdr": nrrd}, expect="/dev/zero"))
    cases += _absurd_explicit_cases()
    for c in cases:
        c.note = "explicit: " + c.name
    return cases


def _absurd_explicit_cases() -> list[Case]:
    """Valid files of absurd size (issue 37) and a link loop: refused by the readers in one sentence."""
    import nibabel as nib

    def nii_gz(shape, spacing) -> bytes:
        img = nib.Nifti1Image(np.ones(shape, np.uint8), np.diag([*spacing, 1.0]))
        return _gz(img.to_bytes())

    import fuzz_dicom as fd

    with tempfile.TemporaryDirectory(prefix="fuzz-dicom-") as tmp:
        fd.valid_series(Path(tmp), slices=3, rows=16, cols=12)
        fd.edit_files(Path(tmp), fd.PIXEL_SPACING, fd.text_value("1e9\\1e9"))
        series = {f"series/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir())}
    return [
        Case(name="spacing_1e9", target="s.nii.gz", files={"s.nii.gz": nii_gz((4, 5, 6), (1e9, 1e9, 1e9))},
             expect="its voxels measure 1e+09 x 1e+09 x 1e+09 mm"),
        Case(name="slice_3000_at_1mm", target="w.nii.gz", files={"w.nii.gz": nii_gz((1, 3000, 3000), (1, 1, 1))},
             expect="span 1 x 3000 x 3000 mm"),
        Case(name="self_loop", target="loop.nii.gz", links={"loop.nii.gz": "loop.nii.gz"},
             expect="symbolic link in a loop of links"),
        Case(name="dicom_spacing_1e9", target="series", files=series, folders=["series"],
             expect="its voxels measure 1e+09 x 1e+09 mm"),
    ]
