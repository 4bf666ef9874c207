"""The dock's level report in a real napari viewer (pytest-qt, Xvfb): after a run on the phantom the Review tab
lists its structures by level name with measurements, the names are the phantom's, renumbering shifts them (table,
``instances`` layer values and features, ``measurements`` layer), the measured lines lie on their structures with
their values as lengths, hovering the ``instances`` layer shows the level name, and Export writes the instance map
and the levels table beside the labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _dock_helpers import (  # noqa: F401 - fixtures
    IMAGE,
    configure,
    isolated,
    phantom_viewer,
    run,
    wait_qa,
)

from napari_spinesegdiff._dock.layers import INSTANCES_NAME, LABELS_NAME, MEASUREMENTS_NAME
from napari_spinesegdiff._dock.levels import LINE_NAMES, TABLE_MEASURES
from napari_spinesegdiff.io.readers import read_volume
from napari_spinesegdiff.phantom import make_phantom
from napari_spinesegdiff.report.table import read_levels_table

NAME_COLUMN, MID_HEIGHT = 0, 2 + [m for _h, m in TABLE_MEASURES].index("height_middle_mm")


def table_rows(w) -> list[list[str]]:
    t = w.review.levels_table
    return [[t.item(r, c).text() for c in range(t.columnCount())] for r in range(t.rowCount())]


def truth_name(levels, kind: str, row: float) -> str:
    """The phantom's name of the body or disc whose centre is nearest ``row`` (``L4/L5`` written ``L4-L5``)."""
    lev = min((lv for lv in levels if lv.kind == kind), key=lambda lv: abs(lv.row - row))
    return lev.name.replace("/", "-")


def renumber(qtbot, w, button) -> None:
    button.click()
    qtbot.waitUntil(lambda: not w.review.busy, timeout=60_000)


