"""The dock's export and provenance in a real napari viewer (pytest-qt, Xvfb): the phantom and a reoriented
scan file written back in their own geometry with a JSON sidecar; the geometry helpers."""

from __future__ import annotations

import json

import numpy as np
from _dock_helpers import (  # noqa: F401 - fixtures
    IMAGE,
    configure,
    dock,
    isolated,
    phantom_viewer,
    run,
)

from napari_spinesegdiff._dock.export import export_like
from napari_spinesegdiff._dock.layers import LABELS_NAME, UNCERTAINTY_NAME
from napari_spinesegdiff.io.readers import read_volume


def test_export_writes_the_phantom_in_its_geometry_with_provenance(qtbot, phantom_viewer, tmp_path):
    viewer, w = phantom_viewer()
    configure(w, steps=2, slices="5:8")
    assert run(qtbot, w) == "done"
    labels = viewer.layers[LABELS_NAME]
    labels.data_setitem((np.array([6, 6]), np.array([10, 11]), np.array([10, 10])), 1)
    out = w.export_results(tmp_path / "export")
    assert [p.name for p in out] == ["phantom_T2w_spinesegdiff_labels.nii.gz",
                                     "phantom_T2w_spinesegdiff_uncertainty.nii.gz", "phantom_T2w_spinesegdiff.json"]
    image = viewer.layers[IMAGE]
    file_affine = np.asarray(image.metadata["affine"])
    lab, unc = read_volume(out[0], kind="labels"), read_volume(out[1], kind="image")
    for vol in (lab, unc):
        np.testing.assert_allclose(vol.affine, file_affine, atol=1e-5)
        assert vol.shape == export_like(image).shape
    np.testing.assert_array_equal(lab.canonical(), labels.data)
    np.testing.assert_allclose(unc.canonical(), viewer.layers[UNCERTAINTY_NAME].data, atol=1e-6)
    side = json.loads(out[2].read_text())
    assert side["edited_layers"][LABELS_NAME]["edited"] is True
    assert side["edited_layers"][LABELS_NAME]["changed_voxels"] >= 1
    assert side["segmented_slices"] == [5, 6, 7]
    assert side["runs"][0]["config"]["steps"] == 2 and side["runs"][0]["checkpoint"]["sha256"]
    assert side["classes"] == {"1": "spinal canal", "2": "vertebra", "3": "intervertebral disc"}


def test_export_of_a_scan_file_goes_next_to_it_in_the_file_geometry(qtbot, make_napari_viewer, tmp_path):
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(3, fov_mm=(24.5, 120.0, 96.0), random_orientation=True)
    scan = write_volume(ph.image.data, tmp_path / "scan" / "case7.nii.gz", ph.image, kind="image")
    source = read_volume(scan)
    assert source.orientation.file_axcodes != ("R", "I", "P")  # a genuinely reoriented file
    viewer = make_napari_viewer()
    viewer.open(str(scan), plugin="spinesegdiff")
    w = dock(viewer)
    w.segment.image.value = viewer.layers["case7"]
    configure(w, steps=2, slices="2:4")
    assert run(qtbot, w) == "done"
    out = w.export_results()
    assert [p.parent for p in out] == [scan.parent] * len(out) and out[-1].suffix == ".json"
    lab = read_volume(out[0], kind="labels")
    np.testing.assert_allclose(lab.affine, source.affine, atol=1e-5)
    assert lab.shape == source.shape
    np.testing.assert_array_equal(lab.canonical(), viewer.layers[LABELS_NAME].data)
    side = json.loads(out[-1].read_text())
    assert side["runs"][0]["input"]["path"] == str(scan)


def test_geometry_helpers_recover_file_order_and_canonical_placement():
    from types import SimpleNamespace

    from napari_spinesegdiff._dock.layers import layer_volume
    from napari_spinesegdiff._dock.segment import checkpoint_info
    from napari_spinesegdiff._sample_data import phantom_layers
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(2, fov_mm=(14.0, 60.0, 48.0), random_orientation=True)
    data, kwargs, _ = phantom_layers(ph, "p")[0]
    layer = SimpleNamespace(data=data, metadata=kwargs["metadata"], scale=kwargs["scale"],
                            translate=kwargs["translate"], name="p")
    like = export_like(layer)
    assert like.shape == ph.image.shape
    np.testing.assert_allclose(like.affine, ph.image.affine)
    vol = layer_volume(layer)
    np.testing.assert_array_equal(vol.canonical(), data)
    bare = SimpleNamespace(data=data, metadata={}, scale=kwargs["scale"], translate=kwargs["translate"], name="p")
    np.testing.assert_allclose(layer_volume(bare).affine, ph.image.orientation.canonical_affine, atol=1e-6)
    info = checkpoint_info(None)
    assert info["num_classes"] == 4 and info["class_names"][0] == "spinal canal"
