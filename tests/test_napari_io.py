"""napari edge: reader hook, layers in millimetres, writers back into the scan's geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _absurd_inputs import ABSURD, IDS, one_sentence

from napari_spinesegdiff._reader import CLASS_COLORS, napari_get_reader
from napari_spinesegdiff._writer import write_image, write_labels
from napari_spinesegdiff.io import napari_geometry, read_volume
from napari_spinesegdiff.io.writers import VolumeWriteError

MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"
IMAGE = "lumbar/IVD_11_image.nii.gz"
LABEL = "lumbar/IVD_11_label.nii.gz"


def test_manifest_validates():
    """npe2 must accept napari.yaml, otherwise napari does not load the plugin at all."""
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands["spinesegdiff.get_reader"] == "napari_spinesegdiff._reader:napari_get_reader"
    assert commands["spinesegdiff.write_labels"] == "napari_spinesegdiff._writer:write_labels"


@pytest.fixture
def plugin_registered():
    """The installed plugin is discovered through its ``napari.manifest`` entry point."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert pm.get_manifest("spinesegdiff").name == "spinesegdiff"
    return pm


# --------------------------------------------------------------------------------------- get_reader


def test_get_reader_rejects_what_it_cannot_read(tmp_path, shared_file):
    for name in ("foo.gz", "foo.txt", "foo.nii.gz.bak", "foo.png"):
        (tmp_path / name).write_bytes(b"x")
        assert napari_get_reader(str(tmp_path / name)) is None, name
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "notes.txt").write_text("no dicom here")
    assert napari_get_reader(str(empty)) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    image = str(shared_file(IMAGE))
    assert napari_get_reader([image, str(tmp_path / "foo.txt")]) is None
    assert napari_get_reader([]) is None
    assert napari_get_reader(12345) is None  # type: ignore[arg-type]  # never raises


def test_get_reader_accepts_scans_lists_and_dicom_folders(shared_file):
    assert callable(napari_get_reader(str(shared_file(IMAGE))))
    assert callable(napari_get_reader([str(shared_file(IMAGE)), str(shared_file(LABEL))]))
    assert callable(napari_get_reader(str(shared_file("formats/niivue/dicom_series"))))
    assert callable(napari_get_reader(str(shared_file("formats/totalsegmentator/example_ct_dicom"))))


def test_reader_returns_canonical_layers_in_mm(shared_file):
    path = shared_file(IMAGE)
    volume = read_volume(path)
    reader = napari_get_reader(str(path))
    [(data, kwargs, layer_type)] = reader(str(path))
    assert layer_type == "image"
    assert data.shape == volume.orientation.canonical_shape == (67, 221, 221)
    assert np.array_equal(data, volume.canonical())
    scale, translate = napari_geometry(volume.orientation)
    assert kwargs["scale"] == tuple(scale) and kwargs["translate"] == tuple(translate)
    assert kwargs["name"] == "IVD_11_image"
    meta = kwargs["metadata"]
    np.testing.assert_array_equal(meta["file_affine"], volume.affine)
    np.testing.assert_array_equal(meta["canonical_affine"], volume.orientation.canonical_affine)
    assert meta["file_axcodes"] == ("I", "P", "R") and meta["source"] == str(path)
    lo, hi = kwargs["contrast_limits"]
    assert lo == pytest.approx(np.percentile(data, 0.5)) and hi == pytest.approx(np.percentile(data, 99.5))
    assert lo < hi


def test_reader_labels_and_spider_colours(shared_file, tmp_path):
    [(data, kwargs, layer_type)] = napari_get_reader(str(shared_file(LABEL)))(str(shared_file(LABEL)))
    assert layer_type == "labels"
    assert set(np.unique(data).tolist()) == {0, 1, 2, 3, 4, 5}  # instance values kept
    assert "colormap" not in kwargs  # not a 1/2/3 product: napari's own label colours
    spider = np.zeros((6, 7, 8), np.int16)
    spider[1, 1, 1], spider[2, 2, 2], spider[3, 3, 3] = 5, 100, 203
    nib.save(nib.Nifti1Image(spider, np.eye(4)), tmp_path / "spider_mask.nii.gz")
    [(data, kwargs, layer_type)] = napari_get_reader(str(tmp_path / "spider_mask.nii.gz"))(
        str(tmp_path / "spider_mask.nii.gz")
    )
    assert layer_type == "labels" and kwargs["colormap"] == CLASS_COLORS
    assert sorted(np.unique(data).tolist()) == [0, 1, 2, 3]
    assert kwargs["metadata"]["label_scheme"] == "spider"


