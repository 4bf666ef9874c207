"""The live view in a real napari viewer (under Xvfb when there is no display): the first Run of a fresh viewer
and a warm run beside it.  Per run: time to the first streamed step, event-loop gaps during the run, while the
result layers arrive and around a cancel, whether the Review tab's tables are filled when the run-finished
signal fires, and the viewer's run against the CLI on the same scan in the same session.

Each fresh viewer is a new process: the models, the compiled engines and Python's imports are cached per
process, so a second viewer in one process is not fresh.  The networks' export cache on disk is kept, as a
user's later sessions find it (``bench_cli.py``'s "fresh" variant times the one-off export).  In each process:
open the scan, open the dock (its defaults, a fresh settings folder), choose all slices, wait ``--run-after``
seconds after the dock has appeared (a user choosing the slices), press Run: the first run.  Then the same
settings again (the warm run) and a run cancelled ``--cancel-after`` seconds in.  Between the processes the CLI
segments the same scan with the same settings (one CLI run per viewer, interleaved, so a drift of the machine
hits both alike).  Medians over the fresh viewers are printed, with the range.

The scan is a held-out SPIDER scan (``../shared/data/spider_t2space``, 17 x 640 x 512 at 0.9 x 0.47 x 0.47
mm, in fold 0's test patients) when present, else a phantom of that size, unless ``--scan`` names another.
Gaps are measured by a 5 ms Qt timer on the GUI thread (a gap is the time between two of its ticks).  The CPU
an idle viewer uses is printed too: under Xvfb, OpenGL is drawn in software (llvmpipe) on the same cores as the
run.  Pauses of Python's garbage collector are timed too (they stall the GUI thread from any thread).  ``--why``
prints where the GUI thread was during stalls and the slowest GUI-thread slots.  Run on an otherwise idle
machine (about a minute per fresh viewer and its CLI run with the SPIDER scan on two idle cores):

    .venv/bin/python benchmarks/bench_live_view.py [--scan PATH] [--fresh 3] [--run-after 1] [--cancel-after 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: a held-out SPIDER scan (fold 0's test patients in weights/splits_v4.json)
SPIDER_SCAN = (Path(__file__).resolve().parents[2] / "shared" / "data" / "spider_t2space"
               / "SPIDER_098_t2SPACE_image.nii.gz")
#: the phantom that stands in for it: its shape and spacing
PHANTOM_SHAPE, PHANTOM_SPACING = (17, 640, 512), (0.9, 0.47, 0.47)


class GapMeter:
    """Event-loop gaps (ms) from a 5 ms QTimer, tagged with the phase they ended in."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.phase = "idle"
        self.gaps: dict[str, list[float]] = {}
        self.last: float | None = None
        self.on_tick = None
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.setdefault(self.phase, []).append(1000 * (now - self.last))
        self.last = now
        if self.on_tick is not None:
            self.on_tick(now)


class GcMeter:
    """Pauses of Python's garbage collector (ms; it runs in whichever thread allocates, holding the interpreter
    lock, so a pause in the worker stalls the GUI thread too): the largest per generation and meter phase."""

    def __init__(self, meter: GapMeter) -> None:
        import gc

        self.meter = meter
        self.worst: dict[tuple[str, int], float] = {}
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        key = (self.meter.phase, int(info["generation"]))
        self.worst[key] = max(self.worst.get(key, 0.0), 1000 * (time.perf_counter() - self._t0))

    def largest(self, phases: tuple[str, ...]) -> float:
        return max((ms for (ph, _g), ms in self.worst.items() if ph in phases), default=0.0)


#: GUI-thread milliseconds of each result stage (layer put) of the current run
STAGE_MS: list[float] = []


def time_stages() -> None:
    """Record how long each of the dock's staged GUI-thread steps takes (before the dock is created)."""
    from napari_spinesegdiff._dock import run as run_module

    original = run_module.StageScheduler._run_next

    def timed(self) -> None:
        t0 = time.perf_counter()
        original(self)
        STAGE_MS.append(1000 * (time.perf_counter() - t0))

    run_module.StageScheduler._run_next = timed


