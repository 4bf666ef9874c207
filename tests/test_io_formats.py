"""Every file in formats/ opens with the geometry its header states, or is refused in one sentence."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_spinesegdiff.io import (
    PairMismatchError,
    VolumeReadError,
    is_spider_mask,
    looks_like_labels_path,
    read_pair,
    read_volume,
    spider_to_classes,
    to_classes,
)
from napari_spinesegdiff.io.labels import as_label_array

# path under shared/data -> (kind, file-order shape, voxel size in mm, expected warning or None)
OPENS = {
    "formats/itk_examples/BrainProtonDensity3Slices.mha": ("image", (181, 217, 3), (1, 1, 1), None),
    "formats/itk_examples/KmeansTest_T1UCharRaw.nii.gz": ("image", (128, 128, 62), (2, 2, 3), None),
    "formats/niivue/dicom_series": ("image", (512, 512, 3), (0.41015625, 0.41015625, 1.5), None),
    "formats/niivue/dicom_series/1-002.dcm": ("image", (512, 512, 3), (0.41015625, 0.41015625, 1.5), None),
    "formats/niivue/enh.dcm": ("image", (64, 64, 6), (3.375, 3.375, 2.4), None),
    "formats/niivue/low_res.nii.gz": ("image", (7, 5, 3), (2, 2, 2), None),  # the 70-byte file
    "formats/niivue/mha.mha": ("image", (64, 64, 37), (3.4375, 3.4375, 3.8), None),
    "formats/niivue/minimal.nii.gz": ("image", (64, 64, 10), (3, 3, 3), "neither a qform nor an sform"),
    "formats/niivue/nifti_space/AIL.nii.gz": ("image", (79, 67, 64), (2.38975, 2.36649, 2.38523), None),
    "formats/niivue/nifti_space/IRA.nii.gz": ("image", (67, 64, 79), (2.36649, 2.38523, 2.38975), None),
    "formats/niivue/nifti_space/LPS.nii.gz": ("image", (64, 79, 67), (2.38523, 2.38975, 2.36649), None),
    "formats/niivue/nifti_space/PSR.nii.gz": ("image", (79, 67, 64), (2.38975, 2.36649, 2.38523), None),
    "formats/niivue/nifti_space/RAS.nii.gz": ("image", (64, 79, 67), (2.38523, 2.38975, 2.36649), None),
    "formats/niivue/nifti_space/SPL.nii.gz": ("image", (67, 79, 64), (2.36649, 2.38975, 2.38523), None),
    "formats/niivue/ras.hdr": ("image", (62, 41, 34), (2.38523, 2.38975, 2.36649), None),
    "formats/niivue/ras.img": ("image", (62, 41, 34), (2.38523, 2.38975, 2.36649), None),
    "formats/niivue/shear.nii.gz": ("image", (306, 422, 54), (0.48242, 0.48242, 2.37081), "sheared"),
    "formats/totalsegmentator/example_ct_dicom": ("image", (512, 512, 20), (0.9765625, 0.9765625, 2.0), None),
    "formats/totalsegmentator/example_mr_sm.nii.gz": ("image", (117, 91, 20), (3, 3, 3), None),
    "formats/totalsegmentator/example_seg_mr.nii.gz": ("labels", (117, 91, 20), (3, 3, 3), None),
    "formats/verse/sub-verse004_seg-vert_msk.nii.gz": ("labels", (161, 338, 61), (1, 1, 2.0003), None),
    "cervical/sct_testing_data/t2/t2.nii.gz": ("image", (60, 55, 52), (1, 1, 1), None),
    "cervical/spine_generic/sub-unf01_T2w.nii.gz": ("image", (131, 141, 16), (1, 1, 1), None),
}

# path -> words the one-sentence refusal must contain
REFUSES = {
    "formats/niivue/complex_image.nii.gz": "complex numbers",
    "formats/niivue/ct_perfusion.nii.gz": "RGB",
    "formats/niivue/pcasl.nii.gz": "4-D image of size 52x68x20x10",
    "formats/itk_examples/BrainProtonDensitySliceBorder20DirectionPlus30.mhd": "2-D image of size 221x257",
    "formats/itk_examples/CorpusCallosumMeanShape.mha": "2-D image of size 58x31",
    "formats/itk_examples/BrainProtonDensity3Slices.raw": "extension '.raw'",
    "formats/itk_examples/BrainProtonDensitySliceBorder20.zraw": "extension '.zraw'",
    "formats/verse/sub-verse004_seg-subreg_ctd.json": "extension '.json'",
    "formats/itk_examples": "no DICOM file",
    "cervical/sct_testing_data/t2/warp_template2anat.nii.gz": "5-D image of size 60x55x52x1x3",
    "cervical/sct_testing_data/dmri/dmri.nii.gz": "4-D image",
    "cervical/sct_testing_data/fmri/fmri.nii.gz": "4-D image",
}

SERIES_FOLDERS = ("formats/niivue/dicom_series", "formats/totalsegmentator/example_ct_dicom")


def _read(path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_volume(path)
    return vol, [str(w.message) for w in caught]


def _sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS affine measured with SimpleITK's own index -> physical point mapping."""
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    o = np.array(img.TransformIndexToPhysicalPoint((0, 0, 0))) * lps_to_ras
    aff = np.eye(4)
    aff[:3, 3] = o
    for axis in range(3):
        idx = [0, 0, 0]
        idx[axis] = 1
        aff[:3, axis] = np.array(img.TransformIndexToPhysicalPoint(tuple(idx))) * lps_to_ras - o
    return aff


