"""A run's progress bar that repaints with the next frame instead of at once.

``QProgressBar.setValue`` repaints synchronously (``repaint()``, so bars move during blocking work); in a napari
window that is a paint of the main window's backing store, OpenGL canvas included, on every change: tens of
milliseconds under software OpenGL.  This bar only asks for an ``update()``, which Qt merges with the paints it
does anyway.
"""

from __future__ import annotations

from qtpy.QtCore import QRectF, QSize
from qtpy.QtGui import QPainter, QPalette
from qtpy.QtWidgets import QSizePolicy, QWidget


class LazyProgressBar(QWidget):
    """A thin bar filled to ``done / total``; hidden while ``total`` is 0."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.done, self.total = 0, 0
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setVisible(False)

    def sizeHint(self) -> QSize:
        return QSize(100, 6)

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0

    def set_progress(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)
        if self.isVisible() != (total > 0):
            self.setVisible(total > 0)
        self.setToolTip(f"{self.done} of {self.total} denoiser passes" if total > 0 else "")
        self.update()

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        rect = QRectF(self.rect())
        painter.fillRect(rect, self.palette().color(QPalette.Mid))
        rect.setWidth(rect.width() * self.fraction)
        painter.fillRect(rect, self.palette().color(QPalette.Highlight))
        painter.end()