class StallSampler:
    """``--why``: a watchdog thread that, while the GUI thread has not ticked the meter for over 50 ms, samples the
    GUI thread's Python stack every 10 ms; prints the most frequent stacks per phase (where the stalls are)."""

    def __init__(self, meter: GapMeter) -> None:
        import threading
        from collections import Counter

        self.meter = meter
        self.main = threading.main_thread().ident
        self.samples: dict[str, Counter] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import traceback
        from collections import Counter

        while not self.stop.wait(0.01):
            last = self.meter.last
            if last is None or time.perf_counter() - last < 0.05:
                continue
            frame = sys._current_frames().get(self.main)
            if frame is None:
                continue
            stack = [f"{Path(fs.filename).parent.name}/{Path(fs.filename).name}:{fs.lineno} {fs.name}"
                     for fs in traceback.extract_stack(frame)]
            key = " <- ".join(reversed(stack[-8:]))
            self.samples.setdefault(self.meter.phase, Counter())[key] += 1

    def report(self, top: int = 6) -> None:
        self.stop.set()
        for phase, counter in self.samples.items():
            print(f"\nGUI thread during stalls, phase {phase!r} ({sum(counter.values())} samples of 10 ms):")
            for key, n in counter.most_common(top):
                print(f"  {n:4d}  {key}")


def wait_until(predicate, timeout: float) -> None:
    """Run Qt's event loop (as napari does: a blocking ``exec``, not a busy ``processEvents`` loop, which alone
    costs an idle viewer ~0.4 cores) until ``predicate()`` holds, checking every 5 ms."""
    from qtpy.QtCore import QEventLoop, QTimer

    if predicate():
        return
    loop, timer, late = QEventLoop(), QTimer(), []
    end = time.perf_counter() + timeout

    def check() -> None:
        if predicate():
            loop.quit()
        elif time.perf_counter() > end:
            late.append(True)
            loop.quit()

    timer.setInterval(5)
    timer.timeout.connect(check)
    timer.start()
    loop.exec_()
    timer.stop()
    if late:
        raise TimeoutError("the viewer did not finish in time")


