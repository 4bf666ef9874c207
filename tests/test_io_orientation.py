"""Canonical sagittal view from the affine: same world image whatever the file's axis order."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from nibabel import orientations as nio

from napari_spinesegdiff.io import Volume, napari_geometry, read_volume

SPACE_ORDERS = ["AIL", "IRA", "LPS", "PSR", "RAS", "SPL"]


@pytest.fixture(scope="module")
def six_orders(shared_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {o: read_volume(shared_file(f"formats/niivue/nifti_space/{o}.nii.gz")) for o in SPACE_ORDERS}


def test_six_axis_orders_give_one_canonical_image(six_orders):
    ref = six_orders["RAS"]
    ref_canonical = ref.canonical()
    assert ref_canonical.shape == (64, 67, 79)  # R (64), I (67), P (79) in RAS.nii.gz's (64, 79, 67)
    for order, vol in six_orders.items():
        assert "".join(vol.orientation.file_axcodes) == order
        assert np.array_equal(vol.canonical(), ref_canonical), order
        np.testing.assert_allclose(vol.orientation.canonical_affine, ref.orientation.canonical_affine, atol=1e-4)


def test_canonical_affine_is_R_I_P(six_orders):
    for vol in six_orders.values():
        aff = vol.orientation.canonical_affine
        assert nio.aff2axcodes(aff) == ("R", "I", "P")
        assert aff[0, 0] > 0 and aff[2, 1] < 0 and aff[1, 2] < 0  # +x, -z, -y per canonical axis


def test_from_canonical_is_exact_inverse(six_orders):
    for vol in six_orders.values():
        back = vol.orientation.from_canonical(vol.canonical())
        assert np.array_equal(back, vol.data)


def test_with_canonical_roundtrip_keeps_file_order(six_orders):
    vol = six_orders["PSR"]
    marker = np.zeros(vol.orientation.canonical_shape, dtype=np.uint8)
    marker[3, 5, 7] = 1
    labels = vol.with_canonical(marker, kind="labels")
    assert labels.shape == vol.shape
    i, j, k = np.argwhere(labels.data)[0]
    world = vol.affine @ [i, j, k, 1]
    expected = vol.orientation.canonical_affine @ [3, 5, 7, 1]
    np.testing.assert_allclose(world, expected, atol=1e-4)


def test_lumbar_superior_is_row_zero_and_mask_overlays(shared_file):
    image = read_volume(shared_file("lumbar/IVD_11_image.nii.gz"))
    labels = read_volume(shared_file("lumbar/IVD_11_label.nii.gz"))
    assert image.orientation.file_axcodes == ("I", "P", "R")
    assert image.orientation.sagittal_axis == 2
    aff = image.orientation.canonical_affine
    top = aff @ [0, 0, 0, 1]
    bottom = aff @ [0, image.orientation.canonical_shape[1] - 1, 0, 1]
    assert top[2] - bottom[2] == pytest.approx(220.0)  # 221 rows of 1 mm, row 0 is the most superior
    front, back = aff @ [0, 0, 0, 1], aff @ [0, 0, 10, 1]
    assert front[1] - back[1] == pytest.approx(10.0)  # columns run anterior -> posterior
    assert image.orientation.canonical_shape == (67, 221, 221)
    assert labels.orientation.canonical_shape == image.orientation.canonical_shape
    assert napari_geometry(labels.orientation) == napari_geometry(image.orientation)
    scale, _ = napari_geometry(image.orientation)
    np.testing.assert_allclose(scale, (1.0, 1.0, 1.0))


def test_lumbar_discs_stack_along_rows(shared_file):
    """The five discs stack superior-inferior: their centroids spread along rows, not columns or slices."""
    labels = read_volume(shared_file("lumbar/IVD_11_label.nii.gz"))
    centroids = np.array([np.argwhere(labels.canonical() == v).mean(axis=0) for v in range(1, 6)])
    spread = centroids.max(axis=0) - centroids.min(axis=0)  # (slices, rows, columns) in voxels of 1 mm
    assert spread[1] > 100  # about 133 mm from L1/L2 to L5/S1
    assert spread[1] > 2 * spread[2] and spread[1] > 5 * spread[0]


def test_from_canonical_volume_is_its_own_canonical():
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    vol = Volume.from_canonical(arr, spacing=(2.0, 0.5, 0.7), origin=(1.0, 2.0, 3.0))
    assert np.array_equal(vol.canonical(), arr)
    scale, translate = napari_geometry(vol.orientation)
    np.testing.assert_allclose(scale, (2.0, 0.5, 0.7))
    np.testing.assert_allclose(translate, (1.0, -3.0, -2.0))
