"""The Queue panel: review a cohort that ``spinesegdiff batch`` segmented, scan by scan.

It opens a batch's results table, lists the scans most uncertain first (or those with QA flags first), and
opens one scan at a time through the plugin's own reader (the scan, its labels and its uncertainty map,
placed in millimetres).  The opened scan becomes the dock's current result: its labels and uncertainty are
the ``spine labels`` and ``uncertainty`` layers (replacing the previous queue scan's, or an earlier run's),
so the Review tab's tables and overlay and the Export button work on it.  Other layers are left alone.

The reviewer marks the scan accepted, corrected or rejected with a note, and saves edited labels; both go
beside the results only (see :mod:`.queue_table`), never over the batch's files.  Next / previous (buttons,
``Shift-N`` / ``Shift-P`` in the viewer) move through the scans that can be opened.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .. import __version__
from ..labelscheme import label_names
from .layers import LABEL_COLORS, LABELS_NAME, OUTPUT_KEY, UNCERTAINTY_NAME, ResultLayers
from .navigation import go_to
from .qa import MAX_UNCERTAINTY
from .queue_table import (
    DECISIONS,
    LEVEL_SORTS,
    REVIEW_CSV,
    SORTS,
    QueueError,
    QueueItem,
    edit_target,
    labels_to_open,
    read_results,
    read_review,
    read_sidecar,
    record,
    sentence,
    sort_items,
    step_row,
    summary,
)
from .state import RunState

NEXT_KEY, PREVIOUS_KEY = "Shift-N", "Shift-P"
QUEUE_KEY = "spinesegdiff_queue_scan"  # metadata of the layers the queue opened: the scan's name
COLUMNS = ["scan", "status", "uncertainty", "decision", "QA flags"]  # the last one stretches
SHOWN = 40  # characters of a cell shown (errors and long flag lists in full in the tooltip)
TIPS = {"accepted": "The labels are right as the batch made them.",
        "corrected": "The labels needed corrections (unsaved edits are saved first).",
        "rejected": "The scan or its labels cannot be used."}


def _style(labels, unc, names: dict[int, str], tag: dict) -> None:
    """Give the opened labels and uncertainty layers the dock's result names, colours and metadata."""
    import pandas as pd

    labels.name, unc.name = LABELS_NAME, UNCERTAINTY_NAME
    labels.metadata, unc.metadata = {**labels.metadata, **tag}, {**unc.metadata, **tag}
    labels.colormap, labels.opacity = dict(LABEL_COLORS), 0.5
    labels.features = pd.DataFrame({"index": [0, *names], "class": ["background", *names.values()]})
    unc.colormap, unc.contrast_limits = "inferno", (0.0, MAX_UNCERTAINTY)
    unc.blending, unc.opacity = "additive", 0.6


def _bind_keys(panel: QueuePanel) -> None:
    """Shift-N / Shift-P in the viewer open the next / previous scan (a weak reference: the viewer's keymap
    does not keep a closed dock alive)."""
    ref = weakref.ref(panel)

    def step(delta: int):
        def go(_viewer):
            if ref() is not None:
                ref().move(delta)
        return go

    panel.viewer.bind_key(NEXT_KEY, step(1), overwrite=True)
    panel.viewer.bind_key(PREVIOUS_KEY, step(-1), overwrite=True)


