"""The dock widget that napari opens: the Segment, Review and Queue tabs over a status line, and the wiring
between the panels, the run controller and the exporter through the one shared :class:`RunState`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QLabel, QTabWidget, QVBoxLayout, QWidget

from .export import Exporter
from .layers import ResultLayers, prepare_labels_code
from .navigation import current_slice, go_to
from .progress import LazyProgressBar
from .queue import QueuePanel
from .review import ReviewPanel
from .run import RunController
from .segment import SegmentPanel
from .state import RunState
from .worker import import_model_code

if TYPE_CHECKING:
    import napari

SEGMENT_TAB, REVIEW_TAB, QUEUE_TAB = 0, 1, 2
#: how long the settings must rest before the models they need are prepared (a few changes in a row: one preload)
PRELOAD_DELAY_MS = 300


class SpineSegDiffWidget(QWidget):
    """Dock widget: segment the chosen scan, watch the denoising, review the uncertainty, export.

    Parts: :attr:`state` (the shared run state), :attr:`segment` (Segment tab), :attr:`review` (Review
    tab), :attr:`queue` (Queue tab: a batch's scans to review), :attr:`controller` (runs), :attr:`layers`
    (result layers), :attr:`exporter` (export, provenance).
    """

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        prepare_labels_code(napari_viewer)  # before the collection import_model_code ends with
        import_model_code()
        self.state = RunState(napari_viewer, self)
        self.layers = ResultLayers(self.state)
        self.controller = RunController(self.state, self.layers, self)
        self.exporter = Exporter(self.state, self.layers, self)
        self.segment = SegmentPanel(self.state)
        self.review = ReviewPanel(self.state, self.layers)
        self.queue = QueuePanel(self.state, self.layers)
        #: Emitted on the GUI thread when a run ends: "done", "cancelled" or "failed".
        self.run_finished = self.state.run_finished
        #: Emitted when the QA tables have been refilled.
        self.qa_updated = self.review.qa_updated
        #: Emitted when a preload has the models of the Segment tab's settings ready.
        self.models_ready = self.state.models_ready

        self.tabs = QTabWidget()
        self.tabs.addTab(self.segment, "Segment")
        self.tabs.addTab(self.review, "Review")
        self.tabs.addTab(self.queue, "Queue")
        self.status = QLabel(self.state.message)
        self.status.setWordWrap(True)
        self.progress = LazyProgressBar()  # the run's denoiser passes; hidden when no run is going
        outer = QVBoxLayout(self)
        outer.addWidget(self.tabs)
        outer.addWidget(self.progress)
        outer.addWidget(self.status)

        self.segment.run_button.changed.connect(self.run)
        self.segment.cancel_button.changed.connect(self.cancel)
        self.review.export_requested.connect(lambda: self.export_results())
        self.queue.scan_opened.connect(lambda _scan: self.review.refresh_qa())
        self.state.message_changed.connect(self.status.setText)
        self.state.progress_changed.connect(self.progress.set_progress)
        self.state.result_ready.connect(lambda: self.tabs.setCurrentIndex(REVIEW_TAB))

        # the models (and their first run on the chosen scan) are prepared in a thread as soon as the dock opens
        # and again when a setting they depend on changes, so that the first Run does not wait for them
        self._preload_timer = QTimer(self)
        self._preload_timer.setSingleShot(True)
        self._preload_timer.timeout.connect(self.preload)
        s = self.segment
        for control in (s.image, s.checkpoint, s.prior, s.device, s.slice_mode, s.batch_slices, s.ensemble):
            control.changed.connect(lambda _value=None: self._preload_timer.start(PRELOAD_DELAY_MS))
        self._preload_timer.start(0)  # at the next turn of the event loop, once the dock is shown

    @property
    def is_running(self) -> bool:
        return self.state.is_running

    def run(self, _value=None):
        """Start a run of the Segment tab's settings; returns the worker (``None`` when refused)."""
        if self.state.is_running:
            return None
        request = self.segment.request()
        if request is None:
            return None
        return self.controller.start(request)

    def preload(self, _value=None):
        """Prepare the models of the Segment tab's settings in a thread (loaded, then run once on the chosen scan):
        the run controller's preload; returns its worker (``None`` when there is nothing new to prepare)."""
        self._preload_timer.stop()
        job = self.segment.preload_request()
        if job is None or self.state.is_running:
            return None
        return self.controller.preload(*job)

    def cancel(self, _value=None) -> None:
        """Stop the run at its next denoising step."""
        self.controller.cancel()

    def export_results(self, folder: str | Path | None = None) -> list[Path]:
        return self.exporter.export_results(folder)

    def provenance(self, labels_path: Path | None = None, uncertainty_path: Path | None = None) -> dict[str, Any]:
        return self.exporter.provenance(labels_path, uncertainty_path)

    def current_slice(self, image) -> int:
        return current_slice(self.viewer, image)

    def go_to(self, image, position, center: bool = True) -> None:
        go_to(self.viewer, image, position, center)
