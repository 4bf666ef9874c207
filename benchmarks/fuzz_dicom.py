"""DICOM series for ``benchmarks/fuzz.py``: written by SimpleITK (GDCM), then with their tags mutated.

pydicom is not a dependency, so the series are written by SimpleITK as a user's converter would, and the
tags GDCM sets from the image itself (rows, columns, bits, samples per pixel, frames) are then edited in
the bytes: GDCM writes the data set in implicit VR little endian after the explicit file meta group, so
each element is a tag, a 4-byte length and the value, in tag order, and :func:`set_element` replaces one
or inserts it in order.

:func:`mutated_series` gives the files of one case (relative name -> bytes), the name to open and a note:
rows and columns that disagree with the pixel data or between slices, bits allocated / stored / high bit
that disagree, samples per pixel that the photometric interpretation and the data do not have, a number of
frames the file does not hold, image positions that repeat, leave the slice normal or are absurd, image
orientations that differ between slices or are degenerate, pixel spacings no scan has, and folders that
mix series (two series UIDs, or one UID over slices of different sizes).
"""

from __future__ import annotations

import random
import struct
import tempfile
from pathlib import Path

import numpy as np

#: Tags (group, element) of the elements the mutations edit.
ROWS, COLUMNS = (0x0028, 0x0010), (0x0028, 0x0011)
BITS_ALLOCATED, BITS_STORED, HIGH_BIT = (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0102)
SAMPLES_PER_PIXEL, PHOTOMETRIC, NUMBER_OF_FRAMES = (0x0028, 0x0002), (0x0028, 0x0004), (0x0028, 0x0008)
PIXEL_REPRESENTATION = (0x0028, 0x0103)
PIXEL_SPACING, POSITION, ORIENTATION = (0x0028, 0x0030), (0x0020, 0x0032), (0x0020, 0x0037)
SERIES_UID, PIXEL_DATA = (0x0020, 0x000E), (0x7FE0, 0x0010)
_UID_ROOT = "1.2.826.0.1.3680043.2.1125.77"  # a made-up root for the fuzz series


# ------------------------------------------------------------------------------------ writing (GDCM)