class QueuePanel(QWidget):
    """The Queue tab: a batch's scans in review order, open one, decide, save edits, move on."""

    #: Emitted with the scan's name once its layers are shown and the run state points at them.
    scan_opened = Signal(str)
    #: Emitted with the scan's name and the decision once it is written to the review table.
    decided = Signal(str, str)

    def __init__(self, state: RunState, layers: ResultLayers, parent: QWidget | None = None):
        super().__init__(parent)
        self.state, self.layers = state, layers
        self.outdir: Path | None = None
        self.items: list[QueueItem] = []  # in the table's order
        self.reviews: dict[str, dict] = {}  # scan -> review row
        self.current: int | None = None  # row of the open scan
        self._image = None  # image layer of the open scan
        self._opened_labels: np.ndarray | None = None  # its labels as opened or last saved
        self._from_edit = False  # those labels are an earlier "Save edits"
        self._warned: str | None = None  # scan whose opening was held back once for unsaved edits
        self._build()
        _bind_keys(self)
        state.status_changed.connect(lambda _s: self._enable())

    @property
    def viewer(self):
        return self.state.viewer

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        self.open_table_button = self._button("Open results table...", "results.parquet or results.csv of "
                                              "'spinesegdiff batch' (decisions go to review.csv beside it).",
                                              self.choose_table, top)
        self.table_label = QLabel("no table")
        top.addWidget(self.table_label, 1)
        self.sort = QComboBox()
        self.sort.addItems(list(SORTS))
        self.sort.setToolTip("uncertainty: the most uncertain scan first. QA flags first: scans with QA flags, "
                             "then the most uncertain. Stenosis / height loss / slip / level doubt first: the "
                             "scans with that finding of the level report first, the narrowest canal, worst "
                             "Genant grade, largest slip or least sure level name leading (the finding is shown "
                             "after the QA flags). Failed scans are listed last and cannot be opened.")
        self.sort.currentTextChanged.connect(lambda mode: self.set_sort(mode))
        top.addWidget(self.sort)
        lay.addLayout(top)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setToolTip("Double-click a scan to open it with its labels and uncertainty map.")
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        lay.addWidget(self.table, 1)
        nav = QHBoxLayout()
        self.previous_button = self._button("< Previous", f"Open the previous scan ({PREVIOUS_KEY} in the viewer).",
                                            lambda: self.move(-1), nav)
        self.open_button = self._button("Open", "Open the selected scan (or double-click it).",
                                        self._open_selected, nav)
        self.next_button = self._button("Next >", f"Open the next scan ({NEXT_KEY} in the viewer).",
                                        lambda: self.move(1), nav)
        lay.addLayout(nav)
        self.note = QLineEdit()
        self.note.setPlaceholderText("note (saved with the decision)")
        lay.addWidget(self.note)
        act = QHBoxLayout()
        self.decision_buttons = {d: self._button(d.capitalize(), f"{TIPS[d]} Written at once to {REVIEW_CSV} "
                                                 "and review.parquet beside the results.",
                                                 lambda d=d: self.decide(d), act) for d in DECISIONS}
        self.save_button = self._button("Save edits", "Write the edited labels to OUTDIR/review/<scan>_labels_edited "
                                        "(never over the batch's labels) and record them in the review table.",
                                        self.save_edits, act)
        lay.addLayout(act)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        lay.addWidget(self.summary)
        self._enable()

    def _button(self, text: str, tip: str, slot, row: QHBoxLayout) -> QPushButton:
        b = QPushButton(text)
        b.setToolTip(tip)
        b.clicked.connect(lambda _=False: slot())
        row.addWidget(b)
        return b

    def _enable(self) -> None:
        idle, has, open_ = not self.state.is_running, bool(self.items), self.current is not None
        for b in (self.previous_button, self.open_button, self.next_button):
            b.setEnabled(idle and has)
        for b in (*self.decision_buttons.values(), self.save_button):
            b.setEnabled(open_)

    # ------------------------------------------------------------------------------------------- the list

    def choose_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Results table", "", "Results tables (*.parquet *.csv)")
        if path:
            self.open_table(path)

    def open_table(self, path: str | Path) -> int:
        """Read a results table (or its folder) and the review table beside it; returns the number of scans."""
        try:
            outdir, items = read_results(path)
            reviews = read_review(outdir)
        except QueueError as exc:
            self.state.refuse(str(exc))
            return 0
        keep = self.items[self.current].scan if self.current is not None and self.outdir == outdir else None
        self.outdir, self.reviews, self.items, self.current = outdir, reviews, items, None
        self.table_label.setText(str(outdir))
        self.set_sort(self.sort.currentText(), keep)
        self.state.say(f"Queue: {summary(self.items, self.reviews)}")
        return len(items)

    def set_sort(self, mode: str, keep: str | None = None) -> None:
        """Order the list (``"uncertainty"`` or ``"QA flags first"``), keeping the open scan marked."""
        if keep is None and self.current is not None:
            keep = self.items[self.current].scan
        if self.sort.currentText() != mode:
            self.sort.setCurrentText(mode)  # comes back here through the signal
            return
        self.items = sort_items(self.items, mode)
        self.current = self.row_of(keep) if keep is not None else None
        self._refill()

    def row_of(self, scan: str) -> int | None:
        return next((i for i, it in enumerate(self.items) if it.scan == scan), None)

    def _refill(self) -> None:
        self.table.setRowCount(len(self.items))
        for r, it in enumerate(self.items):
            review = self.reviews.get(it.scan, {})
            flags = it.flags_text if it.openable else f"error: {it.error}"
            by = LEVEL_SORTS.get(self.sort.currentText())
            finding = it.finding(by)[0] if by else ""
            if finding and it.openable:
                flags = f"{flags} | {finding}" if flags else finding
            decision = review.get("decision", "") + (" (edited)" if review.get("labels_edited") else "")
            cells = [it.scan, it.status, "" if it.score is None else f"{it.score:.4f}", decision, flags]
            for c, text in enumerate(cells):
                cell = QTableWidgetItem(text if len(text) <= SHOWN else text[:SHOWN - 3] + "...")
                cell.setToolTip((review.get("note") or text) if c == 3 else (it.error or text))
                if not it.openable:
                    cell.setFlags(cell.flags() & ~Qt.ItemFlag.ItemIsEnabled)
                self.table.setItem(r, c, cell)
        self.table.resizeColumnsToContents()
        if self.items:
            self.table.selectRow(self.current if self.current is not None else 0)
        self.summary.setText(summary(self.items, self.reviews))
        self._enable()

    # ------------------------------------------------------------------------------------ opening a scan

    def _open_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        self.open_row(rows[0].row() if rows else (self.current or 0))

    def move(self, delta: int) -> bool:
        """Open the next (``delta=1``) or previous (``-1``) scan that can be opened."""
        row = step_row(self.items, self.current, delta)
        if row is None:
            self.state.say("End of the queue." if delta > 0 else "Start of the queue.")
            return False
        return self.open_row(row)

    def queue_labels(self):
        """The ``spine labels`` layer when it holds the open queue scan, else ``None``."""
        labels = self.layers.find(LABELS_NAME)
        if labels is None or self.current is None:
            return None
        return labels if (labels.metadata or {}).get(QUEUE_KEY) == self.items[self.current].scan else None

    def unsaved_edits(self) -> bool:
        """The labels differ from what was opened or last saved (an earlier run's: from what the run wrote)."""
        labels = self.queue_labels()
        base = self._opened_labels if labels is not None else self.state.original_labels
        labels = labels if labels is not None else self.layers.find(LABELS_NAME)
        if labels is None or base is None or base.shape != labels.data.shape:
            return False
        return not np.array_equal(np.asarray(labels.data), base)

    def open_row(self, row: int, discard: bool = False) -> bool:
        """Open the scan in ``row`` with its labels (its saved edits, if any) and uncertainty, replacing the
        previous queue scan's layers.  Unsaved edits hold the first attempt back (``discard`` skips that)."""
        if not 0 <= row < len(self.items) or self.outdir is None:
            return False
        it = self.items[row]
        if not it.openable:
            self.state.refuse(f"{it.scan} has no result to open ({it.status}): {it.error}")
            return False
        if self.state.is_running:
            self.state.refuse("Wait for the run to end (or cancel it) before opening a queue scan.")
            return False
        if not discard and self._warned != it.scan and self.unsaved_edits():
            self._warned = it.scan
            self.state.refuse(f"The labels have unsaved edits: press Save edits, or open {it.scan} again to "
                              "discard them.")
            return False
        self._warned = None
        labels_file = labels_to_open(self.outdir, it, self.reviews)
        missing = [p for p in (it.input, labels_file, it.uncertainty) if not Path(p).exists()]
        if missing:
            self.state.refuse(f"Cannot open {it.scan}: {missing[0]} is missing.")
            return False
        new: list = []
        try:
            for path in (it.input, labels_file, it.uncertainty):
                new += list(self.viewer.open(str(path), plugin="spinesegdiff"))
            if len(new) != 3 or len({tuple(layer.data.shape) for layer in new}) != 1:
                raise ValueError("the scan, its labels and its uncertainty map do not match")
        except Exception as exc:  # noqa: BLE001 - the reader's refusals (and odd files) are one sentence
            for layer in new:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            self.state.refuse(f"Cannot open {it.scan}: {sentence(exc)}")
            return False
        self._show(row, it, *new, from_edit=labels_file != it.labels)
        return True

    def _show(self, row: int, it: QueueItem, image, labels, unc, from_edit: bool) -> None:
        if self._image is not None and self._image in self.viewer.layers:
            self.viewer.layers.remove(self._image)
        for name in (LABELS_NAME, UNCERTAINTY_NAME):
            self.layers.remove(name)
        names = label_names(it.vertebrae if it.vertebrae in ("whole", "split") else "whole")
        prov = read_sidecar(it)
        image.metadata = {**image.metadata, QUEUE_KEY: it.scan}
        _style(labels, unc, names, {OUTPUT_KEY: True, QUEUE_KEY: it.scan, "source_image": image.name,
                                    "provenance": prov})
        labels.events.paint.connect(self.state.count_edit)
        slices = list(it.slices) if it.slices is not None else list(range(image.data.shape[0]))
        self.state.adopt(image, SimpleNamespace(slices=slices, class_names=(), provenance=prov), names, merged=False)
        self.state.probabilities, self.state.trajectory = None, None  # a run's, not this scan's
        self.state.labels_reset(np.asarray(labels.data))
        self._image, self.current, self._from_edit = image, row, from_edit
        self._opened_labels = np.array(labels.data, copy=True)
        self.state.result_changed.emit()  # the Review tab redraws its overlay
        self.viewer.layers.selection.active = labels
        self.viewer.reset_view()
        mid = slices[len(slices) // 2] if slices else 0
        go_to(self.viewer, image, (mid, (image.data.shape[1] - 1) / 2, (image.data.shape[2] - 1) / 2), center=False)
        self.note.setText(self.reviews.get(it.scan, {}).get("note", ""))
        self.table.selectRow(row)
        self._enable()
        score = "-" if it.score is None else f"{it.score:.4f}"
        self.state.say(f"Queue: {it.scan} ({row + 1} of {len(self.items)}), uncertainty score {score}, "
                       + (f"QA flags {it.flags_text}." if it.flags else "no QA flag."))
        self.scan_opened.emit(it.scan)

    # ------------------------------------------------------------------------------------ decisions, edits

    def save_edits(self) -> Path | None:
        """Write the open scan's edited labels to ``OUTDIR/review/<scan>_labels_edited.<ext>`` in the scan's
        geometry and record them in the review table; returns the path (``None`` when nothing was written)."""
        from ..io.writers import like_from_metadata, write_canonical

        labels = self.queue_labels()
        if labels is None or self.outdir is None:
            self.state.refuse("Open a queue scan before saving edits.")
            return None
        it = self.items[self.current]
        data = np.asarray(labels.data)
        if not self._from_edit and np.array_equal(data, self._opened_labels):
            self.state.say(f"{it.scan}: no edits to save.")
            return None
        like = next((v for v in (like_from_metadata(self._image.metadata), like_from_metadata(labels.metadata))
                     if v is not None and v.orientation.canonical_shape == data.shape), None)
        try:
            if like is None:
                raise QueueError("the scan's geometry is unknown.")
            target = edit_target(self.outdir, it)
            write_canonical(data, target, like, kind="labels",
                            produced_by=f"spinesegdiff {__version__} review queue: {it.scan} edited")
            self.reviews = record(self.outdir, it.scan, labels_edited=True,
                                  edited_labels=target.relative_to(self.outdir).as_posix())
        except (OSError, ValueError) as exc:
            self.state.refuse(f"Cannot save the edits of {it.scan}: {sentence(exc)}")
            return None
        self._opened_labels, self._from_edit = np.array(data, copy=True), True
        self._refill()
        self.state.say(f"{it.scan}: edits saved to {target}.")
        return target

    def decide(self, decision: str) -> bool:
        """Record ``decision`` (accepted / corrected / rejected) and the note for the open scan at once in the
        review table beside the results; unsaved edits are saved first."""
        if self.queue_labels() is None or self.outdir is None:
            self.state.refuse("Open a queue scan before deciding.")
            return False
        it = self.items[self.current]
        if self.unsaved_edits() and self.save_edits() is None:
            return False
        try:
            self.reviews = record(self.outdir, it.scan, decision=decision, note=self.note.text().strip())
        except (OSError, ValueError) as exc:
            self.state.refuse(f"Cannot record the decision on {it.scan}: {sentence(exc)}")
            return False
        self._refill()
        self.state.say(f"{it.scan}: {decision}, written to {self.outdir / REVIEW_CSV}.")
        self.decided.emit(it.scan, decision)
        return True
