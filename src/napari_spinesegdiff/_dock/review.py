"""The Review panel: the levels table (each structure by its level name, ``L4-L5 disc``, with its measurements
and their 90 % intervals, confidence, uncertainty and flags; the numbering can be shifted one level up or
down), the structure and slice tables (most uncertain first), the threshold slider of the ``uncertain
boundary`` overlay, the buttons that make the layers a run keeps without adding them (the class probabilities,
the denoising steps) and the Refresh / Export buttons.  A click on a row moves the viewer there.

The QA tables are computed in a thread from a copy of the labels (edits included): by the run controller when
a run's result arrives (``state.qa_ready``; the run ends once they are filled) and here when Refresh is
pressed.  The level report of a run is made in the run's worker (``state.levels``); here, in a thread, when
the labels it described changed (a run merged into earlier slices, a queue scan, Refresh after edits: then
without intervals) and when the numbering is shifted.
"""

from __future__ import annotations

import math

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .layers import OUTPUT_KEY, OVERLAY_NAME, UNCERTAINTY_NAME, ResultLayers, geometry_of
from .levels import TABLE_MEASURES, LevelReport, compute_levels, measure_text, position, renumber, summary, title
from .navigation import go_to
from .stages import StageScheduler
from .qa import MAX_UNCERTAINTY, uncertain_mask
from .state import RunState
from .worker import qa_in_thread


class _NumItem(QTableWidgetItem):
    """A table cell that shows formatted text and sorts by its number."""

    def __init__(self, value: float, text: str | None = None):
        super().__init__(text if text is not None else f"{value:.3f}")
        self.sort_value = float(value)
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _NumItem):
            return self.sort_value < other.sort_value
        return super().__lt__(other)


def _table(headers: list[str]) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.verticalHeader().setVisible(False)
    t.horizontalHeader().setStretchLastSection(True)
    t.setToolTip("Most uncertain first; click a row to go there.")
    return t


def _fill(table: QTableWidget, rows: list[list[QTableWidgetItem]], sort_column: int, descending: bool = True) -> None:
    table.setSortingEnabled(False)
    table.setRowCount(len(rows))
    for r, cells in enumerate(rows):
        for c, item in enumerate(cells):
            table.setItem(r, c, item)
    table.setSortingEnabled(True)
    table.sortItems(sort_column, Qt.SortOrder.DescendingOrder if descending else Qt.SortOrder.AscendingOrder)
    table.resizeColumnsToContents()


