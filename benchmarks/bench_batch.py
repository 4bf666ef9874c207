"""Cohort throughput: ``spinesegdiff batch`` through the local process pool and a Dask LocalCluster.

Writes ``--scans`` phantoms of 15 sagittal 320 x 320 slices at 0.625 mm (the scan of bench_inference.py),
segments them with default settings (presegmentation prior, S = 5, 10 steps, all slices) once through the
local pool and once through a Dask LocalCluster, each with ``--workers`` one-thread workers, and prints
scans per minute (in all and per core), seconds per scan, the peak memory of a worker and what a
10,000-scan cohort costs.  Run:

    python benchmarks/bench_batch.py [--scans 4] [--workers 2] [--engines pool,dask] [--keep DIR]

Wall times include starting the workers and loading the model in each (once per worker); the Dask
cluster's own start is timed apart.  On a machine shared with other jobs the figures are low and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

COHORT = 10_000


def write_scans(folder: Path, n: int) -> None:
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(n):
        ph = make_phantom(seed=seed, spacing=(3.5, 0.625, 0.625), fov_mm=(52.5, 200.0, 200.0))
        write_volume(ph.image.data, folder / f"scan{seed:03d}.nii.gz", like=ph.image, kind="image")


def report(name: str, wall: float, summary, workers: int) -> float:
    rows = [r for r in summary.rows if r["status"] == "ok"]
    if len(rows) != len(summary.rows):
        print(f"  {name}: {len(summary.rows) - len(rows)} scans did not finish ok")
    per_min = len(rows) / wall * 60
    per_core = per_min / workers
    secs = statistics.median(r["seconds"] for r in rows)
    peak = max(r["peak_rss_mb"] or 0 for r in rows)
    print(f"  {name}: {len(rows)} scans in {wall:.1f} s = {per_min:.2f} scans/min, {per_core:.2f} scans/min "
          f"per core ({workers} one-thread workers); median {secs:.1f} s per scan inside a worker; "
          f"peak memory per worker {peak:.0f} MiB")
    return per_core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", default="pool,dask", help="comma-separated: pool, dask")
    ap.add_argument("--keep", type=Path, help="keep the scans and outputs in this folder")
    args = ap.parse_args()

    from napari_spinesegdiff.batch import run_batch
    from napari_spinesegdiff.config import SegmentationConfig

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_batch_")
    root = args.keep or Path(tmp.name)
    scans = root / "scans"
    write_scans(scans, args.scans)
    cfg = SegmentationConfig()  # default settings
    print(f"{args.scans} phantoms (15 x 320 x 320 at 0.625 mm), default settings "
          f"(S={cfg.ensemble}, {cfg.steps} steps, all slices); {os.cpu_count()} CPUs here; load average "
          f"{os.getloadavg()[0]:.2f} before the runs")
    rates = {}
    if "pool" in engines:
        t0 = time.perf_counter()
        summary = run_batch(scans, root / "out_pool", cfg, workers=args.workers, threads=1, progress=False,
                            log=lambda m: None)
        rates["local pool"] = report("local pool", time.perf_counter() - t0, summary, args.workers)
    if "dask" in engines:
        import logging

        from dask.distributed import LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        start = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            summary = run_batch(scans, root / "out_dask", cfg, scheduler=cluster.scheduler_address,
                                threads=1, progress=False, log=lambda m: None)
            wall = time.perf_counter() - t0
        finally:
            cluster.close()
        print(f"  (Dask LocalCluster of {args.workers} workers started in {start:.1f} s, not counted below)")
        rates["Dask LocalCluster"] = report("Dask LocalCluster", wall, summary, args.workers)
    print(f"load average after the runs {os.getloadavg()[0]:.2f}")
    for name, rate in rates.items():
        core_hours = COHORT / rate / 60
        line = ", ".join(f"{m} x 32 cores {core_hours / (32 * m):.1f} h" for m in (1, 10, 50))
        print(f"{COHORT:,} scans at {rate:.2f} scans/min/core ({name}): {core_hours:,.0f} core-hours; {line}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