class SlotTimer:
    """``--why``: the GUI-thread milliseconds of the dock's slots (worker signals, stages, table fills), the
    largest per slot and phase.  Installed on the classes before the dock is created."""

    SLOTS = (("run", "RunController", ("_on_event", "_on_returned", "_on_finished", "_result_shown", "_end_run")),
             ("review", "ReviewPanel", ("refresh_qa", "_fill_tables", "update_overlay")),
             ("layers", "ResultLayers", ("prepare_denoising", "put", "put_labels", "finish_trajectory",
                                         "show_result")))

    def __init__(self, meter: GapMeter) -> None:
        import importlib

        self.meter = meter
        self.worst: dict[tuple[str, str], float] = {}
        for module, cls_name, names in self.SLOTS:
            cls = getattr(importlib.import_module(f"napari_spinesegdiff._dock.{module}"), cls_name)
            for name in names:
                if hasattr(cls, name):
                    setattr(cls, name, self._timed(f"{cls_name}.{name}", getattr(cls, name)))

    def _timed(self, label: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (self.meter.phase, label)
                self.worst[key] = max(self.worst.get(key, 0.0), 1000 * (time.perf_counter() - t0))
        return timed

    def report(self, top: int = 12) -> None:
        print(f"\nslowest GUI-thread slots (largest single call, ms):")
        for (phase, label), ms in sorted(self.worst.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {ms:7.1f}  {label}  (phase {phase!r})")


def tables_filled(w) -> bool:
    """Both Review tables hold rows."""
    return w.review.structure_table.rowCount() > 0 and w.review.slice_table.rowCount() > 0


def viewer_run(w, meter: GapMeter, gcm: GcMeter, cancel_after: float | None) -> dict[str, float]:
    """One run from the Run button: first-step and total seconds, the largest gap per phase, whether the QA
    tables were filled when the run-finished signal fired (and the cancel figures)."""
    outcome: list[str] = []
    at_finish: list[bool] = []

    def finished(value: str) -> None:
        outcome.append(value)
        at_finish.append(tables_filled(w))

    w.run_finished.connect(finished)
    w.review.structure_table.setRowCount(0)  # the previous run's rows must not count
    w.review.slice_table.setRowCount(0)
    STAGE_MS.clear()
    meter.gaps = {}
    gcm.worst = {}
    t_first: list[float] = []
    result_at: list[float] = []

    def on_tick(now: float) -> None:
        if not t_first and w.state.stream_updates > 0:
            t_first.append(now)
        if not result_at and w.state.run is not None and w.state.run.completed:
            result_at.append(now)
            meter.phase = "result layers"

    meter.on_tick = on_tick
    meter.phase = "run"
    t0, gui0 = time.perf_counter(), time.thread_time()
    tc = None
    try:
        w.run()
        if cancel_after is not None:
            wait_until(lambda: time.perf_counter() - t0 > cancel_after, cancel_after + 120)
            meter.phase = "cancel"
            tc = time.perf_counter()
            w.cancel()
        wait_until(lambda: bool(outcome), 900)
        total, gui_cpu = time.perf_counter() - t0, time.thread_time() - gui0
        meter.phase = "after"
        wait_until(lambda: not w.review.busy, 60)
        settle = time.perf_counter() + 1.0
        wait_until(lambda: time.perf_counter() > settle, 5)
    finally:
        meter.on_tick = None
        meter.phase = "idle"
        w.run_finished.disconnect(finished)
    worst = {k: max(v) for k, v in meter.gaps.items() if v}
    out = {"outcome": outcome[0], "total_s": total, "first_step_s": (t_first[0] - t0) if t_first else None,
           "largest_stage_ms": max(STAGE_MS, default=0.0), "gap_run_ms": worst.get("run"),
           "gap_results_ms": worst.get("result layers"), "tables_at_finish": at_finish[0],
           "gc_ms": gcm.largest(("run", "result layers", "cancel")), "gui_cpu_s": gui_cpu,
           "timings": dict(w.state.result.provenance.get("timings", {})) if w.state.result else {}}
    if tc is not None:
        out["gap_cancel_ms"] = worst.get("cancel")
        out["cancel_to_idle_s"] = total - (tc - t0)
    return out


def idle_cpu(seconds: float) -> float:
    """CPU cores this process uses while the viewer just sits there (software OpenGL under Xvfb redraws)."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    wait_until(lambda: time.perf_counter() - t0 > seconds, seconds + 5)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (time.perf_counter() - t0)


def make_scan(folder: Path) -> Path:
    """A phantom of the SPIDER scan's shape and spacing."""
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    fov = tuple(n * s for n, s in zip(PHANTOM_SHAPE, PHANTOM_SPACING))
    ph = make_phantom(seed=3, spacing=PHANTOM_SPACING, fov_mm=fov)
    return write_volume(ph.image.data, folder / "phantom_spider_size.nii.gz", like=ph.image, kind="image",
                        produced_by="bench")


def cli_seconds(scan: Path) -> float:
    """The CLI, whole process, on ``scan`` with the dock's defaults (all slices) and its work: a dock run also
    makes the level report from the ensemble members, so the CLI writes the levels table (``--levels``)."""
    exe = Path(sys.executable).with_name("spinesegdiff")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([str(exe), "segment", str(scan), "-o", str(Path(tmp) / "l.nii.gz"), "--slices", "all",
                        "--levels", str(Path(tmp) / "levels.csv"), "--no-progress"], check=True,
                       capture_output=True)
        return time.perf_counter() - t0


def fresh_viewer(args) -> dict:
    """One fresh viewer (this process): dock opened, first run, warm run, cancelled run."""
    display = None
    if not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(1600, 1000))
        display.start()
    tmp = tempfile.TemporaryDirectory()
    os.environ["SPINESEGDIFF_CONFIG_DIR"] = str(Path(tmp.name) / "config")  # the dock's defaults, not saved ones
    try:
        import napari

        viewer = napari.Viewer(show=True)
        layers = viewer.open(str(args.scan), plugin="spinesegdiff")
        time_stages()
        meter = GapMeter()
        gcm = GcMeter(meter)
        slots = SlotTimer(meter) if args.why else None
        sampler = StallSampler(meter) if args.why else None
        wait_until(lambda: meter.last is not None, 5)
        meter.phase = "dock open"
        t_open = time.perf_counter()
        _dw, w = viewer.window.add_plugin_dock_widget("spinesegdiff", "SpineSegDiff")
        opened = time.perf_counter()
        ready: list[float] = []  # when the dock's preparation of the model finished
        w.models_ready.connect(lambda: ready.append(time.perf_counter() - opened))
        s = w.segment
        s.image.value = layers[0]
        s.slice_mode.value = "all slices"
        wait_until(lambda: meter.last > opened, 30)  # the dock's first paint ends the "dock open" phase
        meter.phase = "before Run"
        wait_until(lambda: time.perf_counter() - opened > args.run_after, args.run_after + 5)
        before_run = max(meter.gaps.get("before Run", [0.0]))
        out = {"dock_open_s": opened - t_open, "dock_gap_ms": max(meter.gaps.get("dock open", [0.0])),
               "gap_before_run_ms": before_run, "message_at_run": w.state.message}
        out["ready_s"] = ready[0] if ready else None
        out["first"] = viewer_run(w, meter, gcm, None)
        if out["ready_s"] is None and ready:
            out["ready_s"] = ready[0]  # it finished during the first run
        out["idle_cores"] = idle_cpu(5.0)
        out["warm"] = viewer_run(w, meter, gcm, None)
        out["cancel"] = viewer_run(w, meter, gcm, args.cancel_after)
        out["shape"] = list(layers[0].data.shape)
        viewer.close()
    finally:
        if display is not None:
            display.stop()
    if sampler is not None:
        sampler.report()
    if slots is not None:
        slots.report()
    tmp.cleanup()
    return out


def _median(values, digits: int = 2) -> str:
    """'median (min-max)' of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    m = statistics.median(v)
    return f"{m:.{digits}f}" if len(v) == 1 else f"{m:.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def _ms(values) -> str:
    return _median(values, 0)


def summary(runs: list[dict], clis: list[float], args) -> None:
    first, warm, cancel = ([r[k] for r in runs] for k in ("first", "warm", "cancel"))
    every = f"every {args.stream_every}. step streamed" if args.stream_every else "no live view"
    shape = " x ".join(str(n) for n in runs[0]["shape"])
    print(f"\nlive view, {args.scan.name} ({shape}), dock defaults (ensemble 5, 10 steps, all slices, {every}), "
          f"{len(runs)} fresh viewers (one process each), Run pressed {args.run_after:g} s after the dock appeared; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} after; medians (range)")
    print("| figure | first run of a fresh viewer | warm run (the second) | target |")
    print("|---|---|---|---|")

    def row(name: str, key: str, fmt, target: str = "") -> None:
        print(f"| {name} | {fmt([r[key] for r in first])} | {fmt([r[key] for r in warm])} | {target} |")

    row("first streamed step after Run (s)", "first_step_s", _median, "< 1 s")
    row("largest event-loop gap during the run (ms)", "gap_run_ms", _ms, "< 100 ms")
    row("largest gap while the result layers arrive (ms)", "gap_results_ms", _ms, "< 100 ms")
    row("largest result stage on the GUI thread (ms)", "largest_stage_ms", _ms)
    row("largest garbage-collector pause in the run and its results (ms)", "gc_ms", _ms)
    print(f"| QA tables filled when run_finished fires | {sum(r['tables_at_finish'] for r in first)} of "
          f"{len(first)} | {sum(r['tables_at_finish'] for r in warm)} of {len(warm)} | all |")
    row("viewer run, Run to run_finished (s)", "total_s", _median)
    row("CPU of the GUI thread in that time (s)", "gui_cpu_s", _median)
    ratios = [[r["total_s"] / c for r, c in zip(runs_k, clis)] for runs_k in (first, warm)]
    print(f"| CLI, whole process, same scan and settings, with --levels as a dock run (s) | {_median(clis)} | | |")
    print(f"| viewer / CLI (each viewer against its interleaved CLI run) | {_median(ratios[0])} | "
          f"{_median(ratios[1])} | <= 1.1 |")
    print(f"\nlargest gap around a cancel ({args.cancel_after:g} s into a third run): "
          f"{_ms([r.get('gap_cancel_ms') for r in cancel])} ms (target < 100 ms); cancel to idle "
          f"{_median([r.get('cancel_to_idle_s') for r in cancel])} s")
    print(f"opening the dock (imports on the GUI thread): {_median([r['dock_open_s'] for r in runs])} s, a gap of "
          f"{_ms([r['dock_gap_ms'] for r in runs])} ms; largest gap from then to Run ({args.run_after:g} s): "
          f"{_ms([r['gap_before_run_ms'] for r in runs])} ms")
    print(f"model prepared (loaded and run once on the scan) {_median([r['ready_s'] for r in runs])} s after the "
          "dock appeared; status line when Run was pressed: "
          + " | ".join(sorted({r['message_at_run'] for r in runs})))
    print(f"CPU of the idle viewer (no run): {_median([r['idle_cores'] for r in runs])} cores")
    for name, rs in (("first", first), ("warm", warm)):
        keys = rs[0]["timings"].keys()
        print(f"pipeline timings inside the {name} run (s, median): "
              + ", ".join(f"{k} {statistics.median(r['timings'][k] for r in rs):.2f}" for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=Path, help="a scan to open (default: a held-out SPIDER scan, else a phantom)")
    ap.add_argument("--fresh", type=int, default=3, help="fresh viewers (processes) to take the medians over")
    ap.add_argument("--run-after", type=float, default=1.0, help="seconds from the dock's appearing to pressing Run")
    ap.add_argument("--cancel-after", type=float, default=4.0, help="seconds into the cancelled run")
    ap.add_argument("--stream-every", type=int, default=1, help="streamed steps (0: no live view)")
    ap.add_argument("--why", action="store_true", help="sample the GUI thread's stack during stalls and print it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one fresh viewer, JSON out
    args = ap.parse_args()
    if args.child:
        out = fresh_viewer(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.scan is None:
            args.scan = SPIDER_SCAN if SPIDER_SCAN.is_file() else make_scan(Path(tmp))
        child = [sys.executable, __file__, "--child", "--scan", str(args.scan), "--run-after", str(args.run_after),
                 "--cancel-after", str(args.cancel_after), "--stream-every", str(args.stream_every)]
        child += ["--why"] if args.why else []
        runs, clis = [], []
        for i in range(args.fresh):
            proc = subprocess.run(child, capture_output=True, text=True)
            lines = proc.stdout.splitlines()
            result = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
            for line in lines:
                if not line.startswith("RESULT "):
                    print(line)
            if proc.returncode != 0 or not result:
                sys.exit(f"fresh viewer {i + 1} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs.append(result[0])
            clis.append(cli_seconds(args.scan))
            f, c = runs[-1]["first"], clis[-1]
            print(f"viewer {i + 1}: first run {f['total_s']:.1f} s (first step {f['first_step_s']:.2f} s), warm "
                  f"{runs[-1]['warm']['total_s']:.1f} s, CLI {c:.1f} s", flush=True)
        summary(runs, clis, args)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # Qt's teardown after the virtual display has gone can crash the interpreter at exit
