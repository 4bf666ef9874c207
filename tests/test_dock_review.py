"""The dock's Review panel in a real napari viewer (pytest-qt, Xvfb): QA rows navigate, the overlay follows
the threshold, edits are undoable and counted, and a screenshot shows the result."""

from __future__ import annotations

import numpy as np
import pytest
from _dock_helpers import (  # noqa: F401 - fixtures
    IMAGE,
    configure,
    isolated,
    phantom_viewer,
    run,
    slice_axis_index,
)

from napari_spinesegdiff._dock.layers import LABELS_NAME, OVERLAY_NAME, UNCERTAINTY_NAME


def test_qa_rows_navigate_overlay_follows_threshold_edits_undo(qtbot, phantom_viewer):
    from qtpy.QtCore import Qt

    viewer, w = phantom_viewer()
    configure(w, steps=3, slices="5:8")
    assert run(qtbot, w) == "done"
    image = viewer.layers[IMAGE]
    review = w.review
    table = review.slice_table
    assert table.rowCount() == 3
    means = [float(table.item(r, 1).text()) for r in range(3)]
    assert means == sorted(means, reverse=True)
    for row in range(table.rowCount()):
        target = int(table.item(row, 0).text())
        rect = table.visualItemRect(table.item(row, 0))
        qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        assert w.current_slice(image) == target
        axis = slice_axis_index(viewer)
        assert viewer.dims.point[axis] == pytest.approx(image.translate[0] + target * image.scale[0])
    st = review.structure_table
    if st.rowCount():
        k, r, c = st.item(0, 0).data(Qt.ItemDataRole.UserRole)
        qtbot.mouseClick(st.viewport(), Qt.MouseButton.LeftButton, pos=st.visualItemRect(st.item(0, 0)).center())
        assert w.current_slice(image) == k
        centre = viewer.scene.camera.center[-2:]
        expected = (image.translate[1] + r * image.scale[1], image.translate[2] + c * image.scale[2])
        assert centre == pytest.approx(expected)

    # threshold overlay: voxels above the slider's value, made when the slider first moves (not with the result),
    # as an image layer that draws them cyan over transparent, as the labels layer it replaced did
    from napari.layers import Image

    unc = viewer.layers[UNCERTAINTY_NAME].data
    assert OVERLAY_NAME not in viewer.layers
    review.threshold.setValue(20)
    qtbot.waitUntil(lambda: OVERLAY_NAME in viewer.layers, timeout=5_000)
    overlay = viewer.layers[OVERLAY_NAME]
    assert isinstance(overlay, Image) and overlay.visible and overlay.opacity == pytest.approx(0.7)
    np.testing.assert_array_equal(overlay.data, (unc > 0.2 / np.e).astype(np.uint8))
    np.testing.assert_allclose(overlay.scale, image.scale)
    np.testing.assert_allclose(overlay.colormap.map(np.array([0.0, 1.0])), [[0, 0, 0, 0], [0, 1, 1, 1]])
    assert tuple(overlay.contrast_limits) == (0.0, 1.0)
    w.state.result_changed.emit()  # a new result redraws the overlay that is there, in place
    assert viewer.layers[OVERLAY_NAME] is overlay

    # an edit through napari's own painting is undoable, and the data object is never swapped
    labels = viewer.layers[LABELS_NAME]
    data_id = id(labels.data)
    before = labels.data.copy()
    labels.brush_size = 5
    labels.paint((6, 100, 100), int(before[6, 100, 100]) % 3 + 1)  # a class other than the one there
    assert (labels.data != before).any()
    assert w.state.paint_events == 1
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    new = int(before[6, 50, 60]) % 3 + 1
    labels.data_setitem((np.array([6]), np.array([50]), np.array([60])), new)
    assert labels.data[6, 50, 60] == new and id(labels.data) == data_id
    review.threshold.setValue(60)
    review.update_overlay()
    assert labels.data[6, 50, 60] == new and id(labels.data) == data_id
    labels.undo()
    assert labels.data[6, 50, 60] == before[6, 50, 60]


def test_screenshot_shows_the_result(qtbot, phantom_viewer):
    viewer, w = phantom_viewer(show=True)
    configure(w, steps=3, slices="5:8")
    assert run(qtbot, w) == "done"
    w.go_to(viewer.layers[IMAGE], (6, 180, 150))
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from imageio.v3 import imwrite

    imwrite("/tmp/widget_screenshot.png", shot)
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    colours = np.unique(canvas.reshape(-1, 3), axis=0)
    print(f"\nscreenshot: std {canvas.std():.1f}, {len(colours)} distinct colours")
    assert canvas.std() > 10
    assert len(colours) > 100