def write_series(folder: Path, volume: np.ndarray, spacing=(0.8, 0.8, 3.0), series: str = "1",
                 positions=None, orientation: str = "0\\1\\0\\0\\0\\-1", name: str = "slice") -> list[Path]:
    """Write ``volume`` (slices, rows, cols; int16) as one 2-D DICOM file per slice with SimpleITK.

    The default orientation is sagittal (rows along A->P, columns S->I); slice ``k`` sits at
    ``positions[k]`` (default: ``k * spacing[2]`` mm along x)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k, plane in enumerate(volume):
        img = sitk.GetImageFromArray(np.ascontiguousarray(plane))
        img.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = positions[k] if positions is not None else (k * float(spacing[2]), 0.0, 0.0)
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{_UID_ROOT}.{series}.{k + 1}", "0020|000d": f"{_UID_ROOT}.9",
            "0020|000e": f"{_UID_ROOT}.{series}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:g}" for v in position), "0020|0037": orientation,
            "0018|0050": f"{float(spacing[2]):g}",
            "0008|0020": "20260101", "0008|0030": "120000",  # study date and time: GDCM writes now otherwise
        }
        for tag, value in tags.items():
            img.SetMetaData(tag, value)
        path = folder / f"{name}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------- editing the bytes


def _dataset_start(data: bytes) -> int:
    """Offset of the data set: after the preamble, ``DICM`` and the explicit-VR file meta group."""
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            return pos
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def _elements(data: bytes):
    """``(tag, start, end)`` of each top-level element of the implicit-VR data set."""
    pos = _dataset_start(data)
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if length == 0xFFFFFFFF:  # a sequence of undefined length: not written for these files
            return
        end = pos + 8 + length
        yield (group, element), pos, end
        pos = end


def text_value(text: str) -> bytes:
    """A DICOM text value (IS, DS, UI, CS), padded to an even length."""
    raw = text.encode("ascii")
    return raw + (b" " if len(raw) % 2 else b"")


def us_value(number: int) -> bytes:
    """An unsigned 16-bit (US) value."""
    return struct.pack("<H", int(number) & 0xFFFF)


def set_element(data: bytes, tag: tuple[int, int], value: bytes | None) -> bytes:
    """``data`` with element ``tag`` set to ``value`` (inserted in tag order when absent; ``None`` removes)."""
    for found, start, end in _elements(data):
        if found == tag:
            if value is None:
                return data[:start] + data[end:]
            return data[:start] + struct.pack("<HHI", *tag, len(value)) + value + data[end:]
        if found > tag:
            if value is None:
                return data
            return data[:start] + struct.pack("<HHI", *tag, len(value)) + value + data[start:]
    return data if value is None else data + struct.pack("<HHI", *tag, len(value)) + value


# ------------------------------------------------------------------------------------------ mutations


def _volume(rng: random.Random, slices: int, rows: int, cols: int) -> np.ndarray:
    values = np.random.default_rng(rng.randrange(2**32)).normal(400, 80, (slices, rows, cols))
    return np.clip(values, 0, 4000).astype(np.int16)


def _series_bytes(rng: random.Random, **kwargs) -> list[bytes]:
    with tempfile.TemporaryDirectory(prefix="fuzz-dicom-") as tmp:
        paths = write_series(Path(tmp), **kwargs)
        return [p.read_bytes() for p in paths]


def _mutate_tags(rng: random.Random, files: list[bytes]) -> tuple[list[bytes], str]:
    """One tag mutation applied to one slice or to all of them."""
    which = rng.choice(["rows", "columns", "bits", "samples", "frames", "position", "orientation", "spacing",
                        "pixel data"])
    every = rng.random() < 0.5
    targets = range(len(files)) if every else [rng.randrange(len(files))]
    if which == "rows":
        tag, text = ROWS, rng.choice([0, 1, 7, 33, 4000, 65535])
        value = us_value(text)
    elif which == "columns":
        tag, text = COLUMNS, rng.choice([0, 1, 41, 5000, 65535])
        value = us_value(text)
    elif which == "bits":
        tag = rng.choice([BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION])
        text = rng.choice([0, 1, 7, 8, 12, 15, 17, 32, 64, 255])
        value = us_value(text)
    elif which == "samples":
        if rng.random() < 0.5:
            tag, text = SAMPLES_PER_PIXEL, rng.choice([0, 2, 3, 4, 255])
            value = us_value(text)
        else:
            tag, text = PHOTOMETRIC, rng.choice(["RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME1", "BOGUS"])
            value = text_value(text)
    elif which == "frames":
        tag, text = NUMBER_OF_FRAMES, rng.choice(["0", "-1", "2", "1000", "2147483647", "abc", "1.5"])
        value = text_value(text)
    elif which == "position":
        tag = POSITION
        text = rng.choice(["0\\0\\0", "nan\\0\\0", "1e30\\1e30\\1e30", "0\\0", "a\\b\\c", "0\\50\\0", "-1e9\\0\\0"])
        value = text_value(text)
    elif which == "orientation":
        tag = ORIENTATION
        text = rng.choice(["1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0",
                           "0.7071\\0.7071\\0\\0\\0\\-1", "1\\0\\0", "2\\0\\0\\0\\2\\0"])
        value = text_value(text)
    elif which == "spacing":
        tag, text = PIXEL_SPACING, rng.choice(["1e9\\1e9", "0\\0", "-1\\1", "1e-9\\1e-9", "nan\\1", "0.8", "150\\150"])
        value = text_value(text)
    else:
        cut = rng.choice([0, 1, 100, 999])
        tag, text = PIXEL_DATA, f"cut to {cut} bytes"
        value = b"\x00" * cut
    out = list(files)
    for i in targets:
        out[i] = set_element(out[i], tag, value)
    return out, f"{which} ({tag[0]:04x},{tag[1]:04x})={text} in {'every slice' if every else 'one slice'}"


def mutated_series(rng: random.Random) -> tuple[dict[str, bytes], str, str]:
    """``(files, target, note)`` of one DICOM case: relative names to bytes, the name to open (the folder
    ``series`` or one of its files) and what was done."""
    slices, rows, cols = rng.randint(2, 6), rng.randint(8, 40), rng.randint(8, 40)
    kind = rng.random()
    if kind < 0.15:  # two series in one folder
        a = _series_bytes(rng, volume=_volume(rng, slices, rows, cols), series="1")
        b = _series_bytes(rng, volume=_volume(rng, rng.randint(1, 6), rng.randint(8, 40), rng.randint(8, 40)),
                          series="2", name="other")
        files = {**{f"series/a{i:03d}.dcm": d for i, d in enumerate(a)},
                 **{f"series/b{i:03d}.dcm": d for i, d in enumerate(b)}}
        note = "two series in one folder"
    elif kind < 0.25:  # one series UID over slices of two sizes
        a = _series_bytes(rng, volume=_volume(rng, slices, rows, cols), series="1")
        b = _series_bytes(rng, volume=_volume(rng, 2, rows + rng.randint(1, 9), cols), series="1", name="wider",
                          positions=[((slices + k) * 3.0, 0.0, 0.0) for k in range(2)])
        files = {**{f"series/a{i:03d}.dcm": d for i, d in enumerate(a)},
                 **{f"series/b{i:03d}.dcm": d for i, d in enumerate(b)}}
        note = "one series UID, slices of two sizes"
    elif kind < 0.35:  # positions that repeat or leave the slice normal
        positions = [(k * 3.0, 0.0, 0.0) for k in range(slices)]
        how = rng.choice(["repeat", "off-normal", "shuffled", "all equal"])
        if how == "repeat":
            positions[-1] = positions[0]
        elif how == "off-normal":
            positions = [(k * 3.0, rng.uniform(-50, 50), rng.uniform(-50, 50)) for k in range(slices)]
        elif how == "shuffled":
            rng.shuffle(positions)
        else:
            positions = [(0.0, 0.0, 0.0)] * slices
        data = _series_bytes(rng, volume=_volume(rng, slices, rows, cols), positions=positions)
        files = {f"series/s{i:03d}.dcm": d for i, d in enumerate(data)}
        note = f"positions {how}"
    elif kind < 0.42:  # orientations that differ between slices
        data = _series_bytes(rng, volume=_volume(rng, slices, rows, cols))
        other = _series_bytes(rng, volume=_volume(rng, 1, rows, cols), orientation="1\\0\\0\\0\\1\\0",
                              positions=[(1.5, 0.0, 0.0)], name="tilted")
        files = {**{f"series/s{i:03d}.dcm": d for i, d in enumerate(data)}, "series/tilted.dcm": other[0]}
        note = "one slice with another orientation"
    else:
        data, note = _mutate_tags(rng, _series_bytes(rng, volume=_volume(rng, slices, rows, cols)))
        files = {f"series/s{i:03d}.dcm": d for i, d in enumerate(data)}
    target = "series" if rng.random() < 0.7 else sorted(files)[0]
    return files, target, note


def valid_series(folder: Path, slices: int = 5, rows: int = 96, cols: int = 80, seed: int = 0) -> Path:
    """A plain sagittal series of ``slices`` int16 slices, as a scanner's export would be, in ``folder``."""
    write_series(folder, _volume(random.Random(seed), slices, rows, cols))
    return folder


def edit_files(folder: Path, tag: tuple[int, int], value: bytes | None, which: str = "*.dcm") -> None:
    """Set ``tag`` to ``value`` in every file of ``folder`` matching ``which``."""
    for path in sorted(folder.glob(which)):
        path.write_bytes(set_element(path.read_bytes(), tag, value))


if __name__ == "__main__":  # a quick look: python benchmarks/fuzz_dicom.py SEED
    import sys

    files, target, note = mutated_series(random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    print(note, "->", target, {k: len(v) for k, v in files.items()})