def _number(v) -> float:
    """A cell's sort value: the number, missing values first."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return f if math.isfinite(f) else -math.inf


def level_cells(report: LevelReport, row: dict) -> list[QTableWidgetItem]:
    """One levels-table row: the name (sorted from superior to inferior; where to go), confidence, each
    measurement with its interval, mean uncertainty, flags."""
    where = position(report, row)
    order = (where[1] if where is not None else math.inf) + (0.01 if row.get("structure") == "canal" else 0.0)
    first = _NumItem(order, title(row))
    first.setTextAlignment(int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter))
    first.setData(Qt.ItemDataRole.UserRole, where)
    conf = row.get("level_confidence")
    cells = [first, _NumItem(_number(conf), "" if conf is None else f"{float(conf):.2f}")]
    for _header, measure in TABLE_MEASURES:
        item = _NumItem(_number(row.get(measure)), measure_text(row, measure))
        if item.text():
            item.setToolTip(f"{measure}: {item.text()} (± the 90 % interval)")
        cells.append(item)
    u = row.get("uncertainty_mean")
    cells.append(_NumItem(_number(u), "" if u is None else f"{float(u):.3f}"))
    cells.append(QTableWidgetItem(str(row.get("flags") or "")))
    return cells


class ReviewPanel(QWidget):
    """The Review tab: QA tables, overlay threshold, navigation, Refresh and Export."""

    #: Emitted when the QA tables have been refilled.
    qa_updated = Signal()
    #: Emitted when the Export button is pressed.
    export_requested = Signal()

    def __init__(self, state: RunState, layers: ResultLayers, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.layers = layers
        self.qa_worker = None
        self.levels_worker = None  # a level report (or renumbering) being made, until its layers are put
        self._build()
        state.result_changed.connect(self._redraw_overlay)
        state.result_changed.connect(self.refresh_levels)
        state.levels_changed.connect(self._fill_levels)
        state.qa_ready.connect(self._fill_tables)
        state.status_changed.connect(self._on_status)
        state.result_changed.connect(lambda: self._on_status(state.status))  # a run's or a queue scan's result
        self._on_status(state.status)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        self.levels_summary = QLabel(summary(None))
        self.levels_summary.setWordWrap(True)
        lay.addWidget(self.levels_summary)
        self.levels_table = _table(["structure", "confidence", *[h for h, _m in TABLE_MEASURES], "mean U", "flags"])
        self.levels_table.setToolTip("Each structure by its level, top to bottom; ± is the 90 % interval from the "
                                     "ensemble. Click a row to go there; hover the 'instances' layer for names.")
        self.levels_table.cellClicked.connect(lambda r, _c: self._go_to_row(self.levels_table, r))
        lay.addWidget(self.levels_table, 4)
        shift = QHBoxLayout()
        self.names_up = QPushButton("Names one level up (L5 → L4)")
        self.names_down = QPushButton("Names one level down (L4 → L5)")
        for button, delta in ((self.names_up, -1), (self.names_down, +1)):
            button.setToolTip("Renumber every structure by one level when the automatic count is off (a "
                              "transitional vertebra, the sacrum out of view); the tables and layers follow.")
            button.clicked.connect(lambda _checked=False, d=delta: self.renumber_levels(d))
            shift.addWidget(button)
        lay.addLayout(shift)
        self.structure_table = _table(["class", "level", "mean U", "max U", "mL", "slices"])
        self.slice_table = _table(["slice", "mean U", "max U", "labelled voxels"])
        self.structure_table.cellClicked.connect(lambda r, _c: self._go_to_row(self.structure_table, r))
        self.slice_table.cellClicked.connect(lambda r, _c: self._go_to_row(self.slice_table, r))
        lay.addWidget(QLabel("Structures (connected components), most uncertain first"))
        lay.addWidget(self.structure_table, 3)
        lay.addWidget(QLabel("Slices, most uncertain first"))
        lay.addWidget(self.slice_table, 2)
        row = QHBoxLayout()
        row.addWidget(QLabel("uncertain boundary >"))
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(0, 100)
        self.threshold.setValue(50)
        self.threshold.setToolTip("Show voxels whose uncertainty is above this value in the "
                                  f"'{OVERLAY_NAME}' layer (0 .. 1/e, the largest possible value).")
        self.threshold_label = QLabel(f"{self.threshold_value():.3f}")
        row.addWidget(self.threshold, 1)
        row.addWidget(self.threshold_label)
        lay.addLayout(row)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(60)
        self._threshold_timer.timeout.connect(self.update_overlay)
        self.threshold.valueChanged.connect(self._on_threshold)
        more = QHBoxLayout()
        self.probabilities_button = QPushButton("Class probabilities")
        self.probabilities_button.setToolTip("Add the result's probability of each model channel as a hidden "
                                             "'P(...)' image layer (0..1); later runs keep them up to date.")
        self.probabilities_button.clicked.connect(self.show_probabilities)
        self.trajectory_button = QPushButton("Denoising steps")
        self.trajectory_button.setToolTip("Add the 'denoising trajectory' layer: every streamed step of the last "
                                          "run; scrub its slider to replay the denoising.")
        self.trajectory_button.clicked.connect(self.show_trajectory)
        self.values_box = QCheckBox("Values on the lines")
        self.values_box.setToolTip("Write each measurement's value beside its line in the 'measurements' layer "
                                   "(the table lists them all; hovering a structure of the 'instances' layer "
                                   "shows its values in the status bar).")
        self.values_box.toggled.connect(self.layers.show_values)
        more.addWidget(self.probabilities_button)
        more.addWidget(self.trajectory_button)
        more.addWidget(self.values_box)
        lay.addLayout(more)
        self._stages = StageScheduler(self)
        buttons = QHBoxLayout()
        self.refresh_button = QPushButton("Refresh tables")
        self.refresh_button.setToolTip("Recompute the tables after editing the labels.")
        self.refresh_button.clicked.connect(self.refresh_qa)
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip("Write the labels (with your edits) and the uncertainty map next to the "
                                      "scan, in its geometry, with a JSON provenance file.")
        self.export_button.clicked.connect(self.export_requested.emit)
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.export_button)
        lay.addLayout(buttons)

    def _on_status(self, _status: str) -> None:
        idle = not self.state.is_running
        self.export_button.setEnabled(idle)
        self.refresh_button.setEnabled(idle)
        self.probabilities_button.setEnabled(idle and self.state.probabilities is not None)
        self.trajectory_button.setEnabled(idle and self.state.trajectory is not None)
        self._enable_renumbering()

    def show_probabilities(self) -> None:
        """The hidden ``P(<channel>)`` layers of the result, one per turn of the event loop."""
        stages = self.layers.probability_stages()
        if not stages:
            self.state.say("No run's result is shown: its class probabilities are made by a run.")
            return
        self._stages.schedule(*stages)

    def show_trajectory(self) -> None:
        """The ``denoising trajectory`` layer of the last run, its last step shown."""
        if not self.layers.show_trajectory():
            self.state.say("No run's denoising steps are kept: a run with the live view on records them.")
        else:
            self.state.say("The 'denoising trajectory' layer holds the last run's streamed steps: scrub its "
                           "'denoising step' slider to replay them.")

    def _enable_renumbering(self) -> None:
        report = self.state.levels
        ok = not self.state.is_running and self.levels_worker is None and report is not None \
            and report.base is not None
        self.names_up.setEnabled(ok)
        self.names_down.setEnabled(ok)

    @property
    def busy(self) -> bool:
        """The tables (or the level report) are being recomputed."""
        return self.qa_worker is not None or self.levels_worker is not None

    # ------------------------------------------------------------------------------------------ overlay

    def threshold_value(self) -> float:
        return self.threshold.value() / 100.0 * MAX_UNCERTAINTY

    def _on_threshold(self, _value: int) -> None:
        self.threshold_label.setText(f"{self.threshold_value():.3f}")
        self._threshold_timer.start()
        overlay = self.layers.find(OVERLAY_NAME)
        if overlay is not None:
            overlay.visible = True

    def _redraw_overlay(self) -> None:
        """A new result redraws the "uncertain boundary" layer only when it is there: it is made when the slider
        first moves, so the first run adds one layer fewer while its result arrives."""
        if self.layers.find(OVERLAY_NAME) is not None:
            self.update_overlay()

    def update_overlay(self) -> None:
        """(Re)draw the "uncertain boundary" layer for the slider's threshold: the voxels above it in cyan over
        transparent, as an image layer (a mask to look at, not to paint; napari builds a labels layer's paint
        tools and overlays, about 0.1 s, for every new one)."""
        from napari.utils.colormaps import Colormap

        unc = self.layers.find(UNCERTAINTY_NAME)
        if unc is None or self.state.result_image is None:
            return
        mask = uncertain_mask(unc.data, self.threshold_value())
        cyan = Colormap([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]], name="spinesegdiff uncertain boundary")
        self.layers.put(OVERLAY_NAME, mask, "image", geometry_of(unc), colormap=cyan, contrast_limits=(0.0, 1.0),
                        opacity=0.7, metadata={OUTPUT_KEY: True, "threshold": self.threshold_value()})

    # ------------------------------------------------------------------------------------------- tables

    def refresh_qa(self) -> None:
        """Recompute the structure and slice tables in a thread (from a copy of the current labels), and the
        level report when the labels changed since it was made."""
        from napari.qt.threading import create_worker

        self.refresh_levels()
        inputs = self.layers.qa_inputs()
        if inputs is None:
            return
        worker = create_worker(qa_in_thread, *inputs, _start_thread=False)
        worker.returned.connect(self._fill_tables)
        self.qa_worker = worker
        worker.start()

    def _fill_tables(self, tables) -> None:
        structures, slices = tables
        rows = []
        for s in structures:
            first = QTableWidgetItem(s.class_name)
            first.setData(Qt.ItemDataRole.UserRole, (s.slice_index, s.centroid[1], s.centroid[2]))
            rows.append([first, _NumItem(s.level, str(s.level)), _NumItem(s.mean_uncertainty),
                         _NumItem(s.max_uncertainty), _NumItem(s.volume_ml, f"{s.volume_ml:.2f}"),
                         _NumItem(s.slices[0], f"{s.slices[0]}-{s.slices[1]}")])
        _fill(self.structure_table, rows, 2)  # by mean uncertainty
        rows = []
        for s in slices:
            first = _NumItem(s.index, str(s.index))
            first.setData(Qt.ItemDataRole.UserRole, (s.index, *s.centroid))
            rows.append([first, _NumItem(s.mean_uncertainty), _NumItem(s.max_uncertainty),
                         _NumItem(s.labelled_voxels, str(s.labelled_voxels))])
        _fill(self.slice_table, rows, 1)
        self.qa_worker = None
        self.qa_updated.emit()

    # ------------------------------------------------------------------------------------------- levels

    def refresh_levels(self) -> None:
        """Make the level report of the labels layer as it is, in a thread, unless the one shown describes it
        (a reviewer's renumbering is kept when the same labels were only edited)."""
        if self.state.levels_current:
            return
        inputs = self.layers.level_inputs()
        if inputs is None or self.levels_worker is not None:
            return
        old = self.state.levels
        shift = old.shift if old is not None and self.state.levels_for is self.state.original_labels else 0
        self._make_levels(compute_levels, inputs, shift, token=self.state.labels_token())

    def renumber_levels(self, delta: int) -> None:
        """Shift every name ``delta`` levels (+1: one level down, L4 -> L5), in a thread; the levels table, the
        ``instances`` layer (values and features) and the ``measurements`` layer follow."""
        report = self.state.levels
        if report is None or report.base is None or self.levels_worker is not None or self.state.is_running:
            return
        self._make_levels(renumber, report, report.shift + int(delta),
                          token=(self.state.levels_for, self.state.levels_edits))

    def _make_levels(self, job, *args, token: tuple) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(job, *args, _start_thread=False)
        worker.returned.connect(lambda report: self._show_levels(report, token))
        worker.errored.connect(self._levels_failed)
        self.levels_worker = worker
        self.levels_summary.setText("Levels: naming and measuring ...")
        self._enable_renumbering()
        worker.start()

    def _show_levels(self, report: LevelReport, token: tuple) -> None:
        """Put the report's layers one per event-loop turn (each takes a while), then its table."""
        if token[0] is not self.state.original_labels:  # a run or a queue scan replaced those labels meanwhile
            self.levels_worker = None
            self._fill_levels()
            return

        def done() -> None:
            self.levels_worker = None
            self._enable_renumbering()

        self._stages.schedule(*self.layers.level_stages(report, token), done)

    def _levels_failed(self, exc: Exception) -> None:
        self.levels_worker = None
        self.levels_summary.setText(f"Levels: not named ({exc})")
        self._enable_renumbering()

    def _fill_levels(self) -> None:
        report = self.state.levels
        self.levels_summary.setText(summary(report))
        rows = [level_cells(report, r) for r in report.rows] if report is not None else []
        _fill(self.levels_table, rows, 0, descending=False)
        self._enable_renumbering()

    def _go_to_row(self, table: QTableWidget, row: int) -> None:
        item = table.item(row, 0)
        target = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
        image = self.state.result_image
        if target is None or image is None or image not in self.state.viewer.layers:
            return
        go_to(self.state.viewer, image, target)
