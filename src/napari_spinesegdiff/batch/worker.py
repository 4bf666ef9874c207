"""The work per scan (:func:`segment_scan`, a plain picklable function every engine calls) and the skip
logic (:func:`stored_row`): segment, write the outputs and the sidecar, return the results row."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .inputs import input_sha256, input_stat
from .jobs import BatchSettings, ScanJob, _read_json, _write_json, one_sentence
from .levels import report_from_outputs, scan_levels, summary_row, write_report, write_scan_levels
from .qa import measure
from .tables import COLUMNS

_threads_set: int | None = None


def _setup_worker(threads: int) -> None:
    """Torch threads of this process (once; a Dask worker or a pool process)."""
    global _threads_set
    if _threads_set == threads:
        return
    import torch

    torch.set_num_threads(threads)
    _threads_set = threads


def _init_pool_worker(threads: int) -> None:
    """Before torch is imported in a pool process: its OpenMP threads (torch's own are set per scan)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (MiB), where the OS reports it."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return None
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def _base_row(job: ScanJob, settings: BatchSettings) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    out = Path(settings.outdir)
    row.update(scan=job.name, input=job.path, status="failed", error="", model_sha256=settings.model_sha256,
               baseline_sha256=settings.baseline_sha256, settings_sha256=settings.settings_sha256,
               vertebrae=settings.config.vertebrae,
               labels=settings.labels_path(job).relative_to(out).as_posix(),
               uncertainty=settings.uncertainty_path(job).relative_to(out).as_posix(),
               levels=settings.levels_path(job).relative_to(out).as_posix(),
               worker=f"{socket.gethostname()}:{os.getpid()}")
    return row


def stored_row(job: ScanJob, settings: BatchSettings, input_sha: str | None = None) -> dict[str, Any] | None:
    """The stored results row when this scan's outputs are up to date, else None.

    Up to date: the sidecar's key equals this batch's (input hash, model hashes, settings hash) and the
    outputs exist (labels, uncertainty and levels table; the report figure is drawn from them when missing).
    Without ``input_sha`` the input is not read: its recorded size and modification time must be unchanged
    instead.
    """
    side = _read_json(settings.sidecar_path(job))
    info = side.get("batch") if side else None
    if not isinstance(info, dict) or not isinstance(info.get("row"), dict) or not isinstance(info.get("key"), dict):
        return None
    if not all(path.is_file() for path in (settings.labels_path(job), settings.uncertainty_path(job),
                                           settings.levels_path(job))):
        return None
    key = info["key"]
    if input_sha is None:
        stat = input_stat(job.path)
        if stat is None or info.get("input_stat") != stat:
            return None
        input_sha = key.get("input_sha256")
    if key != settings.key(input_sha):
        return None
    return dict(info["row"])


def _skipped(row: dict[str, Any], job: ScanJob, settings: BatchSettings, t0: float) -> dict[str, Any]:
    out = _base_row(job, settings)
    out.update({k: v for k, v in row.items() if k in COLUMNS})
    out.update(status="skipped", error="", seconds=round(time.perf_counter() - t0, 3), input=job.path,
               worker=f"{socket.gethostname()}:{os.getpid()}", peak_rss_mb=None)
    return out


def _report(row: dict[str, Any], draw: Callable[[], Any]) -> None:
    """Draw a scan's report figure; a figure that cannot be drawn is said in ``error``, the scan stays."""
    try:
        draw()
    except Exception as exc:  # noqa: BLE001 - the segmentation and its tables are written already
        row["error"] = f"No report figure: {one_sentence(exc)}"


def segment_scan(job: ScanJob, settings: BatchSettings) -> dict[str, Any]:
    """Segment one scan into its outputs and return its results row; never raises for a bad scan.

    Skips the work when the outputs are up to date (:func:`stored_row` with the input's hash).  Writes the
    labels and the uncertainty map (atomically, in the scan's geometry), the levels table
    (:mod:`.levels`), the report figure with ``settings.report``, then the sidecar with the skip key and the
    row.  Any failure is a ``failed`` row with a one-sentence ``error``.
    """
    t0 = time.perf_counter()
    row = _base_row(job, settings)
    try:
        sha = input_sha256(job.path)
        row["input_sha256"] = sha
        stored = stored_row(job, settings, input_sha=sha)
        if stored is not None:  # the same bytes under a new modification time: record it, skip the work
            side = _read_json(settings.sidecar_path(job))
            if side is not None and side["batch"].get("input_stat") != input_stat(job.path):
                side["batch"]["input_stat"] = input_stat(job.path)
                _write_json(settings.sidecar_path(job), side)
            row = _skipped(stored, job, settings, t0)
            if settings.report and not settings.report_path(job).is_file():
                _report(row, lambda: report_from_outputs(job, settings))
            return row
        _setup_worker(settings.threads)
        from ..io.readers import read_volume
        from ..io.writers import write_volume
        from ..pipeline import run

        cfg = settings.config
        volume = read_volume(job.path, kind="image")
        result = run(volume, cfg, stream_every=0, keep_samples=True)
        row.update(measure(result.canonical_labels, result.canonical_uncertainty,
                           volume.orientation.canonical_spacing, result.slices, cfg.vertebrae))
        levels, inst, why = scan_levels(result, cfg.vertebrae)
        row.update(summary_row(levels, inst, why, row["levels"]))
        chosen = result.slices
        row["slices"] = f"{chosen[0]}:{chosen[-1] + 1}" if chosen else ""
        row["n_slices"] = int(result.canonical_labels.shape[0])
        prov = dict(result.provenance)
        write_volume(result.labels.data, settings.labels_path(job), like=volume, kind="labels", produced_by=prov)
        write_volume(result.uncertainty.data, settings.uncertainty_path(job), like=volume, kind="image",
                     produced_by=prov)
        write_scan_levels(levels, settings.levels_path(job))
        row.update(status="ok", error="", seconds=round(time.perf_counter() - t0, 3),
                   peak_rss_mb=_peak_rss_mb(), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if settings.report and inst is None:
            row["error"] = "No report figure: the levels were not found."
        elif settings.report:
            _report(row, lambda: write_report(settings.report_path(job), volume.canonical(), inst, levels, job.name))
        prov["outputs"] = {"labels": str(settings.labels_path(job)),
                           "uncertainty": str(settings.uncertainty_path(job)),
                           "levels": str(settings.levels_path(job))}
        prov["batch"] = {"key": settings.key(sha), "input_stat": input_stat(job.path), "row": row}
        _write_json(settings.sidecar_path(job), prov)
    except Exception as exc:  # noqa: BLE001 - one bad scan is a row, never the end of the batch
        row.update(status="failed", error=one_sentence(exc), labels=None, uncertainty=None, levels=None)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["peak_rss_mb"] = _peak_rss_mb()
    return row
