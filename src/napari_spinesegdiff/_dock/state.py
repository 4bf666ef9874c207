"""The one run state that the dock's panels share.

:class:`RunState` holds the image being segmented, the run's configuration, the result behind the result
layers and the run status, and announces every change with a Qt signal.  Panels read it and connect to
its signals; none of them reaches into another panel's widgets.  :class:`ActiveRun` is what one run shares
between the GUI thread and its worker thread; :class:`RunRequest` is what the Segment panel asks to run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal

from ..config import SegmentationConfig
from ..io.volume import Volume

#: Run status values of :attr:`RunState.status`.
IDLE, RUNNING, CANCELLING = "idle", "running", "cancelling"


@dataclass(frozen=True)
class RunRequest:
    """A checked request to segment (from the Segment panel): the image layer, its pipeline input, the
    configuration, the labels prior (or ``None``) and how often to stream."""

    image: Any
    volume: Volume
    config: SegmentationConfig
    prior: np.ndarray | None
    stream_every: int


@dataclass
class ActiveRun:
    """What one run shares between the GUI thread and its worker."""

    image: Any
    config: SegmentationConfig
    stream_every: int
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0  # written by the worker
    total: int = 0
    pipeline_gen: Any = None
    cancelled: bool = False
    done_at_cancel: int | None = None
    completed: bool = False
    error: str | None = None
    denoise_layer: Any = None
    canvas_shown: bool = False  # the run's first streamed step has shown the live canvas
    trajectory_shape: tuple[int, ...] | None = None  # (frames, slices, rows, columns), set when the run streams
    trajectory: np.ndarray | None = None  # allocated by the worker before its first frame
    frames_used: int = 0
    batch_counts: dict[int, int] = field(default_factory=dict)
    levels: Any = None  # the result's level report (levels.LevelReport), computed by the worker after the run

    @property
    def outcome(self) -> str:
        """How the run ended: "done", "failed" or "cancelled"."""
        return "done" if self.completed else ("failed" if self.error else "cancelled")


@dataclass(frozen=True)
class ResultInfo:
    """What the state keeps of a shown result (its labels and uncertainty live in the layers only; the class
    probabilities and the trajectory in :attr:`RunState.probabilities` and :attr:`RunState.trajectory`)."""

    slices: tuple[int, ...]
    channels: tuple[str, ...]  # the model's channel names (the P(...) layers)
    label_names: dict[int, str]  # written label -> name (the labels layer)
    provenance: dict[str, Any]


class RunState(QObject):
    """The dock's shared state: current run, last result, what the result layers hold, run status."""

    #: The run status changed (:data:`IDLE`, :data:`RUNNING` or :data:`CANCELLING`).
    status_changed = Signal(str)
    #: The status line's text changed.
    message_changed = Signal(str)
    #: A run's progress: denoiser passes done and in all (0, 0 when no run is going).
    progress_changed = Signal(int, int)
    #: A run ended, on the GUI thread: "done", "cancelled" or "failed".
    run_finished = Signal(str)
    #: The result layers now hold a new (or merged) result: redraw what derives from them (the overlay).
    result_changed = Signal()
    #: A run's result is fully shown, its QA tables filled: time to review it (the Review tab).
    result_ready = Signal()
    #: The QA tables of a run's result were computed in a thread: (structures, slices) for the Review panel.
    qa_ready = Signal(object)
    #: A preload finished: the models of the Segment tab's settings are loaded (and were run once on the scan).
    models_ready = Signal()
    #: The level report shown changed (:attr:`levels`: a run's, a renumbering, one from the labels layer).
    levels_changed = Signal()

    def __init__(self, viewer, parent: QObject | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.status = IDLE
        self.message = "Ready."
        self.image = None  # image layer of the current (or last) run
        self.config: SegmentationConfig | None = None  # configuration of the current (or last) run
        self.run: ActiveRun | None = None  # the current (or last) run
        self.result: ResultInfo | None = None  # the last result shown
        self.result_image = None  # image layer the result layers belong to
        self.label_names: dict[int, str] = {}  # written label -> name, of the result layers
        self.segmented: set[int] = set()  # canonical slices the result layers hold results for
        self.runs: list[dict[str, Any]] = []  # provenance of each run behind the result layers
        self.original_labels: np.ndarray | None = None  # the labels as the last run left them
        self.paint_events = 0  # edits of the labels layer since then
        self.stream_updates = 0  # streamed steps shown in the last run
        self.max_update_ms = 0.0  # longest GUI-thread handling of one streamed step in the last run
        self.levels = None  # the level report behind the Review tab's levels table and the level layers
        self.levels_for = None  # the ``original_labels`` it describes (``None``: none)
        self.levels_edits = 0  # the edits of the labels layer it includes (``paint_events`` when it was made)
        self.probabilities: np.ndarray | None = None  # the result's class probabilities (C, slices, rows, columns)
        self.channels: tuple[str, ...] = ()  # their channel names
        self.trajectory: tuple[np.ndarray, dict] | None = None  # the last run's streamed frames and their geometry

    @property
    def is_running(self) -> bool:
        return self.status != IDLE

    def set_status(self, status: str) -> None:
        self.status = status
        self.status_changed.emit(status)

    def say(self, text: str) -> None:
        """Show ``text`` on the status line."""
        self.message = text
        self.message_changed.emit(text)

    def refuse(self, text: str) -> None:
        """Show a refusal (one sentence) on the status line and as a napari error notification."""
        from napari.utils.notifications import show_error

        self.say(text)
        show_error(text)

    def begin(self, run: ActiveRun) -> None:
        """A run starts."""
        self.run, self.image, self.config = run, run.image, run.config
        self.stream_updates = 0
        self.max_update_ms = 0.0
        self.set_status(RUNNING)

    def finish(self, outcome: str) -> None:
        """The run has ended and its result (if any) is shown."""
        self.set_status(IDLE)
        self.run_finished.emit(outcome)

    def adopt(self, image, result, label_names: dict[int, str], merged: bool) -> None:
        """The result layers now hold the ``SegmentationResult`` of ``image`` (merged into the earlier runs'
        slices, or not)."""
        if not merged:
            self.segmented, self.runs = set(), []
        self.result = ResultInfo(tuple(int(i) for i in result.slices), tuple(result.class_names), dict(label_names),
                                 result.provenance)
        self.result_image, self.label_names = image, dict(label_names)
        self.segmented |= {int(i) for i in result.slices}
        self.runs.append(result.provenance)

    def labels_reset(self, labels: np.ndarray) -> None:
        """The labels layer was (re)written by a run: edits are counted from here."""
        self.original_labels = np.array(labels, copy=True)
        self.paint_events = 0

    def count_edit(self, _event=None) -> None:
        self.paint_events += 1

    def labels_token(self) -> tuple:
        """What the labels layer holds now, for a level report computed from it: (the labels the last run or scan
        left, the edits since)."""
        return (self.original_labels, self.paint_events)

    def show_levels(self, report, token: tuple | None = None) -> None:
        """Show ``report`` (a ``levels.LevelReport``) computed from the labels of ``token`` (:meth:`labels_token`
        when its inputs were taken; default: now); the Review tab and the level layers follow it."""
        self.levels = report
        self.levels_for, self.levels_edits = token if token is not None else self.labels_token()
        self.levels_changed.emit()

    @property
    def levels_current(self) -> bool:
        """Whether the level report describes the labels layer as it is (no run, scan or edit since)."""
        return (self.levels is not None and self.levels_for is not None and self.levels_for is self.original_labels
                and self.levels_edits == self.paint_events)
