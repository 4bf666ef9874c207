"""The first Run of a fresh dock in a real napari viewer (pytest-qt, Xvfb): the models are prepared once in a
thread when the dock opens and the run reuses them (also when Run is pressed while they are still loading), and
the Review tab's tables are filled when the run-finished signal fires."""

from __future__ import annotations

import time

import numpy as np
from _dock_helpers import (  # noqa: F401 - fixtures
    IMAGE,
    configure,
    dock,
    isolated,
    phantom_viewer,
    run,
    torch,
)

from napari_spinesegdiff import pipeline
from napari_spinesegdiff._dock import review as review_module
from napari_spinesegdiff._dock import run as run_module
from napari_spinesegdiff._dock import worker
from napari_spinesegdiff._dock.dock import REVIEW_TAB
from napari_spinesegdiff._dock.layers import LABELS_NAME, UNCERTAINTY_NAME, layer_volume
from napari_spinesegdiff._dock.qa import slice_table, structure_table


def _fresh_models(monkeypatch) -> list[tuple]:
    """Forget this process's loaded and warmed models (as in a new session); returns the list that records
    each warm-up's scan shape."""
    pipeline._load_models_cached.cache_clear()
    monkeypatch.setattr(worker, "_WARMED", set())
    warmed: list[tuple] = []
    real = worker.warm_up

    def recorded(volume, config, models):
        ran = real(volume, config, models)
        if ran:
            warmed.append(tuple(volume.shape))
        return ran

    monkeypatch.setattr(worker, "warm_up", recorded)
    return warmed


def _opened(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("spinesegdiff", "phantom_t2w")
    w = dock(viewer)
    w.segment.image.value = viewer.layers[IMAGE]
    configure(w)
    return viewer, w


def test_the_dock_prepares_the_models_once_and_the_run_reuses_them(qtbot, make_napari_viewer, monkeypatch):
    warmed = _fresh_models(monkeypatch)
    viewer, w = _opened(make_napari_viewer)
    with qtbot.waitSignal(w.models_ready, timeout=120_000):
        pass  # the preload starts by itself once the settings rest
    assert pipeline._load_models_cached.cache_info().misses == 1
    assert warmed == [viewer.layers[IMAGE].data.shape]
    assert w.state.message.startswith("Model ready.") and "CPU" in w.state.message
    assert w.preload() is None  # the same settings again: nothing new to prepare

    assert run(qtbot, w) == "done"
    assert pipeline._load_models_cached.cache_info().misses == 1  # the run loaded nothing itself
    assert len(warmed) == 1
    # the warm-up left no trace in the result: the dock's labels are the pipeline's for the same settings
    labels = viewer.layers[LABELS_NAME].data
    direct = pipeline.run(layer_volume(viewer.layers[IMAGE]), w.state.config)
    assert np.array_equal(labels[5:8], direct.canonical_labels[5:8])
    assert labels[5:8].any()


def test_a_run_pressed_while_the_models_load_waits_for_them_and_loads_nothing(qtbot, make_napari_viewer,
                                                                             monkeypatch):
    _fresh_models(monkeypatch)
    _viewer, w = _opened(make_napari_viewer)
    assert w.preload() is not None  # now, not after the settings rest
    assert run(qtbot, w) == "done"  # pressed while the preload holds the models' lock
    info = pipeline._load_models_cached.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # loaded by the preload only; the run found them


def test_qa_tables_are_filled_when_the_run_finished_signal_fires(qtbot, phantom_viewer, monkeypatch):
    # slow tables: a run that announced its end before they arrive cannot pass
    def slow_qa(*args):
        time.sleep(0.5)
        return worker.qa_in_thread(*args)

    for module in (run_module, review_module):  # wherever the tables are computed
        monkeypatch.setattr(module, "qa_in_thread", slow_qa, raising=False)
    viewer, w = phantom_viewer()
    at_finish = []

    def finished(outcome: str) -> None:
        review = w.review
        at_finish.append((outcome, review.structure_table.rowCount(), review.slice_table.rowCount(),
                          [review.slice_table.item(r, 0).text() for r in range(review.slice_table.rowCount())],
                          w.state.message, w.tabs.currentIndex()))

    w.run_finished.connect(finished)
    for slices in ("5:8", "9:11"):  # a first run, then one that merges into its layers
        configure(w, slices=slices)
        assert run(qtbot, w) == "done"
    labels, unc = viewer.layers[LABELS_NAME].data, viewer.layers[UNCERTAINTY_NAME].data
    segmented = sorted(w.state.segmented)
    assert segmented == [5, 6, 7, 9, 10]
    structures = structure_table(labels, unc, viewer.layers[LABELS_NAME].scale, w.state.label_names, segmented)
    first, second = at_finish
    assert first[0] == "done" and first[1] > 0 and first[2] == 3
    assert sorted(first[3]) == ["5", "6", "7"]
    outcome, n_structures, n_slices, rows, message, tab = second
    assert (outcome, n_structures, n_slices) == ("done", len(structures), len(slice_table(labels, unc, segmented)))
    assert sorted(int(r) for r in rows) == segmented
    assert message.startswith("Done in ") and tab == REVIEW_TAB


def test_opening_the_dock_builds_a_labels_and_a_vectors_layer_once_and_leaves_the_users_layers_as_they_were(
        qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("spinesegdiff", "phantom_t2w")
    user = viewer.add_labels(np.zeros(viewer.layers[IMAGE].data.shape, np.uint8), name="my labels")
    user.brush_size = 3
    user.paint((6, 40, 40), 2)
    painted = user.data.copy()
    viewer.layers.selection.active = viewer.layers[IMAGE]
    layers_before = list(viewer.layers)
    inserted, removed = [], []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    viewer.layers.events.removed.connect(lambda e: removed.append(e.value.name))

    w = dock(viewer)
    # the warm-up: one labels layer and one vectors layer in and out again (never drawn: within the dock's opening)
    assert inserted == removed == ["spinesegdiff warm-up", "spinesegdiff warm-up lines"]
    assert list(viewer.layers) == layers_before
    assert set(viewer.layers.selection) == {viewer.layers[IMAGE]}
    assert viewer.layers.selection.active is viewer.layers[IMAGE]
    assert w.segment.image.value is viewer.layers[IMAGE]
    np.testing.assert_array_equal(user.data, painted)
    user.undo()  # the user's undo history is untouched: the paint before the dock opened is undone
    assert not user.data.any()
    with qtbot.waitSignal(w.models_ready, timeout=120_000):
        pass  # the preload the dock started ends before the viewer closes
