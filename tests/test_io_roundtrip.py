"""Write labels/maps for a scan and read them back: same affine, shape, array order; atomic and safe."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_spinesegdiff.io import (
    VolumeWriteError,
    geometry_metadata,
    like_from_metadata,
    read_volume,
    write_canonical,
    write_volume,
)
from napari_spinesegdiff.io import writers as writers_module

READABLE = [
    "formats/itk_examples/BrainProtonDensity3Slices.mha",
    "formats/itk_examples/KmeansTest_T1UCharRaw.nii.gz",
    "formats/niivue/dicom_series",
    "formats/niivue/enh.dcm",
    "formats/niivue/low_res.nii.gz",
    "formats/niivue/mha.mha",
    "formats/niivue/minimal.nii.gz",
    "formats/niivue/nifti_space/AIL.nii.gz",
    "formats/niivue/nifti_space/IRA.nii.gz",
    "formats/niivue/nifti_space/LPS.nii.gz",
    "formats/niivue/nifti_space/PSR.nii.gz",
    "formats/niivue/nifti_space/RAS.nii.gz",
    "formats/niivue/nifti_space/SPL.nii.gz",
    "formats/niivue/ras.hdr",
    "formats/niivue/shear.nii.gz",
    "formats/totalsegmentator/example_ct_dicom",
    "formats/totalsegmentator/example_mr_sm.nii.gz",
    "formats/totalsegmentator/example_seg_mr.nii.gz",
    "formats/verse/sub-verse004_seg-vert_msk.nii.gz",
    "lumbar/IVD_11_image.nii.gz",
    "lumbar/IVD_11_label.nii.gz",
    "lumbar/VB1_02_image.nii.gz",
    "lumbar/VB3_01_image.nii.gz",
]


def _read(path, kind="auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minimal.nii.gz (no sform/qform) and shear.nii.gz warn by design
        return read_volume(path, kind=kind)


def _labels_for(vol):
    """The file's own labels, or a thresholded mask of an image (file order)."""
    if vol.kind == "labels":
        return vol.data
    return (vol.data > np.median(vol.data)).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
@pytest.mark.parametrize("rel", READABLE)
def test_labels_round_trip_in_source_geometry(shared_file, tmp_path, rel, suffix):
    source = _read(shared_file(rel))
    labels = _labels_for(source)
    out = write_volume(labels, tmp_path / f"pred{suffix}", source, kind="labels", produced_by="spinesegdiff test")
    back = _read(out, kind="labels")
    assert back.shape == source.shape
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5, rtol=0)
    assert back.data.dtype == np.uint8
    assert np.array_equal(back.data, labels)
    assert np.array_equal(back.canonical(), source.orientation.to_canonical(labels))


def test_round_trip_to_nii_and_nrrd(shared_file, tmp_path):
    source = _read(shared_file("formats/niivue/nifti_space/PSR.nii.gz"))
    labels = _labels_for(source)
    for name in ("pred.nii", "pred.nrrd"):
        back = _read(write_volume(labels, tmp_path / name, source), kind="labels")
        np.testing.assert_allclose(back.affine, source.affine, atol=1e-5, rtol=0)
        assert np.array_equal(back.data, labels)


def test_nifti_header_codes_are_kept(shared_file, tmp_path):
    source = _read(shared_file("formats/itk_examples/KmeansTest_T1UCharRaw.nii.gz"))
    out = write_volume(np.zeros(source.shape, np.uint8), tmp_path / "z.nii.gz", source, produced_by="spinesegdiff v1")
    hdr = nib.load(out).header
    src = source.meta["nifti_header"]
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 2)
    np.testing.assert_allclose(hdr.get_qform(), src.get_qform(), atol=1e-6)
    np.testing.assert_allclose(hdr.get_sform(), src.get_sform(), atol=1e-6)
    assert hdr.get_data_dtype() == np.uint8
    assert hdr["descrip"].item() == b"spinesegdiff v1"


