"""Where the scans run: in this process, a local spawn-context process pool (the default) or a Dask
distributed cluster; each calls :func:`~.worker.segment_scan` and hands every row to ``on_row``."""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable

from . import worker
from .jobs import BatchError, BatchSettings, ScanJob, one_sentence
from .worker import _base_row, _init_pool_worker, segment_scan


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Memory one local worker needs at its peak on a 15-slice scan with default settings (benchmarks/bench_batch.py).
WORKER_MEMORY_BYTES = 2 * 2**30


def default_workers(threads: int = 1, jobs: int | None = None) -> int:
    """max(1, cores // threads), also limited by the memory available (:data:`WORKER_MEMORY_BYTES` each)
    and by the number of scans."""
    n = max(1, cpu_cores() // max(1, threads))
    try:
        import psutil

        n = min(n, max(1, int(psutil.virtual_memory().available // WORKER_MEMORY_BYTES)))
    except Exception:  # noqa: BLE001 - psutil is optional here
        pass
    if jobs is not None:
        n = min(n, max(1, jobs))
    return n


def _died(job: ScanJob, settings: BatchSettings, why: str) -> dict[str, Any]:
    row = _base_row(job, settings)
    row.update(status="failed", error=why, seconds=None, labels=None, uncertainty=None, levels=None)
    return row


def _run_inline(jobs: list[ScanJob], settings: BatchSettings, on_row: Callable[[dict], None]) -> None:
    """In this process, one scan after the other; torch's thread count is restored afterwards."""
    import torch

    before, before_set = torch.get_num_threads(), worker._threads_set
    try:
        for job in jobs:
            on_row(segment_scan(job, settings))
    finally:
        torch.set_num_threads(before)
        worker._threads_set = before_set


def _run_pool(jobs: list[ScanJob], settings: BatchSettings, workers: int, on_row: Callable[[dict], None],
              fn: Callable[[ScanJob, BatchSettings], dict] = segment_scan) -> None:
    """A spawn-context process pool with at most 2 x workers scans in flight.  When a worker process dies
    (out of memory, a crash), the scans in flight are run again one at a time in a new pool; a scan that
    kills its worker while alone is a failed row.  ``fn`` is :func:`segment_scan` (another only in tests)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    queue, solo = deque(jobs), deque()
    while queue or solo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(settings.threads,))
        inflight: dict[Any, tuple[ScanJob, bool]] = {}
        broken = finished = False
        try:
            while (queue or solo or inflight) and not broken:
                if solo:
                    if not inflight:
                        job = solo.popleft()
                        inflight[pool.submit(fn, job, settings)] = (job, True)
                else:
                    while queue and len(inflight) < 2 * workers:
                        job = queue.popleft()
                        inflight[pool.submit(fn, job, settings)] = (job, False)
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        row = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    inflight.pop(fut)
                    on_row(row)
            if broken:
                for fut, (job, alone) in inflight.items():
                    if alone:
                        on_row(_died(job, settings, "The worker process died while segmenting this scan "
                                                     "(out of memory or a crash)."))
                    else:
                        solo.append(job)
            finished = True
        finally:
            pool.shutdown(wait=finished and not broken, cancel_futures=True)


def _run_dask(jobs: list[ScanJob], settings: BatchSettings, scheduler: str, on_row: Callable[[dict], None],
              log: Callable[[str], None]) -> None:
    """Send the scans to a Dask distributed cluster: ``ADDRESS`` (an existing scheduler, e.g.
    ``tcp://host:8786``) or ``local:N`` (a LocalCluster of N one-thread worker processes here)."""
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == "local" or scheduler.startswith("local:"):
        n = scheduler.partition(":")[2]
        try:
            workers = int(n) if n else default_workers(settings.threads, len(jobs))
        except ValueError:
            raise BatchError(f"--scheduler local:N takes a number of workers, got {scheduler!r}.") from None
        import logging

        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise BatchError(f"No Dask scheduler answers at {scheduler} ({exc}).") from None
    try:
        import importlib.util

        services = client.scheduler_info().get("services", {})
        if "dashboard" in services:
            local_without_bokeh = cluster is not None and importlib.util.find_spec("bokeh") is None
            hint = " (its pages need bokeh>=3.1 installed here)" if local_without_bokeh else ""
            log(f"Dask dashboard: {client.dashboard_link}{hint}")
        else:
            log(f"Dask scheduler {client.scheduler.address} (it serves no dashboard)")
        futures = {}
        for job in jobs:
            futures[client.submit(segment_scan, job, settings, pure=False)] = job
        for fut in as_completed(list(futures)):
            job = futures.pop(fut)
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and the like: one failed row
                row = _died(job, settings, f"The Dask task failed: {one_sentence(exc)}")
            fut.release()
            on_row(row)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