def _one_sentence(message: str, path: Path) -> None:
    assert str(path) in message
    assert message.endswith(".") and ". " not in message and "\n" not in message


def test_every_formats_file_has_an_expected_outcome(shared_data):
    covered = set(OPENS) | set(REFUSES)
    for f in sorted((shared_data / "formats").rglob("*")):
        rel = f.relative_to(shared_data).as_posix()
        if f.is_dir() or any(rel.startswith(s + "/") for s in SERIES_FOLDERS):
            continue  # series members are covered by their folder and one named member
        assert rel in covered, f"no expected outcome for {rel}"


@pytest.mark.parametrize("rel", sorted(OPENS))
def test_opens_with_header_geometry(shared_file, rel):
    path = shared_file(rel)
    kind, shape, spacing, warning = OPENS[rel]
    vol, warned = _read(path)
    assert vol.kind == kind
    assert vol.shape == shape
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-4)
    if warning:
        assert any(warning in w for w in warned), warned
    else:
        assert not any("qform" in w or "shear" in w for w in warned), warned
    if rel.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        img = nib.load(path)
        if rel.endswith("minimal.nii.gz"):  # no sform, no qform: voxel size only, origin 0
            np.testing.assert_allclose(vol.affine, np.diag([3.0, 3.0, 3.0, 1.0]))
        else:
            np.testing.assert_allclose(vol.affine, img.affine, atol=1e-5)
        np.testing.assert_allclose(vol.data, img.get_fdata().reshape(shape), rtol=1e-6, atol=1e-3)
    elif rel.endswith((".mha", ".mhd")) or rel.endswith("enh.dcm"):
        img = sitk.ReadImage(str(path))
        np.testing.assert_allclose(vol.affine, _sitk_affine(img), atol=1e-5)
        assert np.array_equal(vol.data, sitk.GetArrayFromImage(img).transpose())


@pytest.mark.parametrize("folder", SERIES_FOLDERS)
def test_dicom_series_stacks_every_file_at_its_own_position(shared_file, folder):
    """Slice k of the volume lies at the position one file of the series states (not SliceThickness)."""
    vol = read_volume(shared_file(folder))
    files = [f for f in sorted(shared_file(folder).iterdir()) if f.is_file()]
    assert vol.shape[2] == len(files)
    file_origins = np.array([np.array(sitk.ReadImage(str(f)).GetOrigin()) * [-1, -1, 1] for f in files])
    slice_origins = np.array([vol.affine @ [0, 0, k, 1] for k in range(vol.shape[2])])[:, :3]
    by_z = np.argsort(slice_origins[:, 2])
    np.testing.assert_allclose(slice_origins[by_z], file_origins[np.argsort(file_origins[:, 2])], atol=1e-3)


