"""napari sample data: synthetic phantoms as image + truth layer-data tuples."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spinesegdiff._sample_data import phantom_degenerated, phantom_t1w, phantom_t2w
from napari_spinesegdiff.io import SagittalOrientation


@pytest.mark.parametrize("make", [phantom_t2w, phantom_t1w, phantom_degenerated])
def test_sample_is_image_plus_truth_on_one_grid(make):
    (img, img_kw, img_type), (lab, lab_kw, lab_type) = make()
    assert (img_type, lab_type) == ("image", "labels")
    assert img.shape == lab.shape == (13, 367, 300)
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert img_kw["scale"] == lab_kw["scale"]
    assert img_kw["translate"] == lab_kw["translate"]
    np.testing.assert_allclose(img_kw["scale"], (3.5, 0.6, 0.6))
    assert lab_kw["name"] == "phantom truth" and lab_kw["opacity"] == 0.5
    assert img_kw["name"].startswith("phantom")
    meta = img_kw["metadata"]
    assert meta["source"] is None
    # the canonical affine is the layer's placement: voxel 0 at `translate` in the displayed frame
    orient = SagittalOrientation(meta["affine"], img.shape)
    np.testing.assert_allclose(orient.canonical_affine, meta["canonical_affine"])
    origin = meta["canonical_affine"][:3, 3]
    np.testing.assert_allclose(img_kw["translate"], (origin[0], -origin[2], -origin[1]))


def test_label_colours():
    colours = phantom_t2w()[1][1]["colormap"]
    assert colours[1] == "yellow" and colours[2] == "#4da6ff" and colours[3] == "#ff6f61"
    assert colours[0] == "transparent"


def test_degenerated_sample_has_darker_low_discs():
    (img, kw, _), (lab, _, _) = phantom_degenerated()
    levels = {lev.name: lev for lev in kw["metadata"]["levels"]}
    assert levels["L4/L5"].degenerated and levels["L5/S1"].degenerated
    assert not levels["L3/L4"].degenerated
    mid = img.shape[0] // 2

    def disc_mean(name: str) -> float:
        row = int(round(levels[name].row))
        band = lab[mid, row - 3 : row + 4] == 3
        return float(img[mid, row - 3 : row + 4][band].mean())

    assert disc_mean("L4/L5") < 0.6 * disc_mean("L3/L4")


def test_open_sample_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("spinesegdiff", "phantom_t2w")
    assert [layer.name for layer in viewer.layers] == ["phantom T2w", "phantom truth"]
    image, labels = viewer.layers
    np.testing.assert_allclose(image.scale, labels.scale)
    np.testing.assert_allclose(image.scale, (3.5, 0.6, 0.6))
    assert labels.data.dtype == np.uint8
    np.testing.assert_allclose(labels.colormap.map([2])[0][:3], (0x4D / 255, 0xA6 / 255, 1.0), atol=1e-3)
