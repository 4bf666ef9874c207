"""The dock's Segment panel in a real napari viewer (pytest-qt, Xvfb): refusals before a run, settings that
persist between docks, tooltips, and the vertebrae control (whole / split) reaching the run."""

from __future__ import annotations

import json

from _dock_helpers import (  # noqa: F401 - fixtures
    configure,
    dock,
    isolated,
    phantom_viewer,
    run,
)

from napari_spinesegdiff._dock.layers import LABELS_NAME
from napari_spinesegdiff._dock.segment import PERSISTED, TIPS, checkpoint_info, settings_path
from napari_spinesegdiff.labelscheme import ChannelRoles


def test_class_count_mismatch_is_refused_before_the_run(qtbot, phantom_viewer):
    viewer, w = phantom_viewer()
    assert w.segment.num_classes.value == 4  # prefilled from the shipped checkpoint (v4: four channels)
    w.segment.num_classes.value = 5
    assert w.run() is None
    assert "5 classes" in w.status.text() and "has 4" in w.status.text()
    assert LABELS_NAME not in viewer.layers and not w.is_running


def test_settings_persist_between_widgets(qtbot, phantom_viewer, make_napari_viewer):
    viewer, w = phantom_viewer()
    configure(w, steps=2, ensemble=2, slices="6", seed=7)
    w.segment.prior.value = "none"
    w.segment.baseline_weight.value = 0.25
    assert w.segment.build_config().baseline_weight == 0.25
    assert run(qtbot, w) == "done"
    saved = json.loads(settings_path().read_text())
    assert saved["steps"] == 2 and saved["seed"] == 7 and saved["prior"] == "none"
    other = dock(make_napari_viewer()).segment
    assert (other.steps.value, other.seed.value, other.slice_range.value) == (2, 7, "6")
    assert other.baseline_weight.value == 0.25
    assert other.prior.value == "none" and other.device.value == "cpu"


def test_every_control_has_its_tooltip(make_napari_viewer):
    s = dock(make_napari_viewer()).segment
    controls = {"image": s.image, "checkpoint": s.checkpoint, "num_classes": s.num_classes,
                "vertebrae": s.vertebrae, "prior": s.prior, "steps": s.steps, "t_start": s.t_start,
                "baseline_weight": s.baseline_weight, "ensemble": s.ensemble, "batch_slices": s.batch_slices,
                "slices": s.slice_mode, "slice_range": s.slice_range, "device": s.device, "seed": s.seed,
                "stream_every": s.stream_every}
    assert set(controls) == set(TIPS)
    for key, control in controls.items():
        assert control.tooltip == TIPS[key], key
    assert TIPS["vertebrae"] == ("whole: label 2 = the whole vertebra (body and posterior elements), as in SPIDER; "
                                 "split: 2 = vertebral body, 4 = posterior elements (needs a v4 model)")
    assert s.run_button.tooltip and s.cancel_button.tooltip
    assert set(PERSISTED) <= set(s.settings())


def test_vertebrae_split_reaches_the_run_persists_and_a_model_that_cannot_split_says_so(
        qtbot, phantom_viewer, make_napari_viewer):
    from napari.utils.notifications import notification_manager

    viewer, w = phantom_viewer()
    s = w.segment
    assert s.vertebrae.value == "whole" and s.build_config().vertebrae == "whole"  # the default
    configure(w, steps=2, slices="6")
    s.vertebrae.value = "split"
    assert s.build_config().vertebrae == "split"
    seen = len(notification_manager.records)
    outcome = run(qtbot, w)
    assert w.state.config.vertebrae == "split"  # the configuration that reached the run
    assert json.loads(settings_path().read_text())["vertebrae"] == "split"
    assert dock(make_napari_viewer()).segment.vertebrae.value == "split"
    if ChannelRoles.of(checkpoint_info(None)["class_names"]).can_split:  # a v4 shipped model
        assert outcome == "done"
        labels = viewer.layers[LABELS_NAME]
        assert 4 in labels.data
        assert list(labels.features["class"])[2] == "vertebral body"
    else:  # the pipeline refuses in one sentence: on the status line and as a notification, no crash
        assert outcome == "failed"
        messages = [str(n.message) for n in notification_manager.records[seen:]]
        sentence = [m for m in messages if "cannot split vertebrae" in m]
        assert len(sentence) == 1, messages
        assert sentence[0].endswith(".")
        assert w.status.text() == f"Failed: {sentence[0]}"
        assert LABELS_NAME not in viewer.layers
        assert s.run_button.enabled and not w.is_running
