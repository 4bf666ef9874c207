"""The dock's Queue tab in a real napari viewer (pytest-qt, Xvfb) on a tiny cohort that ``spinesegdiff batch``
segmented (three small phantoms, one reoriented and one MetaImage, and one truncated file): the most
uncertain scan first, a failed scan listed but not opened, layers placed like the reader places them, a
decision with a note and an edit written beside the results, reopening restores them, next / previous and
their keys.  Plus the Qt-free queue tables."""

from __future__ import annotations

import csv
import getpass
import hashlib
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from _dock_helpers import dock, isolated, wait_qa  # noqa: F401 - fixtures

from napari_spinesegdiff._dock import queue_table as qt
from napari_spinesegdiff._dock.layers import LABELS_NAME, UNCERTAINTY_NAME
from napari_spinesegdiff._dock.queue import COLUMNS, NEXT_KEY, PREVIOUS_KEY, QUEUE_KEY
from napari_spinesegdiff.io.readers import read_volume

BATCH_FILES = ("results.csv", "results.parquet")
DECISION, FLAGS = COLUMNS.index("decision"), COLUMNS.index("QA flags")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """OUTDIR of a batch over a.nii.gz, site2/b.nii.gz (reoriented), c.mha and broken.nii.gz (truncated)."""
    from napari_spinesegdiff.cli import main
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    root = tmp_path_factory.mktemp("queue")
    scans = root / "scans"
    (scans / "site2").mkdir(parents=True)
    for seed, rel, turned in ((21, "a.nii.gz", False), (22, "site2/b.nii.gz", True), (23, "c.mha", False)):
        ph = make_phantom(seed=seed, spacing=(3.5, 1.0, 1.0), fov_mm=(14.0, 200.0, 160.0), random_orientation=turned)
        write_volume(ph.image.data, scans / rel, like=ph.image, kind="image")
    data = (scans / "a.nii.gz").read_bytes()
    (scans / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    out = root / "out"
    code = main(["batch", str(scans), "-o", str(out), "--steps", "2", "--ensemble", "1", "--slices", "mid",
                 "--no-progress", "--workers", "1"])
    assert code == 3  # one failed scan
    return out


def _results(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "results.parquet").to_pylist()


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _review_rows(out: Path) -> dict[str, dict]:
    with open(out / "review.csv", newline="") as fh:
        return {r["scan"]: r for r in csv.DictReader(fh)}


def _press(viewer, key: str) -> None:
    from napari.utils.key_bindings import coerce_keybinding

    viewer.keymap[coerce_keybinding(key)](viewer)


def test_queue_review_decide_edit_reopen_and_move(qtbot, make_napari_viewer, cohort, tmp_path):
    from napari_spinesegdiff._reader import read_layers

    rows = _results(cohort)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["uncertainty_score"])
    assert len(ok) == 3 and [r["scan"] for r in rows if r["status"] == "failed"] == ["broken"]
    batch_files = [cohort / f for f in BATCH_FILES] + [cohort / r[k] for r in ok for k in ("labels", "uncertainty")]
    before = _digest(batch_files)

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 4, 5), np.float32), name="mine")  # not the queue's: never touched
    w = dock(viewer)
    q = w.queue
    assert w.tabs.tabText(2) == "Queue"
    assert q.open_table(cohort / "results.csv") == 4
    table = [[q.table.item(r, c).text() for c in range(len(COLUMNS))] for r in range(q.table.rowCount())]
    assert [t[0] for t in table] == [r["scan"] for r in ok] + ["broken"]  # most uncertain first, failed last
    assert [float(t[2]) for t in table[:3]] == pytest.approx([r["uncertainty_score"] for r in ok], abs=1e-4)
    assert table[3][1] == "failed" and table[3][FLAGS].startswith("error: ")
    assert not q.open_row(3) and q.current is None  # a failed scan cannot be opened

    # as after a run: its probabilities and denoising steps kept, the Review tab's buttons to make them layers
    w.state.probabilities, w.state.trajectory = np.zeros((3, 2, 4, 4), np.float32), (np.zeros((1, 2, 4, 4)), {})
    w.state.result_changed.emit()
    assert w.review.probabilities_button.isEnabled() and w.review.trajectory_button.isEnabled()

    # the most uncertain scan, placed as the plugin's reader places it
    with qtbot.waitSignal(q.scan_opened, timeout=5000):
        assert q.open_row(0)
    first = ok[0]
    image, labels, unc = w.state.result_image, viewer.layers[LABELS_NAME], viewer.layers[UNCERTAINTY_NAME]
    # a batch's scan has no run's probabilities or denoising steps to make layers of
    assert not w.review.probabilities_button.isEnabled() and not w.review.trajectory_button.isEnabled()
    ref = read_layers(first["input"])[0][1]
    for layer in (image, labels, unc):
        np.testing.assert_allclose(layer.scale, ref["scale"])
        np.testing.assert_allclose(layer.translate, ref["translate"])
        assert layer.metadata[QUEUE_KEY] == first["scan"]
    np.testing.assert_array_equal(labels.data, read_volume(cohort / first["labels"], kind="labels").canonical())
    np.testing.assert_allclose(unc.data, read_volume(cohort / first["uncertainty"]).canonical(), atol=1e-6)
    assert viewer.layers["mine"] is not None
    wait_qa(qtbot, w)
    assert w.review.slice_table.rowCount() == len(w.state.segmented) > 0  # the Review tab works on it

    # an edit and a decision with a note, written beside the results
    k = sorted(w.state.segmented)[0]
    labels.data_setitem((np.array([k, k]), np.array([5, 6]), np.array([5, 5])), 3)
    edited = np.array(labels.data, copy=True)
    q.note.setText("disc painted at the top")
    assert q.decide("corrected")
    review = _review_rows(cohort)
    assert set(review) == {first["scan"]}
    r = review[first["scan"]]
    assert (r["decision"], r["note"], r["reviewer"]) == ("corrected", "disc painted at the top", getpass.getuser())
    assert datetime.fromisoformat(r["time"]).tzinfo is not None
    suffix = ".mha" if first["labels"].endswith(".mha") else ".nii.gz"
    assert r["labels_edited"] == "True" and r["edited_labels"] == f"review/{first['scan']}_labels_edited{suffix}"
    saved = read_volume(cohort / r["edited_labels"], kind="labels")
    np.testing.assert_array_equal(saved.canonical(), edited)
    np.testing.assert_allclose(saved.affine, read_volume(first["input"]).affine, atol=1e-5)
    assert qt.read_review(cohort)[first["scan"]]["decision"] == "corrected"  # the Parquet copy
    assert not [p for p in cohort.iterdir() if p.name.endswith(".tmp")]
    assert _digest(batch_files) == before  # the batch's files are untouched
    assert table[0][DECISION] == "" and q.table.item(0, DECISION).text() == "corrected (edited)"
    exported = w.export_results(tmp_path / "export")  # Export works on the queue scan
    np.testing.assert_array_equal(read_volume(exported[0], kind="labels").canonical(), edited)

    # next / previous (buttons and keys) replace the queue scan's layers only
    assert q.move(1) and q.current == 1 and image not in viewer.layers
    _press(viewer, NEXT_KEY)
    assert q.current == 2 and w.state.result_image.metadata[QUEUE_KEY] == ok[2]["scan"]
    assert not q.move(1) and q.current == 2  # the failed scan is skipped: the end
    assert sum(QUEUE_KEY in (lay.metadata or {}) for lay in viewer.layers) == 3
    assert "mine" in viewer.layers
    _press(viewer, PREVIOUS_KEY)
    assert q.current == 1
    viewer.layers[LABELS_NAME].data_setitem((np.array([k]), np.array([5]), np.array([5])), 1)
    assert not q.move(-1) and q.current == 1  # unsaved edits hold the first attempt back
    assert q.move(-1) and q.current == 0  # the second discards them
    np.testing.assert_array_equal(viewer.layers[LABELS_NAME].data, edited)  # the saved edits come back
    q.set_sort(qt.SORT_QA)
    flagged = [r["scan"] for r in ok if r["qa_flags"]] + [r["scan"] for r in ok if not r["qa_flags"]]
    assert [q.table.item(i, 0).text() for i in range(3)] == flagged
    assert q.items[q.current].scan == first["scan"]
    wait_qa(qtbot, w)

    # reopening the table in a new viewer restores the decision and the note
    viewer2 = make_napari_viewer()
    w2 = dock(viewer2)
    q2 = w2.queue
    assert q2.open_table(cohort) == 4
    row = q2.row_of(first["scan"])
    assert q2.table.item(row, DECISION).text() == "corrected (edited)"
    assert q2.open_row(row) and q2.note.text() == "disc painted at the top"
    np.testing.assert_array_equal(viewer2.layers[LABELS_NAME].data, edited)
    wait_qa(qtbot, w2)