def test_mha_from_nifti_maps_voxels_to_the_same_world_points(shared_file, tmp_path):
    source = _read(shared_file("formats/verse/sub-verse004_seg-vert_msk.nii.gz"))  # oblique affine
    out = write_volume(source.data, tmp_path / "m.mha", source)
    img = sitk.ReadImage(str(out))
    for index in [(0, 0, 0), (10, 20, 30), (160, 337, 60)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(index))
        ras = (source.affine @ [*index, 1])[:3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-4)


def test_label_and_map_dtypes(shared_file, tmp_path):
    source = _read(shared_file("formats/niivue/low_res.nii.gz"))
    big = np.zeros(source.shape, np.int64)
    big[0, 0, 0] = 300
    assert _read(write_volume(big, tmp_path / "big.nii.gz", source), kind="labels").data.dtype == np.uint16
    assert _read(write_volume(big, tmp_path / "big.mha", source), kind="labels").data.max() == 300
    prob = np.linspace(0, 1, big.size, dtype=np.float64).reshape(source.shape)
    back = _read(write_volume(prob, tmp_path / "p_map.nii.gz", source, kind="image"), kind="image")
    assert back.data.dtype == np.float32
    np.testing.assert_allclose(back.data, prob, atol=1e-7)
    with pytest.raises(VolumeWriteError, match="non-integer"):
        write_volume(prob, tmp_path / "bad.nii.gz", source, kind="labels")
    with pytest.raises(VolumeWriteError, match="negative"):
        write_volume(-big, tmp_path / "bad.nii.gz", source, kind="labels")
    with pytest.raises(VolumeWriteError, match="does not match"):
        write_volume(np.zeros((2, 2, 2), np.uint8), tmp_path / "bad.nii.gz", source)
    with pytest.raises(VolumeWriteError, match="extensions"):
        write_volume(big, tmp_path / "bad.png", source)


def test_write_canonical_maps_back_to_file_order(shared_file, tmp_path):
    source = _read(shared_file("lumbar/IVD_11_image.nii.gz"))  # file order (I, P, R)
    canonical = np.zeros(source.orientation.canonical_shape, np.uint8)
    canonical[10, 0, 5] = 3  # left-most+10 slice, most superior row, column 5
    back = _read(write_canonical(canonical, tmp_path / "c.nii.gz", source), kind="labels")
    assert back.shape == (221, 221, 67)
    assert np.array_equal(back.canonical(), canonical)
    (i, j, k), = np.argwhere(back.data)
    np.testing.assert_allclose(source.affine @ [i, j, k, 1], source.orientation.canonical_affine @ [10, 0, 5, 1])


def test_provenance_in_descrip_and_mha_key(shared_file, tmp_path):
    source = _read(shared_file("formats/niivue/mha.mha"))
    produced_by = {"tool": "spinesegdiff", "version": "0.1.0", "weights": "x" * 200, "steps": 10}
    nii = write_volume(np.zeros(source.shape, np.uint8), tmp_path / "p.nii.gz", source, produced_by=produced_by)
    descrip = nib.load(nii).header["descrip"].item().decode()
    assert descrip.startswith("spinesegdiff") and len(descrip) == 80
    assert _read(nii).meta["produced_by"] == descrip
    mha = write_volume(np.zeros(source.shape, np.uint8), tmp_path / "p.mha", source, produced_by=produced_by)
    assert json.loads(_read(mha).meta["produced_by"]) == produced_by