def test_review_lists_levels_renumbering_lines_hover_and_export(qtbot, phantom_viewer, tmp_path):
    from qtpy.QtCore import Qt

    viewer, w = phantom_viewer()
    configure(w, steps=2, ensemble=2, slices="5:8")
    assert run(qtbot, w) == "done"
    wait_qa(qtbot, w)
    image = viewer.layers[IMAGE]
    report = w.state.levels
    assert report is not None and report.error is None, report and report.error
    assert w.state.levels_current and report.inputs.source == "run"

    # the Review tab: every structure by its level name, the names the phantom's, top to bottom
    rows = table_rows(w)
    names = [r[NAME_COLUMN] for r in rows]
    assert "L4-L5 disc" in names and "L4 vertebra" in names and "canal at L3-L4" in names
    levels = image.metadata["levels"]
    table = w.review.levels_table
    checked = 0
    for r in range(table.rowCount()):
        name = table.item(r, NAME_COLUMN).text()
        where = table.item(r, NAME_COLUMN).data(Qt.ItemDataRole.UserRole)
        level, _, kind = name.partition(" ")
        if kind in ("disc", "vertebra"):
            assert level == truth_name(levels, "disc" if kind == "disc" else "body", where[1]), name
            checked += 1
    assert checked >= 10  # T12..L5 and the six discs
    order = [table.item(r, NAME_COLUMN).data(Qt.ItemDataRole.UserRole)[1] for r in range(table.rowCount())]
    assert order == sorted(order)

    # measurements with their intervals: the middle disc heights of the phantom as built, to about a voxel
    geometry = make_phantom(0).geometry
    for disc in ("L1-L2", "L3-L4", "L4-L5"):
        text = rows[names.index(f"{disc} disc")][MID_HEIGHT]
        value, _, half = text.partition(" ± ")
        assert half, text  # an interval from the two ensemble members
        built = geometry[disc.replace("-", "/")]["height_middle_mm"]
        assert abs(float(value) - built) < 1.2, (disc, text, built)
    ap = rows[names.index("canal at L3-L4")][2 + [m for _h, m in TABLE_MEASURES].index("ap_diameter_mm")]
    assert ap and 5.0 < float(ap.split()[0]) < 30.0

    # a click on a row goes to the structure
    r = names.index("L4-L5 disc")
    item = table.item(r, NAME_COLUMN)
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=table.visualItemRect(item).center())
    k, row_, col = item.data(Qt.ItemDataRole.UserRole)
    assert w.current_slice(image) == int(round(k))
    assert viewer.scene.camera.center[-2:] == pytest.approx(
        (image.translate[1] + row_ * image.scale[1], image.translate[2] + col * image.scale[2]))

    # the instances layer: SPIDER values over the segmented voxels, its features give the level name on hover
    inst = viewer.layers[INSTANCES_NAME]
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_allclose(inst.scale, labels.scale)
    np.testing.assert_array_equal(inst.data > 0, labels.data > 0)
    assert set(np.unique(inst.data)) >= {100, 202, 2}  # canal, L4-L5 (SPIDER: discs from the bottom), L4
    centre = tuple(int(round(c)) for c in report.instances.by_level("L4-L5").centroid)
    assert inst.data[centre] == 202
    status = inst.get_status(centre, world=False)["value"]
    assert "L4-L5 disc" in status and "Hm " in status, status

    # the measurements layer: one line per measured value, on its structure, as long as its value
    shapes = viewer.layers[MEASUREMENTS_NAME]
    expected = sum(1 for r_ in report.rows for m in LINE_NAMES if r_.get(m) is not None)
    assert len(shapes.data) == expected > 20
    np.testing.assert_allclose(shapes.scale, labels.scale)
    spacing = np.asarray(labels.scale)
    assert len(set(names)) == len(names)  # every structure once
    for vector, feat in zip(shapes.data, shapes.features.itertuples()):
        line = np.stack([vector[0], vector[0] + vector[1]])  # a vector: its start and its direction
        assert line.shape == (2, 3) and line[0, 0] == line[1, 0] and 5 <= line[0, 0] <= 7
        length = float(np.linalg.norm((line[1] - line[0])[1:] * spacing[1:]))
        if feat.measure.endswith("_mm"):
            assert length == pytest.approx(feat.value, abs=0.5), feat  # the drawn line is what was measured
            mid = np.round((line[0] + line[1]) / 2).astype(int)
            near = inst.data[mid[0], mid[1] - 1:mid[1] + 2, mid[2] - 1:mid[2] + 2]
            want = 100 if feat.measure == "ap_diameter_mm" else \
                report.instances.by_level(feat.level.split(" ")[0]).value
            assert want in near, feat  # the line runs through its structure
        assert feat.label.split(" ")[0] == LINE_NAMES[feat.measure]
    # the values are written beside the lines on request (the table and the instances' hover give them)
    from napari_spinesegdiff._dock.layers import VALUES_NAME

    assert shapes.visible and VALUES_NAME not in viewer.layers
    w.review.values_box.setChecked(True)
    values = viewer.layers[VALUES_NAME]
    np.testing.assert_allclose(values.data, np.asarray(shapes.data)[:, 0])
    np.testing.assert_allclose(values.scale, labels.scale)
    assert list(values.text.values) == list(shapes.features["label"])

    # renumbering: one level down, then back; the table, the layer values and features follow
    before = names
    renumber(qtbot, w, w.review.names_down)
    assert w.state.levels.shift == 1
    after = [r_[NAME_COLUMN] for r_ in table_rows(w)]
    assert "L5-S1 disc" in after and "L4-L5 disc" in after and after != before
    assert after[before.index("L4-L5 disc")] == "L5-S1 disc"
    assert after[before.index("L3 vertebra")] == "L4 vertebra"
    assert inst.data[centre] == 201  # the same voxels now L5-S1
    assert "L5-S1 disc" in inst.get_status(centre, world=False)["value"]
    assert "L5-S1 disc" in set(viewer.layers[MEASUREMENTS_NAME].features["level"])
    assert "L5-S1 disc" in set(viewer.layers[VALUES_NAME].features["level"])  # the values' layer follows
    assert "renumbered:+1" in w.state.levels.scan_flags
    renumber(qtbot, w, w.review.names_up)
    assert [r_[NAME_COLUMN] for r_ in table_rows(w)] == before and inst.data[centre] == 202

    # export: the instance map in the scan's geometry and the levels table, beside the labels
    renumber(qtbot, w, w.review.names_down)
    out = w.export_results(tmp_path / "export")
    assert [p.name for p in out] == ["phantom_T2w_spinesegdiff_labels.nii.gz",
                                     "phantom_T2w_spinesegdiff_uncertainty.nii.gz",
                                     "phantom_T2w_spinesegdiff_instances.nii.gz",
                                     "phantom_T2w_spinesegdiff_levels.csv", "phantom_T2w_spinesegdiff.json"]
    written = read_volume(out[2], kind="labels")
    np.testing.assert_allclose(written.affine, read_volume(out[0], kind="labels").affine)
    np.testing.assert_array_equal(written.canonical(), inst.data)
    table_back = read_levels_table(out[3])
    assert [(r_["structure"], r_["level"]) for r_ in table_back] == \
        [(r_["structure"], r_["level"]) for r_ in w.state.levels.rows]
    disc = next(r_ for r_ in table_back if r_["level"] == "L5-S1" and r_["structure"] == "disc")
    assert disc["value"] == 201 and disc["height_middle_mm"] == pytest.approx(
        next(r_ for r_ in w.state.levels.rows if r_["value"] == 201)["height_middle_mm"])
    side = json.loads(out[4].read_text())
    assert side["levels"]["shift"] == 1 and side["levels"]["intervals"] is True
    assert side["outputs"]["instances"] == str(out[2])


def test_edited_labels_are_measured_again_without_intervals(qtbot, phantom_viewer, tmp_path):
    viewer, w = phantom_viewer()
    configure(w, steps=2, ensemble=2, slices="5:8")
    assert run(qtbot, w) == "done"
    wait_qa(qtbot, w)
    first = w.state.levels
    labels = viewer.layers[LABELS_NAME]
    # an edit that removes the L4-L5 disc from the labels
    disc = first.instances.canonical == first.instances.by_level("L4-L5").value
    idx = np.nonzero(disc)
    labels.data_setitem(idx, 0)
    assert not w.state.levels_current
    out = w.export_results(tmp_path / "stale")
    assert len(out) == 3 and "levels were left out" in w.state.message  # never a report of other labels
    w.review.refresh_qa()
    wait_qa(qtbot, w)
    report = w.state.levels
    assert report is not first and w.state.levels_current and report.inputs.source == "labels"
    assert not report.has_intervals and "no intervals" in w.review.levels_summary.text()
    assert np.count_nonzero(report.instances.canonical[idx]) == 0
    assert len(w.export_results(tmp_path / "fresh")) == 5