def _item(scan, status="ok", score=None, flags=()):
    return qt.QueueItem(scan=scan, status=status, error="" if status == "ok" else "bad file.",
                        input=Path(f"/in/{scan}.nii.gz"), labels=Path(f"/out/{scan}_labels.nii.gz"),
                        uncertainty=Path(f"/out/{scan}_uncertainty.nii.gz"), sidecar=Path(f"/out/{scan}.json"),
                        score=score, flags=tuple(flags), vertebrae="whole", slices=range(1, 3))


def test_queue_tables_order_record_and_refuse(tmp_path):
    items = [_item("a", score=0.1), _item("b", score=0.3), _item("c", score=0.2, flags=["canal_short"]),
             _item("d", status="failed"), _item("e")]
    assert [i.scan for i in qt.sort_items(items)] == ["b", "c", "a", "e", "d"]
    assert [i.scan for i in qt.sort_items(items, qt.SORT_QA)] == ["c", "b", "a", "e", "d"]
    ordered = qt.sort_items(items)
    assert qt.step_row(ordered, None, 1) == 0 and qt.step_row(ordered, 3, 1) is None
    assert qt.step_row(ordered, None, -1) == 3  # "d" (failed, last) is skipped
    with pytest.raises(ValueError):
        qt.sort_items(items, "name")

    # a results CSV with empty cells, as the batch writes it
    from napari_spinesegdiff.batch import COLUMNS, write_results

    row = {c: None for c in COLUMNS}
    write_results(tmp_path, [{**row, "scan": "s/x", "status": "ok", "input": "/in/x.nii.gz",
                              "labels": "s/x_labels.mha", "uncertainty": "s/x_uncertainty.mha",
                              "uncertainty_score": 0.05, "qa_flags": "canal_short;levels:discs=3",
                              "slices": "2:5", "vertebrae": "split"},
                             {**row, "scan": "y", "status": "failed", "error": "Cannot read y.", "input": "/in/y"}])
    for name in BATCH_FILES:
        outdir, (x, y) = qt.read_results(tmp_path / name)
        assert outdir == tmp_path and x.labels == tmp_path / "s/x_labels.mha" and x.slices == range(2, 5)
        assert x.flags == ("canal_short", "levels:discs=3") and x.openable and x.vertebrae == "split"
        assert not y.openable and y.labels is None and y.score is None and y.error == "Cannot read y."
    assert qt.edited_labels_path(tmp_path, x) == tmp_path / "review" / "s" / "x_labels_edited.mha"
    assert qt.edit_target(tmp_path, x).name == "x_labels_edited.mha"
    sneaky = replace(x, labels=tmp_path / "review/s/x_labels_edited.mha")
    with pytest.raises(qt.QueueError):
        qt.edit_target(tmp_path, sneaky)
    with pytest.raises(qt.QueueError):
        qt.read_results(tmp_path / "nowhere")

    assert qt.read_review(tmp_path) == {}
    qt.record(tmp_path, "s/x", decision="accepted", note="fine")
    qt.record(tmp_path, "y", labels_edited=True, edited_labels="review/y_labels_edited.nii.gz")
    reviews = qt.record(tmp_path, "s/x", note="fine, checked twice")
    assert reviews["s/x"]["decision"] == "accepted" and reviews["s/x"]["note"] == "fine, checked twice"
    assert reviews["y"]["decision"] == "" and reviews["y"]["labels_edited"] is True
    assert qt.read_review(tmp_path) == reviews
    (tmp_path / "review.parquet").unlink()  # the CSV alone restores the same rows
    assert qt.read_review(tmp_path) == reviews
    with pytest.raises(ValueError):
        qt.record(tmp_path, "s/x", decision="maybe")