def test_single_dicom_file_reads_its_whole_series(shared_file):
    folder = shared_file("formats/totalsegmentator/example_ct_dicom")
    member = sorted(folder.iterdir())[7]
    one, whole = read_volume(member), read_volume(folder)
    assert one.shape == whole.shape == (512, 512, 20)
    assert np.array_equal(one.data, whole.data)
    assert len(one.meta["source_files"]) == 20 and one.meta["series_uid"] == ""  # the empty series UID


@pytest.mark.parametrize("rel", sorted(REFUSES))
def test_refuses_in_one_sentence(shared_file, rel):
    path = shared_file(rel)
    with pytest.raises(VolumeReadError) as info:
        read_volume(path)
    message = str(info.value)
    assert REFUSES[rel] in message
    _one_sentence(message, path)


# ------------------------------------------------------------------------------ synthetic bad inputs


def test_refuses_truncated_and_garbage_files(shared_file, tmp_path):
    raw = shared_file("lumbar/IVD_11_image.nii.gz").read_bytes()
    cases = {
        "short.nii.gz": raw[:100],
        "half.nii.gz": raw[: len(raw) // 2],
        "half.mha": shared_file("formats/niivue/mha.mha").read_bytes()[:60000],
        "garbage.mha": b"not an image",
        "garbage.nii": b"\x00" * 10,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(VolumeReadError) as info:
            read_volume(path)
        _one_sentence(str(info.value), path)
    with pytest.raises(VolumeReadError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")


def test_refuses_lone_dicom_slice_and_2d_nifti(shared_file, tmp_path):
    shutil.copy(shared_file("formats/niivue/dicom_series/1-001.dcm"), tmp_path / "1-001.dcm")
    with pytest.raises(VolumeReadError, match="single 2-D DICOM slice"):
        read_volume(tmp_path / "1-001.dcm")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeReadError, match="2-D image of size 4x5"):
        read_volume(tmp_path / "flat.nii.gz")


def test_trailing_singleton_axes_are_dropped(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1, 1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "t.nii.gz")
    vol = read_volume(tmp_path / "t.nii.gz")
    assert vol.shape == (4, 5, 6) and np.array_equal(vol.data, data[..., 0, 0])
    assert vol.spacing == (2.0, 3.0, 4.0)


# ------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("name", "is_labels"),
    [
        ("lumbar/IVD_11_label.nii.gz", True),
        ("lumbar/IVD_11_image.nii.gz", False),
        ("x/example_seg_mr.nii.gz", True),
        ("x/sub-verse004_seg-vert_msk.nii.gz", True),
        ("x/t2_seg-manual_labeled.nii.gz", True),
        ("x/case_mask.mha", True),
        ("labelsTr/case_001.nii.gz", True),
        ("masks/case_001.nii.gz", True),
        ("x/segment_t2.nii.gz", False),
        ("x/t2.nii.gz", False),
        ("x/masked_image.nii.gz", False),
    ],
)
def test_label_file_name_rule(name, is_labels):
    assert looks_like_labels_path(name) is is_labels


def test_auto_kind_needs_whole_numbers(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.array([[[0.0, 1.0], [2.0, 3.0]]] * 2, np.float32), affine), tmp_path / "a_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.array([[[0.0, 0.5], [2.0, 3.0]]] * 2, np.float32), affine), tmp_path / "b_seg.nii.gz")
    whole = read_volume(tmp_path / "a_seg.nii.gz")
    assert whole.kind == "labels" and whole.data.dtype == np.uint8
    soft = read_volume(tmp_path / "b_seg.nii.gz")
    assert soft.kind == "image" and soft.data.dtype == np.float32
    with pytest.raises(VolumeReadError, match="non-integer"):
        read_volume(tmp_path / "b_seg.nii.gz", kind="labels")
    assert read_volume(tmp_path / "a_seg.nii.gz", kind="image").kind == "image"


def test_float_labels_become_integers(shared_file):
    vol = read_volume(shared_file("formats/verse/sub-verse004_seg-vert_msk.nii.gz"))
    assert vol.kind == "labels" and vol.data.dtype == np.uint8
    assert set(np.unique(vol.data).tolist()) == {0, *range(16, 25)}


def test_spider_mapping_numbers():
    arr = np.array([0, 1, 7, 25, 26, 99, 100, 101, 200, 201, 213, 225, 226])
    np.testing.assert_array_equal(spider_to_classes(arr), [0, 2, 2, 2, 0, 0, 1, 0, 0, 3, 3, 3, 0])
    assert spider_to_classes(arr).dtype == np.uint8
    assert is_spider_mask(np.array([0, 3, 5, 100, 201, 202]))
    assert is_spider_mask(np.array([0, 201]))
    assert not is_spider_mask(np.array([0, 1, 2, 3, 4, 5]))  # an instance mask (e.g. the IVD discs)
    assert not is_spider_mask(np.array([0, 26, 100]))  # 26 is not a SPIDER value
    assert not is_spider_mask(np.array([0.0, 100.5]))


def test_to_classes_schemes():
    spider = np.array([0, 4, 100, 210], dtype=np.int32)
    np.testing.assert_array_equal(to_classes(spider), [0, 2, 1, 3])
    np.testing.assert_array_equal(to_classes(spider, scheme="keep"), [0, 4, 100, 210])
    assert to_classes(spider, scheme="keep").dtype == np.uint8
    instances = np.array([0, 1, 2, 5], dtype=np.int64)
    kept = to_classes(instances)
    np.testing.assert_array_equal(kept, [0, 1, 2, 5])
    assert kept.dtype == np.uint8
    np.testing.assert_array_equal(to_classes(np.array([0, 1, 5]), scheme="spider"), [0, 2, 2])
    assert as_label_array(np.array([0, 300])).dtype == np.uint16
    assert as_label_array(np.array([-1, 3])).dtype == np.int32
    assert as_label_array(np.array([0, 70000])).dtype == np.int32
    with pytest.raises(ValueError):
        to_classes(spider, scheme="other")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- pairs


def test_read_pair_reports_slice_count_mismatch(shared_file):
    image, mask = shared_file("lumbar/VB2_02_image.nii.gz"), shared_file("lumbar/VB2_02_label.nii.gz")
    with pytest.raises(PairMismatchError) as info:
        read_pair(image, mask)
    message = str(info.value)
    assert "lumbar/VB2_02 image 381x381x76 vs mask 381x381x77" in message
    assert message.endswith(".") and ". " not in message


def test_read_pair_accepts_matching_case(shared_file):
    image, labels = read_pair(shared_file("lumbar/IVD_11_image.nii.gz"), shared_file("lumbar/IVD_11_label.nii.gz"))
    assert image.kind == "image" and labels.kind == "labels"
    assert image.shape == labels.shape == (221, 221, 67)
    assert set(np.unique(labels.data).tolist()) == {0, 1, 2, 3, 4, 5}


def test_read_pair_reports_affine_mismatch(tmp_path):
    data = np.zeros((4, 4, 4), np.uint8)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "c_image.nii.gz")
    moved = np.eye(4)
    moved[0, 3] = 0.5
    nib.save(nib.Nifti1Image(data, moved), tmp_path / "c_label.nii.gz")
    with pytest.raises(PairMismatchError, match=re.escape("differ by up to 0.5 mm")):
        read_pair(tmp_path / "c_image.nii.gz", tmp_path / "c_label.nii.gz")
