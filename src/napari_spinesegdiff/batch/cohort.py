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
from .tables import stored_rows, write_results
from .worker import _skipped, stored_row


@dataclass
class BatchSummary:
    rows: list[dict[str, Any]]
    parquet: Path
    csv: Path
    ignored: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.get("status") == status for r in self.rows)


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
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> BatchSummary:
    """Segment every scan of ``source`` (:func:`find_scans`) into ``outdir`` and write the results table.

    ``workers``: local process pool size (None: :func:`default_workers`; 0: in this process);
    ``scheduler``: a Dask scheduler address or ``local:N`` instead of the pool; ``threads``: torch threads
    per worker.  Scans already up to date are skipped here, without reading them.  The table is rewritten
    every minute and at the end (also on Ctrl-C), in the order of the scans, from this run's rows and, for
    scans this run has not reached, the row files of an earlier run with the same model and settings.
    """
    out = Path(outdir)
    settings = prepare(config, out, threads, suffix)
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

    def table() -> tuple[Path, Path]:
        return write_results(out, table_rows())

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
            if stored is not None:
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
    return BatchSummary(table_rows(), parquet, csv_path, ignored)
