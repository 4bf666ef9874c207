"""The batch itself (:func:`run_batch`): find the scans, skip those up to date, run the rest on an engine and
keep the results table current."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import SegmentationConfig
from .engines import _run_dask, _run_inline, _run_pool, default_workers
from .inputs import find_scans
from .jobs import BatchError, ScanJob, _write_json, prepare
from .levels import read_scan_levels, write_levels
from .tables import stored_rows, write_results
from .worker import _skipped, stored_row


@dataclass
class BatchSummary:
    rows: list[dict[str, Any]]
    parquet: Path
    csv: Path
    ignored: list[str] = field(default_factory=list)
    levels_parquet: Path | None = None
    levels_csv: Path | None = None

    def count(self, status: str) -> int:
        return sum(r.get("status") == status for r in self.rows)


class LevelTables:
    """The cohort's levels table, rebuilt from the per-scan tables of the rows ``ok`` or ``skipped`` (each
    read again only when its file changed)."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.paths: tuple[Path | None, Path | None] = (None, None)
        self._read: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # scan -> (file's mtime_ns, rows)

    def rows_of(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if row.get("status") not in ("ok", "skipped") or not row.get("levels"):
            return []
        path = self.outdir / str(row["levels"])
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return []
        cached = self._read.get(row["scan"])
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_scan_levels(path))
            self._read[row["scan"]] = cached
        return cached[1]

    def write(self, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
        self.paths = write_levels(self.outdir, [(r["scan"], self.rows_of(r)) for r in rows])
        return self.paths


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries (``.<name>.<random>.tmp...``) that a killed earlier run left in its own output tree: the
    files they were meant to become are rewritten by this run, so they are removed before it starts."""
    for path in out.rglob(".*.tmp*"):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError:
                pass


def run_batch(
    source: str | os.PathLike,
    outdir: str | os.PathLike,
    config: SegmentationConfig = SegmentationConfig(),
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int = 1,
    suffix: str = ".nii.gz",
    report: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> BatchSummary:
    """Segment every scan of ``source`` (:func:`find_scans`) into ``outdir`` and write the results and levels
    tables.

    ``workers``: local process pool size (None: :func:`default_workers`; 0: in this process);
    ``scheduler``: a Dask scheduler address or ``local:N`` instead of the pool; ``threads``: torch threads
    per worker; ``report``: a PNG per scan (drawn from the outputs of a scan already up to date).  Scans
    already up to date are skipped here, without reading them.  The tables are rewritten every minute and at
    the end (also on Ctrl-C), in the order of the scans, from this run's rows and, for scans this run has not
    reached, the row files of an earlier run with the same model and settings; the levels table from the
    per-scan levels tables of the scans whose row is ``ok`` or ``skipped``.
    """
    out = Path(outdir)
    settings = prepare(config, out, threads, suffix, report)
    jobs, ignored = find_scans(source, out)
    if ignored:
        log(f"ignored {len(ignored)} file(s) whose names mark labels (e.g. {ignored[0]})")
    if not jobs:
        raise BatchError(f"No scans were found in {source}.")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    earlier = stored_rows(jobs, settings)  # rows of an earlier, stopped run: in the table until replaced
    rows: dict[str, dict[str, Any]] = {}
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="scan", desc="batch", file=sys.stderr, dynamic_ncols=True)
    last_table = [time.monotonic()]

    def table_rows() -> list[dict[str, Any]]:
        return [r for r in (rows.get(j.name) or earlier.get(j.name) for j in jobs) if r is not None]

    level_tables = LevelTables(out)

    def table() -> tuple[Path, Path]:
        found = table_rows()
        level_tables.write(found)
        return write_results(out, found)

    def on_row(row: dict[str, Any]) -> None:
        rows[row["scan"]] = row
        _write_json(settings.row_path(ScanJob(row["input"], row["scan"])), row)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"ok {counts['ok']}, skipped {counts['skipped']}, failed {counts['failed']}",
                                refresh=False)
        if time.monotonic() - last_table[0] > 60:
            table()
            last_table[0] = time.monotonic()

    try:
        pending = []
        for job in jobs:
            t0 = time.perf_counter()
            stored = stored_row(job, settings)
            if stored is not None and (not report or settings.report_path(job).is_file()):
                on_row(_skipped(stored, job, settings, t0))
            else:
                pending.append(job)
        if pending:
            if scheduler:
                _run_dask(pending, settings, scheduler, on_row, log)
            else:
                n = default_workers(threads, len(pending)) if workers is None else workers
                if n <= 0:
                    _run_inline(pending, settings, on_row)
                else:
                    _run_pool(pending, settings, n, on_row)
    finally:
        if bar is not None:
            bar.close()
        parquet, csv_path = table()
    return BatchSummary(table_rows(), parquet, csv_path, ignored, *level_tables.paths)
