"""The run controller: the pipeline in a napari thread worker, the streamed denoising steps, cancel, and the
scheduler that puts the result layers one per turn of the Qt event loop.

Only the GUI thread touches layers.  Each batch first streams its presegmentation (step 0, shown at once, before
the first denoiser pass).  Every streamed step writes the current x0 estimate of the slices being
denoised into the ``denoising`` layer (class colours weighted by probability, additive over the scan) and
into the run's trajectory (step, slice, row, column; uint8 classes; at most ``TRAJECTORY_BUDGET_BYTES``),
which the completed run keeps: the Review tab's *Denoising steps* makes it the ``denoising trajectory`` labels
layer, so the history can be scrubbed.  The worker converts each step to uint8 before handing it over, so the GUI work per update is one
slice assignment and a refresh.
Cancel stops at the next denoising step: no result layer is added or changed, and the partial estimate is
cleared from the (hidden) ``denoising`` canvas.

Before any Run, :meth:`RunController.preload` loads the models of the Segment tab's settings in a thread and runs
them once on the chosen scan, so the first Run of a session starts as fast as a later one; the run's worker
takes the same lock and reuses them.  A completed run ends ("Done", ``run_finished``) only when the Review
tab's QA tables are filled too: they are computed in a thread while the last result layers are drawn.
"""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtCore import QObject, QTimer

from ..config import SegmentationConfig, parse_slices
from ..io.volume import Volume
from .layers import ResultLayers
from .navigation import jump_into_run
from .qa import frame_slot, streamed_steps
from .stages import StageScheduler
from .state import CANCELLING, ActiveRun, RunRequest, RunState
from .worker import StreamFrame, preload_in_thread, qa_in_thread, segment_in_thread


#: least time between two updates of the status line (the step and seconds) during a run
STATUS_INTERVAL_S = 1.0
#: least time between two moves of the progress bar during a run (the first and last step always show).  Any
#: widget's repaint in a window that holds an OpenGL canvas is a composition of the whole window in OpenGL:
#: under software OpenGL (llvmpipe) the bar moved at every denoiser pass cost 0.8-1.0 s of the two cores'
#: time per SPIDER run (the run 9.6 s against 8.7 s without it); the status line changes with the bar
PROGRESS_INTERVAL_S = 0.5
#: least time between two redraws of the live canvas.  Every streamed step is written into the layer and the
#: trajectory; the canvas redraws at most this often (the last step of a burst always shows, a moment later).
#: With the bfloat16 engine steps arrive every ~0.25 s, and a redraw in software OpenGL costs ~80 ms of the
#: same two cores: a redraw per step made the viewer's run 1.17x the CLI's (benchmarks/bench_live_view.py)
LIVE_REDRAW_S = 0.5


def shows_any_slice(viewer, layer, idx) -> bool:
    """Whether the canvas shows any of the slices ``idx`` (along the layer's first axis) of ``layer``: False when
    the layer is hidden or a 2-D view shows another slice.  Redrawing the canvas is the live view's main cost
    (OpenGL drawn in software under Xvfb or a remote desktop); a streamed step of slices nobody sees needs none.
    """
    if not layer.visible:
        return False
    dims = viewer.dims
    axis = dims.ndim - layer.ndim  # the world axis of the layer's slices (an RGB layer's colour is not an axis)
    if dims.ndisplay != 2 or axis not in dims.not_displayed:
        return True
    shown = int(np.round(layer.world_to_data(dims.point)[0]))
    return shown in set(int(i) for i in idx)


