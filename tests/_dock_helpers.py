"""Shared fixtures and helpers of the dock tests (tests/test_dock_*.py): a napari viewer with the phantom
and the dock, tiny run settings, running and waiting.  Runs are tiny (2-4 steps, ensemble 2, a few slices)
so each test takes seconds on a CPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
napari = pytest.importorskip("napari")

from napari_spinesegdiff._dock import SpineSegDiffWidget  # noqa: E402
from napari_spinesegdiff.evaluation.metrics import dice  # noqa: E402

# Mean foreground Dice the shipped model must reach on the phantom's segmented slices with the test's fast
# settings (the shipped model reaches about 0.97 on phantoms with the defaults).
DICE_FLOOR = 0.85

IMAGE = "phantom T2w"
TRUTH = "phantom truth"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Settings in a fresh folder, one torch thread."""
    monkeypatch.setenv("SPINESEGDIFF_CONFIG_DIR", str(tmp_path / "config"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dock(viewer) -> SpineSegDiffWidget:
    _dw, widget = viewer.window.add_plugin_dock_widget("spinesegdiff", "SpineSegDiff")
    assert isinstance(widget, SpineSegDiffWidget)
    return widget


def configure(w: SpineSegDiffWidget, *, steps=3, ensemble=2, slices="5:8", batch=2, every=1, seed=0):
    s = w.segment
    s.steps.value, s.ensemble.value, s.batch_slices.value = steps, ensemble, batch
    s.slice_mode.value, s.slice_range.value = "range", slices
    s.stream_every.value, s.device.value, s.seed.value = every, "cpu", seed
    s.prior.value = "baseline"


@pytest.fixture
def phantom_viewer(make_napari_viewer):
    def make(show: bool = False):
        viewer = make_napari_viewer(show=show)
        viewer.open_sample("spinesegdiff", "phantom_t2w")
        w = dock(viewer)
        w.segment.image.value = viewer.layers[IMAGE]
        configure(w)
        return viewer, w

    return make


def run(qtbot, w: SpineSegDiffWidget, timeout: int = 120_000) -> str:
    with qtbot.waitSignal(w.run_finished, timeout=timeout) as blocker:
        assert w.run() is not None
    wait_qa(qtbot, w)
    return blocker.args[0]


def wait_qa(qtbot, w: SpineSegDiffWidget) -> None:
    qtbot.waitUntil(lambda: not w.review.busy, timeout=30_000)


def mean_dice(pred: np.ndarray, truth: np.ndarray, slices) -> float:
    scores = [dice(pred[slices] == c, truth[slices] == c) for c in (1, 2, 3) if (truth[slices] == c).any()]
    return float(np.mean(scores))


def slice_axis_index(viewer) -> int:
    return viewer.dims.ndim - 3
