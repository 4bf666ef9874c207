"""The Review panel: the structure and slice tables (most uncertain first; a click moves the viewer there),
the threshold slider of the ``uncertain boundary`` overlay, and the Refresh / Export buttons.

The tables are computed in a thread from a copy of the labels (edits included): by the run controller when a
run's result arrives (``state.qa_ready``; the run ends once they are filled) and here when Refresh is pressed.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
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
from .navigation import go_to
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


def _fill(table: QTableWidget, rows: list[list[QTableWidgetItem]], sort_column: int) -> None:
    table.setSortingEnabled(False)
    table.setRowCount(len(rows))
    for r, cells in enumerate(rows):
        for c, item in enumerate(cells):
            table.setItem(r, c, item)
    table.setSortingEnabled(True)
    table.sortItems(sort_column, Qt.SortOrder.DescendingOrder)
    table.resizeColumnsToContents()


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
        self._build()
        state.result_changed.connect(self._redraw_overlay)
        state.qa_ready.connect(self._fill_tables)
        state.status_changed.connect(self._on_status)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
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

    @property
    def busy(self) -> bool:
        """The tables are being recomputed."""
        return self.qa_worker is not None

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
        """Recompute the structure and slice tables in a thread (from a copy of the current labels)."""
        from napari.qt.threading import create_worker

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

    def _go_to_row(self, table: QTableWidget, row: int) -> None:
        item = table.item(row, 0)
        target = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
        image = self.state.result_image
        if target is None or image is None or image not in self.state.viewer.layers:
            return
        go_to(self.state.viewer, image, target)
