"""Callables run one per turn of the Qt event loop: how the dock adds its layers (each takes 0.1-0.3 s of the GUI
thread) without stalling the viewer."""

from __future__ import annotations

from collections import deque
from typing import Callable

from qtpy.QtCore import QObject, QTimer


class StageScheduler(QObject):
    """Runs callables one per turn of the Qt event loop, in order (adding a napari layer takes 0.1-0.3 s;
    adding them all in one turn would stall the GUI).  A callable that returns a callable has it run the next
    turn, before the others."""

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._pending: deque[Callable[[], object]] = deque()
        self._timer = QTimer(self)
        self._timer.setInterval(10)  # > 0 so that other timers and input get a turn between stages
        self._timer.timeout.connect(self._run_next)

    def schedule(self, *stages: Callable[[], object]) -> None:
        self._pending.extend(stages)
        if not self._timer.isActive():
            self._timer.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _run_next(self) -> None:
        if self._pending:
            follow = self._pending.popleft()()
            if callable(follow):  # the stage's second half (a layer added hidden, shown now): the next turn
                self._pending.appendleft(follow)
        if not self._pending:
            self._timer.stop()
