"""Header checks before any voxel array is allocated: one sentence of ours naming the file, or a warning.

Cases that crashed, hung or exhausted memory before the checks existed run in child processes in
``tests/test_fuzz.py``; the ones here are refused by the checks before any library sees the file.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _absurd_inputs import ABSURD, IDS, nifti_scan, one_sentence

from napari_spinesegdiff.io import Volume, VolumeReadError, check_signal, read_volume
from napari_spinesegdiff.io import guard
from napari_spinesegdiff.io.writers import write_volume

RAW = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)


def refused(path: Path, phrase: str) -> str:
    with pytest.raises(VolumeReadError) as info:
        read_volume(path)
    message = str(info.value)
    one_sentence(message, path)
    assert phrase in message, message
    return message


def mha(path: Path, extra: str = "", ndims: str = "3", dims: str = "4 5 6", datafile: str = "LOCAL",
        body: bytes | None = None, element: str = "MET_UCHAR") -> Path:
    header = (f"ObjectType = Image\nNDims = {ndims}\nDimSize = {dims}\nElementType = {element}\n"
              f"ElementSpacing = 1 1 1\n{extra}ElementDataFile = {datafile}\n").encode()
    data = RAW.tobytes(order="F") if body is None else body
    path.write_bytes(header + (data if datafile == "LOCAL" else b""))
    return path


def nhdr(path: Path, fields: str, data_name: str = "d.raw", data: bytes | None = None) -> Path:
    (path.parent / data_name).write_bytes(RAW.tobytes(order="F") if data is None else data)
    path.write_text(f"NRRD0004\n{fields}data file: {data_name}\n")
    return path


# ------------------------------------------------------------------------------------------ MetaImage


def test_valid_handwritten_headers_open(tmp_path):
    vol = read_volume(mha(tmp_path / "ok.mha"))
    assert vol.shape == (4, 5, 6) and np.array_equal(vol.data, RAW)
    vol = read_volume(nhdr(tmp_path / "ok.nhdr", "type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n"))
    assert np.array_equal(vol.data, RAW)
    assert vol.meta["source_files"][-1] == (tmp_path / "d.raw").resolve()


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"ndims": "-3"}, "NDims = -3"),
        ({"ndims": "0", "dims": ""}, "NDims = 0"),
        ({"ndims": "100000"}, "NDims = 100000"),
        ({"ndims": "three"}, "should be a whole number"),
        ({"dims": "4 -5 6"}, "dimension of size -5"),
        ({"dims": "4 0 6"}, "dimension of size 0"),
        ({"dims": "4 5"}, "2 values where 3 are needed"),
        ({"dims": "2000 2000 2000"}, "more than the 2,147,483,648"),
        ({"dims": "400 400 100"}, "holds only 120 bytes of voxel data"),
        ({"element": "MET_FLOAT_ARRAY"}, "vectors, not scalar"),
        ({"element": "MET_WHATEVER"}, "not a scalar MetaImage type"),
        ({"extra": "ElementNumberOfChannels = 3\n"}, "3-component"),
        ({"extra": "ElementSpacing = nan 1 1\n"}, "twice"),
        ({"extra": "TransformMatrix = 1 0 0 1 0 0 0 0 1\n"}, "parallel axes"),
        ({"extra": "TransformMatrix = 0 0 0 0 1 0 0 0 1\n"}, "axis of length zero"),
        ({"extra": "Offset = nan 0 0\n"}, "not a finite number"),
        ({"extra": "HeaderSize = 100000\n"}, "goes past the end"),
        ({"extra": "ndims = 3\n"}, "case-sensitive"),
        ({"extra": "garbage line\n"}, "not of the form"),
        ({"datafile": "/dev/zero", "dims": "1024 1024 1024"}, "'/dev/zero' is a system file"),
        ({"datafile": "/dev/stdin"}, "'/dev/stdin' is a system file"),
        ({"datafile": "LIST"}, "list of files"),
        ({"datafile": "slice%03d.raw 1 6 1"}, "file pattern"),
        ({"datafile": "missing.raw"}, "does not exist"),
        ({"datafile": "local"}, "capitals"),
    ],
)
def test_metaimage_header_refusals(tmp_path, kwargs, phrase):
    refused(mha(tmp_path / "bad.mha", **kwargs), phrase)


def test_compressed_bomb_is_refused_before_inflating(tmp_path):
    bomb = zlib.compress(bytes(1 << 20), 9)
    path = mha(tmp_path / "bomb.mha", dims="1024 1024 1024", body=bomb,
               extra=f"CompressedData = True\nCompressedDataSize = {len(bomb)}\n")
    refused(path, "cannot decode to that much")
    too_big = mha(tmp_path / "size.mha", body=zlib.compress(RAW.tobytes()),
                  extra="CompressedData = True\nCompressedDataSize = 99999999\n")
    refused(too_big, "CompressedDataSize of 99,999,999 bytes does not fit")


def test_detached_data_must_be_a_regular_file(tmp_path):
    (tmp_path / "folder.raw").mkdir()
    refused(mha(tmp_path / "a.mhd", datafile="folder.raw"), "is a folder, not a regular file")
    (tmp_path / "zero.raw").symlink_to("/dev/zero")
    refused(mha(tmp_path / "b.mhd", datafile="zero.raw"), "system file")


def test_input_that_is_not_a_regular_file_is_refused(tmp_path):
    (tmp_path / "zero.nii").symlink_to("/dev/zero")
    refused(tmp_path / "zero.nii", "system file")
    import os

    os.mkfifo(tmp_path / "pipe.nii.gz")
    refused(tmp_path / "pipe.nii.gz", "device, pipe or socket")


# ----------------------------------------------------------------------------------------------- NRRD


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ("type: uchar\ndimension: 7\nsizes: 4 5 6 1 1 1 1\nencoding: raw\n", "dimension 7"),
        ("type: uchar\nsizes: 4 5 6\ndimension: 3\nencoding: raw\n", "before 'dimension'"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: bzip2\n", "bzip2"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: zstd\n", "not one NRRD defines"),
        ("type: block\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n", "opaque blocks"),
        ("type: short\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n", "endian"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\nspacings: 0 1 1\n", "must be positive"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\nspace: RAS\n"
         "space directions: (1,0,0) (1,0,0) (0,0,1)\n", "parallel axes"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\nspace: RAS\n"
         "space directions: (nan,0,0) (0,1,0) (0,0,1)\n", "not a finite number"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\nbyte skip: -5\n", "byte skip is -5"),
        ("type: uchar\ndimension: 3\nsizes: 400 500 600\nencoding: raw\n", "holds only 120 bytes"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nsizes: 4 5 6\nencoding: raw\n", "twice"),
        ("type: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\nfrobnicate: 1\n", "unknown field"),
    ],
)
def test_nrrd_header_refusals(tmp_path, fields, phrase):
    refused(nhdr(tmp_path / "bad.nhdr", fields), phrase)


def test_nrrd_data_file_traps(tmp_path):
    path = tmp_path / "z.nhdr"
    path.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: /dev/zero\n")
    refused(path, "'/dev/zero' is a system file")
    path.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: LIST\na.raw\n")
    refused(path, "list of files")


# ---------------------------------------------------------------------------------------------- NIfTI


def nifti_bytes(shape=(4, 5, 6), srows=None, **fields) -> bytes:
    img = nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4))
    if srows is not None:
        img.set_sform(np.asarray(srows), code=1)
        img.set_qform(None, code=0)
    raw = bytearray(img.header.binaryblock + bytes(4 + 16))  # header, no-extension flag, 16 spare bytes
    struct.pack_into("<f", raw, 108, 368.0)
    for name, (fmt, offset, value) in fields.items():
        struct.pack_into(fmt, raw, offset, *value)
    return bytes(raw) + np.ones(shape, np.uint8).tobytes()


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"dims": ("<3h", 42, (4000, 4000, 100))}, "holds only 120 bytes of voxel data"),
        ({"dims": ("<3h", 42, (4, -5, 6))}, "dimension of size -5"),
        ({"dim0": ("<h", 40, (0,))}, "NIfTI allows 1 to 7"),
        ({"type": ("<h", 70, (99,))}, "unknown voxel type code 99"),
        ({"size": ("<i", 0, (123,))}, "neither 348 nor 540"),
        ({"off": ("<f", 108, (float("nan"),))}, "not a position in the file"),
        ({"off": ("<f", 108, (1e9,))}, "extensions"),
        ({"ext": ("<4bii", 348, (1, 0, 0, 0, 2**31 - 1, 0)), "off": ("<f", 108, (368,))}, "header extension"),
        ({"ext": ("<4bii", 348, (1, 0, 0, 0, 0, 0)), "off": ("<f", 108, (368,))}, "header extension"),
    ],
)
def test_nifti_header_refusals(tmp_path, fields, phrase):
    raw = nifti_bytes(**fields)
    for name, data in (("bad.nii", raw), ("bad.nii.gz", gzip.compress(raw))):
        path = tmp_path / name
        path.write_bytes(data)
        if name.endswith(".gz") and "bytes of voxel data" in phrase:
            refused(path, "cannot decode to that much")
        else:
            refused(path, phrase)


def test_degenerate_affines_are_refused(tmp_path):
    parallel = [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    path = tmp_path / "parallel.nii"
    path.write_bytes(nifti_bytes(srows=parallel))
    refused(path, "parallel axes")
    zero = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    path.write_bytes(nifti_bytes(srows=zero))
    refused(path, "zero voxel size")
    nan = [[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    path.write_bytes(nifti_bytes(srows=nan))
    refused(path, "NaN")


def test_pair_with_missing_or_device_image_half(tmp_path):
    img = nib.Nifti1Pair(np.ones((4, 5, 6), np.uint8), np.eye(4))
    nib.save(img, tmp_path / "p.hdr")
    assert read_volume(tmp_path / "p.hdr").shape == (4, 5, 6)
    (tmp_path / "p.img").unlink()
    refused(tmp_path / "p.hdr", "image half p.img is missing")
    (tmp_path / "p.img").symlink_to("/dev/zero")
    refused(tmp_path / "p.hdr", "system file")


# ------------------------------------------------------------------------------------ warnings, wrapping


@pytest.mark.parametrize("size", [0.01, 25.0])
def test_unusual_voxel_size_warns_in_one_sentence(tmp_path, size):
    path = tmp_path / "odd_voxels.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(4, 5, 6).astype(np.float32), np.diag([size, 1.0, 1.0, 1.0])), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_volume(path)
    assert vol.shape == (4, 5, 6)
    texts = [str(w.message) for w in caught if "outside the usual" in str(w.message)]
    assert len(texts) == 1 and str(path) in texts[0]
    assert texts[0].endswith(".") and ". " not in texts[0] and "0.05-20 mm" in texts[0]


@pytest.mark.parametrize("spacing", [(1e9, 1e9, 1e9), (6.7e7, 1.0, 1.0), (1.0, 2e-10, 1.0), (0.5, 0.5, 250.0)])
def test_voxel_sizes_no_scan_has_are_refused(tmp_path, spacing):
    path = nifti_scan(tmp_path / "absurd.nii.gz", (4, 5, 6), spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the unusual-size warning
        message = refused(path, "and a scan's voxels measure 0.001 to 100 mm")
    assert " x ".join(f"{s:.4g}" for s in spacing) + " mm" in message


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_extent_no_body_has_is_refused_before_the_voxels_are_read(tmp_path, ext, monkeypatch):
    like = Volume(np.zeros((1, 3000, 3000), np.float32), np.eye(4))  # one slice of 3 x 3 m at 1 mm
    path = write_volume(like.data, tmp_path / f"wide{ext}", like=like, kind="image")
    import SimpleITK

    def no_voxels(*args, **kwargs):
        raise AssertionError("the voxel data was read although the header already refused the file")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_voxels)
    monkeypatch.setattr(SimpleITK.ImageFileReader, "Execute", no_voxels)
    message = refused(path, "span 1 x 3000 x 3000 mm, more than the 2000 mm a scan of a body spans")
    assert "1 x 3000 x 3000 voxels of 1 x 1 x 1 mm" in message


def test_the_limits_themselves_still_open(tmp_path):
    for shape, spacing in (((4, 5, 20), (0.001, 0.001, 100.0)), ((2000, 5, 6), (1.0, 0.5, 0.5))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # outside the usual sizes: a warning only
            assert read_volume(nifti_scan(tmp_path / "edge.nii.gz", shape, spacing)).shape == shape


@pytest.mark.parametrize("make, phrase", ABSURD, ids=IDS)
def test_absurd_inputs_are_refused_in_one_sentence(tmp_path, make, phrase):
    refused(make(tmp_path), phrase)


def test_unreadable_file_is_refused_by_name(tmp_path, monkeypatch):
    path = nifti_scan(tmp_path / "locked.nii.gz", (4, 5, 6), (1.0, 1.0, 1.0))
    real = guard.os.access
    monkeypatch.setattr(guard.os, "access", lambda p, mode: False if Path(p) == path else real(p, mode))
    refused(path, "the file is not readable (permission denied)")  # os.access says no (root ignores the bits)


def test_usual_voxel_sizes_do_not_warn(tmp_path):
    path = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(4, 5, 6).astype(np.float32), np.diag([0.5, 1.0, 4.0, 1.0])), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(path)


@pytest.mark.parametrize("error", [RuntimeError("boom 0x55d1c0de: itk::ERROR"), MemoryError(), OSError(5, "EIO")])
def test_library_failures_become_one_sentence(tmp_path, monkeypatch, error):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(4, 5, 6).astype(np.float32), np.eye(4)), path)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("napari_spinesegdiff.io.readers._nifti_data", broken)
    message = refused(path, "")
    assert "itk" not in message and "0x" not in message
    if isinstance(error, MemoryError):
        assert "memory" in message


def test_own_outputs_still_open(tmp_path):
    like = Volume(np.random.rand(6, 7, 5).astype(np.float32), np.diag([0.8, 0.8, 3.0, 1.0]))
    for name in ("o.nii.gz", "o.nii", "o.mha", "o.nrrd"):
        path = write_volume(like.data, tmp_path / name, like=like, kind="image",
                            produced_by={"tool": "spinesegdiff", "note": "a: b. c", "n": 1})
        vol = read_volume(path)
        np.testing.assert_allclose(vol.data, like.data, rtol=1e-6)
        np.testing.assert_allclose(vol.affine, like.affine, atol=1e-6)


def test_detached_mha_counts_its_data_file(shared_file):
    path = shared_file("formats/itk_examples/BrainProtonDensity3Slices.mha")
    vol = read_volume(path)
    assert vol.meta["source_files"] == [path, path.with_suffix(".raw").resolve()]


# ---------------------------------------------------------------------------------------- check_signal


@pytest.mark.parametrize("fill", [0.0, 7.0, np.nan])
def test_check_signal_refuses_scans_without_signal(tmp_path, fill):
    vol = Volume(np.full((4, 5, 6), fill, np.float32), np.eye(4), source=tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeReadError) as info:
        check_signal(vol)
    message = str(info.value)
    assert message.startswith(f"Cannot segment {tmp_path / 'flat.nii.gz'}: ")
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message
    assert ("no signal" in message) or ("finite" in message)


def test_check_signal_accepts_a_scan_with_signal():
    data = np.zeros((4, 5, 6), np.int16)
    data[1, 2, 3] = 5
    check_signal(Volume(data, np.eye(4)))
    data = np.full((4, 5, 6), np.nan, np.float32)
    data[0, 0, 0], data[1, 1, 1] = 1.0, 2.0
    check_signal(Volume(data, np.eye(4)))


def test_guard_constants_are_module_level():
    assert guard.MAX_VOXELS == 2**31 and guard.MIN_DIMS == 2 and guard.MAX_DIMS == 5
    assert guard.USUAL_VOXEL_MM == (0.05, 20.0)


# ------------------------------------------------------------------------------------------------ DICOM


def dicom_series(folder: Path, rows: int = 24, cols: int = 20, slices: int = 3) -> Path:
    """A sagittal series written by SimpleITK (GDCM: implicit VR little endian after the file meta)."""
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    data = np.random.default_rng(0).integers(100, 900, (slices, rows, cols)).astype(np.int16)
    for k in range(slices):
        img = sitk.GetImageFromArray(data[k])
        img.SetSpacing((0.8, 0.8))
        for tag, value in {"0008|0060": "MR", "0020|000e": "1.2.826.0.1.3680043.2.1125.77.1",
                           "0020|000d": "1.2.826.0.1.3680043.2.1125.77.9", "0020|0013": str(k + 1),
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.77.1.{k + 1}",
                           "0020|0032": f"{3.0 * k}\\0\\0", "0020|0037": "0\\1\\0\\0\\0\\-1"}.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k:03d}.dcm"))
        writer.Execute(img)
    return folder


def test_dicom_rows_beyond_the_pixel_data_are_refused(tmp_path):
    series = dicom_series(tmp_path / "series")
    assert read_volume(series).shape == (20, 24, 3)
    rows = b"\x28\x00\x10\x00\x02\x00\x00\x00"  # (0028,0010) US, length 2, in implicit VR
    for f in series.iterdir():
        raw = f.read_bytes()
        assert raw.count(rows + struct.pack("<H", 24)) == 1
        f.write_bytes(raw.replace(rows + struct.pack("<H", 24), rows + struct.pack("<H", 1000)))
    message = refused(series, "its header declares 20x1000x1 voxels (40,000 bytes) but its file")
    assert "truncated or its header is wrong" in message