def test_reader_colours_spinesegdiff_products(shared_file, tmp_path):
    path = shared_file(IMAGE)
    volume = read_volume(path)
    canonical = np.zeros(volume.orientation.canonical_shape, np.uint8)
    canonical[30, 100:110, 100:110] = 3
    write_labels(str(tmp_path / "pred_seg.nii.gz"), canonical, {"metadata": read_meta(path), "name": "pred"})
    [(data, kwargs, _)] = napari_get_reader(str(tmp_path / "pred_seg.nii.gz"))(str(tmp_path / "pred_seg.nii.gz"))
    assert kwargs["colormap"] == CLASS_COLORS
    assert np.array_equal(data, canonical)


def test_reader_raises_one_sentence_for_claimed_unreadable_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    reader = napari_get_reader(str(bad))
    assert callable(reader)
    with pytest.raises(ValueError) as info:
        reader(str(bad))
    message = str(info.value)
    assert str(bad) in message and message.endswith(".") and ". " not in message


@pytest.mark.parametrize("make, phrase", ABSURD, ids=IDS)
def test_reader_refuses_absurd_inputs_with_read_volumes_sentence(tmp_path, make, phrase):
    """Claimed (a name with our extension that exists, or that the system cannot examine) and refused with
    read_volume's own sentence, not declined with napari's "no reader"."""
    from napari_spinesegdiff.io import VolumeReadError

    path = make(tmp_path)
    with pytest.raises(VolumeReadError) as direct:
        read_volume(path)
    reader = napari_get_reader(str(path))
    assert callable(reader)
    with pytest.raises(VolumeReadError) as info:
        reader(str(path))
    assert str(info.value) == str(direct.value) and phrase in str(info.value)
    one_sentence(str(info.value), path)


def read_meta(path):
    [(_, kwargs, _)] = napari_get_reader(str(path))(str(path))
    return kwargs["metadata"]


# ------------------------------------------------------------------------------------------ writers


def test_write_labels_with_source_geometry(shared_file, tmp_path):
    path = shared_file(IMAGE)
    source = read_volume(path)
    original = read_volume(shared_file(LABEL))
    attributes = {"name": "labels", "metadata": read_meta(path), "scale": (9, 9, 9), "translate": (0, 0, 0)}
    [out] = write_labels(str(tmp_path / "seg.mha"), original.canonical(), attributes)
    back = read_volume(out, kind="labels")
    assert back.shape == source.shape == (221, 221, 67)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)
    assert np.array_equal(back.data, original.data)


def test_write_without_metadata_uses_layer_scale(tmp_path):
    data = np.zeros((4, 5, 6), np.int32)
    data[1, 2, 3] = 2
    attributes = {"name": "painted", "scale": (2.0, 0.5, 0.7), "translate": (10.0, -20.0, 30.0)}
    [out] = write_labels(str(tmp_path / "painted"), data, attributes)
    assert out.endswith("painted.nii.gz")
    back = read_volume(out, kind="labels")
    assert np.array_equal(back.canonical(), data) and back.data.dtype == np.uint8
    scale, translate = napari_geometry(back.orientation)
    np.testing.assert_allclose(scale, (2.0, 0.5, 0.7))
    np.testing.assert_allclose(translate, (10.0, -20.0, 30.0))
    [flat] = write_labels(str(tmp_path / "flat.nii.gz"), np.ones((3, 4), np.uint8), {})
    assert read_volume(flat, kind="labels").orientation.canonical_shape == (1, 3, 4)
    [img] = write_image(str(tmp_path / "map.nii.gz"), np.full((2, 3, 4), 0.25), {"metadata": {"unrelated": 1}})
    vol = read_volume(img, kind="image")
    assert vol.data.dtype == np.float32 and np.all(vol.data == 0.25)