def test_refuses_to_overwrite_the_input_scan(shared_file, tmp_path):
    source_path = tmp_path / "scan.nii.gz"
    source_path.write_bytes(shared_file("formats/niivue/low_res.nii.gz").read_bytes())
    before = source_path.read_bytes()
    source = _read(source_path)
    for target in (source_path, tmp_path / "." / "scan.nii.gz"):
        with pytest.raises(VolumeWriteError, match="input scan"):
            write_volume(np.zeros(source.shape, np.uint8), target, source)
    assert source_path.read_bytes() == before
    for name in ("ras.hdr", "ras.img"):  # a NIfTI pair: both halves are the input
        (tmp_path / name).write_bytes(shared_file(f"formats/niivue/{name}").read_bytes())
    pair = _read(tmp_path / "ras.hdr")
    for target in ("ras.hdr", "ras.img"):
        with pytest.raises(VolumeWriteError, match="input scan"):
            write_volume(np.zeros(pair.shape, np.uint8), tmp_path / target, pair)


def test_detached_metaimage_data_file_counts_as_the_input(tmp_path):
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    img.SetSpacing((0.8, 0.9, 3.0))
    sitk.WriteImage(img, str(tmp_path / "scan.mhd"))  # writes scan.mhd + its detached scan.raw
    raw = tmp_path / "scan.raw"
    before = raw.read_bytes()
    source = read_volume(tmp_path / "scan.mhd")
    assert raw.resolve() in [p.resolve() for p in source.meta["source_files"]]
    with pytest.raises(VolumeWriteError, match="input scan"):
        write_volume(np.zeros(source.shape, np.uint8), raw, source)
    assert raw.read_bytes() == before


def test_no_overwrite_flag(shared_file, tmp_path):
    source = _read(shared_file("formats/niivue/low_res.nii.gz"))
    target = write_volume(np.zeros(source.shape, np.uint8), tmp_path / "o.nii.gz", source)
    with pytest.raises(VolumeWriteError, match="exists"):
        write_volume(np.ones(source.shape, np.uint8), target, source, overwrite=False)
    assert _read(target).data.max() == 0


def test_atomic_write_leaves_no_temp_file(shared_file, tmp_path, monkeypatch):
    source = _read(shared_file("formats/niivue/low_res.nii.gz"))
    target = write_volume(np.ones(source.shape, np.uint8), tmp_path / "a.nii.gz", source)
    write_volume(np.full(source.shape, 2, np.uint8), tmp_path / "a.mha", source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mha", "a.nii.gz"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)

    def broken(arr, tmp, like, descrip):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writers_module, "_write_nifti", broken)
    with pytest.raises(OSError, match="disk full"):
        write_volume(np.zeros(source.shape, np.uint8), target, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mha", "a.nii.gz"]
    assert _read(target, kind="labels").data.min() == 1  # the earlier file is intact


def test_like_from_metadata_reproduces_the_source_geometry(shared_file, tmp_path):
    source = _read(shared_file("formats/niivue/nifti_space/SPL.nii.gz"))
    like = like_from_metadata(geometry_metadata(source))
    assert like is not None and like.shape == source.shape
    canonical = (source.canonical() > 50).astype(np.uint8)
    back = _read(write_canonical(canonical, tmp_path / "s.nii.gz", like), kind="labels")
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    assert np.array_equal(back.canonical(), canonical)
    with pytest.raises(VolumeWriteError, match="input scan"):
        write_canonical(canonical, source.source, like)
    assert like_from_metadata({}) is None and like_from_metadata({"file_affine": np.eye(4)}) is None


def test_written_labels_mark_themselves_as_labels(shared_file, tmp_path):
    """A product named without a label token still reads back as labels (NIfTI intent / MHA key)."""
    source = _read(shared_file("formats/niivue/low_res.nii.gz"))
    classes = np.zeros(source.shape, np.uint8)
    classes[1:3, 1:3, 1] = 2
    for name in ("prediction.nii.gz", "prediction.mha"):
        back = _read(write_volume(classes, tmp_path / name, source))
        assert back.kind == "labels" and np.array_equal(back.data, classes), name
        as_map = _read(write_volume(classes, tmp_path / f"map_{name}", source, kind="image"))
        assert as_map.kind == "image" and as_map.data.dtype == np.float32, name
    assert int(nib.load(tmp_path / "prediction.nii.gz").header["intent_code"]) == 1002