class RunController(QObject):
    """Starts, streams, cancels and ends runs; records everything in the shared :class:`RunState`."""

    def __init__(self, state: RunState, layers: ResultLayers, parent: QObject | None = None):
        super().__init__(parent)
        self.state = state
        self.layers = layers
        self.scheduler = StageScheduler(self)
        self.worker = None
        self._status_shown = 0.0
        self._progress_shown = 0.0
        self._latest_progress = None  # the latest step's Progress, until the bar shows it
        self._redrawn = 0.0  # when the live canvas last redrew
        self._redraw_timer = QTimer(self)  # a deferred redraw of the latest step, when one was held back
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.timeout.connect(self._redraw_live)
        self.qa_worker = None  # the QA tables of the run's result, being computed
        self._ending: str | None = None  # the outcome of a run that waits for its QA tables
        self._shown = None  # (run, result) whose result layers are shown, until the run ends
        self._preload_key: tuple | None = None  # what the latest preload was asked to prepare
        self._preloads = 0  # preloads in flight

    def preload(self, config: SegmentationConfig, volume: Volume | None, scan_name: str = "the scan"):
        """Load the models of ``config`` in a thread worker and run them once on ``volume``
        (:func:`.worker.preload_in_thread`); the status line says so.  Returns the worker, or ``None`` while a
        run is going or when the same preparation was asked for last."""
        from napari.qt.threading import create_worker

        first = 0  # slices in the first batch (the shapes the warm-up runs)
        if volume is not None:
            try:
                first = len(parse_slices(config.slices, volume.orientation.canonical_shape[0])[: config.batch_slices])
            except ValueError:  # slices the scan does not have (the Run says so): the models only
                volume = None
        key = (config.checkpoint, config.baseline_checkpoint, config.device, config.engine, config.prior,
               None if volume is None else tuple(volume.shape), first, config.ensemble)
        if self.worker is not None or key == self._preload_key:
            return None
        self._preload_key = key
        self._preloads += 1
        self.state.say(f"Preparing the model for {scan_name} ..." if volume is not None else "Loading the model ...")
        worker = create_worker(preload_in_thread, config, volume, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_preloaded)
        worker.errored.connect(self._on_preload_error)
        worker.finished.connect(self._on_preload_finished)
        worker.start()
        return worker

    def _on_preloaded(self, device_message: str) -> None:
        if self.worker is None and self._preloads == 1:  # a run or a later preload says its own
            self.state.say(f"Model ready. {device_message} Press Run.")
        self.state.models_ready.emit()

    def _on_preload_error(self, exc: Exception) -> None:
        self._preload_key = None  # asked again, it is tried again
        if self.worker is None and self._preloads == 1:  # one sentence; the Run refuses with it too
            self.state.say(f"The model could not be prepared: {exc}")

    def _on_preload_finished(self) -> None:
        self._preloads -= 1

    def start(self, request: RunRequest):
        """Start a run in a thread worker; returns the worker (``None`` while another run is going)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return None
        run = ActiveRun(request.image, request.config, request.stream_every)
        self._latest_progress, self._progress_shown = None, 0.0
        self.state.begin(run)
        jump_into_run(self.state.viewer, run.image, run.config.slices)
        self.state.say("Loading the model ...")
        worker = create_worker(segment_in_thread, request.volume, request.config, request.prior, run.stream_every,
                               run, _start_thread=False, _ignore_errors=True)  # errors: _on_error
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        if run.stream_every > 0:  # the live canvas before the worker competes for the CPU
            self.layers.prepare_trajectory(run)
            self.scheduler.schedule(lambda: self.layers.prepare_denoising(run))
        self.scheduler.schedule(worker.start)
        return worker

    def cancel(self) -> None:
        """Ask the running worker to stop at its next step."""
        run = self.state.run
        if self.worker is None or run is None:
            return
        run.cancelled = True
        run.done_at_cancel = run.steps_done
        self.state.set_status(CANCELLING)
        self.state.say("Cancelling at the next step ...")
        self.worker.quit()

    # ---------------------------------------------------------------------------------- worker events

    def _on_event(self, ev) -> None:
        if isinstance(ev, StreamFrame):
            t0 = time.perf_counter()
            self._show_frame(ev)
            self.state.max_update_ms = max(self.state.max_update_ms, 1000 * (time.perf_counter() - t0))
            return
        if self.worker is None:  # a late event of a finished run
            return
        # the dock's own progress bar: a repaint of its few pixels.  napari's activity progress bar processes all
        # pending Qt events on every change (a nested event loop and a main-window repaint: stalls of 100+ ms)
        now = time.perf_counter()
        self._latest_progress = ev
        if ev.done == 0 or ev.done == ev.total or now - self._progress_shown >= PROGRESS_INTERVAL_S:
            self._show_progress(now)
        # else: the next move or the next redraw of the live canvas shows it (one window composition for both)

    def _show_progress(self, now: float) -> None:
        """Move the progress bar to the latest step and, at most every ``STATUS_INTERVAL_S``, the status line."""
        ev, self._latest_progress = self._latest_progress, None
        if ev is None:
            return
        self._progress_shown = now
        self.state.progress_changed.emit(ev.done, ev.total)
        if ev.done == 0:
            self.state.say(ev.message)
        elif ev.done == ev.total or now - self._status_shown >= STATUS_INTERVAL_S:
            self._status_shown = now
            if self.state.run is not None:
                self.state.say(f"{ev.message} ({now - self.state.run.started:.1f} s)")

    def _show_frame(self, fr: StreamFrame) -> None:
        run = self.state.run
        if run is None or run.cancelled:
            return
        self.state.stream_updates += 1
        idx = list(fr.slices)
        layer = run.denoise_layer
        if layer is not None and layer in self.state.viewer.layers:
            layer.data[idx] = fr.rgb
            if not run.canvas_shown:  # the canvas was added (or cleared) hidden: the first step shows it
                run.canvas_shown = True
                self._redrawn = time.perf_counter()
                layer.visible = True  # slices and draws it
            elif shows_any_slice(self.state.viewer, layer, idx):  # else read when the user moves to these slices
                wait = LIVE_REDRAW_S - (time.perf_counter() - self._redrawn)
                if wait <= 0 or fr.step == 0:  # a batch's presegmentation shows at once
                    self._redraw_live()
                elif not self._redraw_timer.isActive():
                    self._redraw_timer.start(max(1, int(1000 * wait)))
        if run.trajectory is not None and fr.step > 0:  # step 0 (the presegmentation) is shown, not recorded
            n_streamed = len(streamed_steps(fr.total_steps, run.stream_every))
            i = run.batch_counts.get(fr.batch, 0)
            run.batch_counts[fr.batch] = i + 1
            slot = frame_slot(i, n_streamed, run.trajectory.shape[0])
            run.trajectory[slot][idx] = fr.classes
            run.frames_used = max(run.frames_used, slot + 1)  # frames in use

    def _redraw_live(self) -> None:
        self._redraw_timer.stop()
        run = self.state.run
        if run is None or run.cancelled:
            return
        layer = run.denoise_layer
        if layer is not None and layer in self.state.viewer.layers:
            self._redrawn = time.perf_counter()
            layer.refresh()
            self._show_progress(self._redrawn)  # in the same window composition as the canvas

    def _on_returned(self, result) -> None:
        run = self.state.run
        if run is None or run.cancelled:
            return
        run.completed = True
        self._shown = (run, result)
        self.scheduler.schedule(*self.layers.result_stages(run, result), self._start_qa,
                                self.state.result_changed.emit, self.layers.show_result)

    def _start_qa(self) -> None:
        """The QA tables of the result layers just put, computed in a thread while the overlay is drawn; the
        Review panel fills them from ``state.qa_ready``, and the run ends after that (:meth:`_end_run`)."""
        from napari.qt.threading import create_worker

        inputs = self.layers.qa_inputs()
        if inputs is None:
            return
        worker = create_worker(qa_in_thread, *inputs, _start_thread=False)
        worker.returned.connect(self.state.qa_ready.emit)
        worker.finished.connect(self._on_qa_finished)
        self.qa_worker = worker
        worker.start()

    def _on_qa_finished(self) -> None:
        self.qa_worker = None
        if self._ending is not None:
            outcome, self._ending = self._ending, None
            self._end_run(outcome)

    def _on_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        if self.state.run is not None:
            self.state.run.error = msg
        self.state.say(f"Failed: {msg}")
        show_error(msg)

    def _on_finished(self) -> None:
        run = self.state.run
        self._latest_progress = None
        self.state.progress_changed.emit(0, 0)
        if run is not None and not run.completed:
            if run.pipeline_gen is not None:
                run.pipeline_gen.close()  # the worker is done with it: stop the sampler now
            self.layers.discard_live()  # partial estimates, not results
            if run.error is None:
                self.state.say(f"Cancelled after {run.steps_done} of {run.total} steps; no result was kept.")
        outcome = run.outcome if run is not None else "cancelled"
        self.scheduler.schedule(lambda: self._end_run(outcome))  # after the result stages

    def _end_run(self, outcome: str) -> None:
        """After the result stages, once the QA tables are filled too: "Done", the Review tab, ``run_finished``."""
        if self.qa_worker is not None:  # the tables are still being computed: _on_qa_finished ends the run
            self._ending = outcome
            return
        shown, self._shown = self._shown, None
        if outcome == "done" and shown is not None:
            run, res = shown
            secs = time.perf_counter() - run.started
            self.state.say(f"Done in {secs:.1f} s: {len(res.slices)} slices, {self.state.stream_updates} streamed "
                           f"steps on {res.provenance.get('device', '?')}.")
            self.state.result_ready.emit()
        self.worker = None
        self.state.finish(outcome)