def test_writers_never_overwrite_the_source(shared_file, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(shared_file(IMAGE), scan)
    before = scan.read_bytes()
    meta = read_meta(scan)
    shape = read_volume(scan).orientation.canonical_shape
    with pytest.raises(VolumeWriteError, match="input scan"):
        write_labels(str(scan), np.zeros(shape, np.uint8), {"metadata": meta})
    with pytest.raises(VolumeWriteError, match="input scan"):
        write_image(str(scan), np.zeros((2, 2, 2)), {"metadata": {**meta, "file_affine": None}})
    assert scan.read_bytes() == before


# ------------------------------------------------------------------------------------ napari viewer


def test_viewer_opens_image_and_labels_in_mm(make_napari_viewer, plugin_registered, shared_file):
    viewer = make_napari_viewer()
    image_path, label_path = shared_file(IMAGE), shared_file(LABEL)
    volume = read_volume(image_path)
    [image] = viewer.open(str(image_path), plugin="spinesegdiff")
    [labels] = viewer.open(str(label_path), plugin="spinesegdiff")
    assert type(image).__name__ == "Image" and type(labels).__name__ == "Labels"
    assert image.data.shape == labels.data.shape == volume.orientation.canonical_shape
    np.testing.assert_allclose(image.scale, volume.orientation.canonical_spacing)
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert image.metadata["file_axcodes"] == ("I", "P", "R")


def test_viewer_saves_labels_in_source_geometry(make_napari_viewer, plugin_registered, shared_file, tmp_path):
    viewer = make_napari_viewer()
    source = read_volume(shared_file(IMAGE))
    original = read_volume(shared_file(LABEL))
    [labels] = viewer.open(str(shared_file(LABEL)), plugin="spinesegdiff")
    viewer.layers.selection = {labels}
    out = tmp_path / "saved_seg.nii.gz"
    written = viewer.layers.save(str(out), selected=True, plugin="spinesegdiff")
    assert [Path(p) for p in written] == [out]
    back = read_volume(out, kind="labels")
    assert back.shape == source.shape
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)
    assert np.array_equal(back.data, original.data)


# ------------------------------------------------------------------------- extensionless DICOM, .hdr/.img


def test_get_reader_accepts_extensionless_dicom_that_read_volume_opens(shared_file, tmp_path):
    enhanced = tmp_path / "ENHANCED"
    shutil.copy(shared_file("formats/niivue/enh.dcm"), enhanced)
    series = tmp_path / "series"
    series.mkdir()
    for i, f in enumerate(sorted(shared_file("formats/niivue/dicom_series").glob("*.dcm"))):
        shutil.copy(f, series / f"IM{i:04d}")
    for path in (enhanced, series / "IM0001"):
        expected = read_volume(path)
        reader = napari_get_reader(str(path))
        assert callable(reader), path
        [(data, kwargs, layer_type)] = reader(str(path))
        assert layer_type == "image" and data.shape == expected.orientation.canonical_shape
        assert kwargs["metadata"]["format"] == "dicom"
    notes = tmp_path / "README"
    notes.write_bytes(b"\x00" * 128 + b"NOPE" + b"plain text")
    assert napari_get_reader(str(notes)) is None


def test_reader_and_manifest_take_analyze_pairs(shared_file):
    for rel in ("formats/niivue/ras.hdr", "formats/niivue/ras.img"):
        path = shared_file(rel)
        reader = napari_get_reader(str(path))
        assert callable(reader)
        [(data, kwargs, _)] = reader(str(path))
        assert kwargs["metadata"]["file_shape"] == (62, 41, 34)
    patterns = MANIFEST.read_text().split("filename_patterns:", 1)[1].splitlines()[0]
    assert '"*.hdr"' in patterns and '"*.img"' in patterns


def test_reader_refusal_is_our_one_sentence(tmp_path):
    bomb = tmp_path / "stub.nii"
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((4000, 4000, 100))
    bomb.write_bytes(img.header.binaryblock + bytes(4) + bytes(5000))
    reader = napari_get_reader(str(bomb))
    assert callable(reader)
    from napari_spinesegdiff.io import VolumeReadError

    with pytest.raises(VolumeReadError) as info:
        reader(str(bomb))
    message = str(info.value)
    assert message.startswith(f"Cannot open {bomb}: ") and "truncated" in message and ". " not in message
