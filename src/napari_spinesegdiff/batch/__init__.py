"""Cohorts: segment many scans into a mirrored output tree and one results table (``spinesegdiff batch``).

No Qt, no napari.  The work per scan is :func:`segment_scan`, a plain picklable function, run by a local
``concurrent.futures.ProcessPoolExecutor`` (the default) or sent to a Dask distributed cluster; every engine
calls the pipeline with the one :class:`~napari_spinesegdiff.config.SegmentationConfig` (its ``seed``
included), so labels do not depend on which worker or engine made them.

Layout of ``OUTDIR`` for an input ``site1/sub-01.nii.gz`` (names mirror the input tree, extension dropped):

* ``site1/sub-01_labels.nii.gz`` and ``site1/sub-01_uncertainty.nii.gz`` in the scan's geometry
  (:func:`~napari_spinesegdiff.io.writers.write_volume`, atomic);
* ``site1/sub-01.json``: the pipeline's provenance plus a ``batch`` section with the skip key (input,
  model and settings hashes), the output paths and the scan's results row;
* ``.rows/site1/sub-01.json``: the row of the latest run (written atomically as each scan finishes);
* ``site1/sub-01_levels.parquet``: the scan's levels table (a row per vertebra, disc and canal level, the
  columns of ``segment --levels``), and with ``--report`` ``site1/sub-01_report.png``, its mid-sagittal
  slice with the level names, the measured lines and the measurements (:mod:`.levels`);
* ``results.parquet`` and ``results.csv``: one row per scan (:data:`COLUMNS`, with the level report's summary
  columns), rebuilt from the rows;
* ``levels.parquet`` and ``levels.csv``: every scan's levels rows in long format (``scan`` first), rebuilt from
  the per-scan tables.

Resuming: a scan is *skipped* when its sidecar holds the same key and its outputs exist (labels, uncertainty,
levels table; a missing report figure is drawn from them).  The parent checks this without reading the input
again when the input's size and modification time are the ones recorded; otherwise the worker hashes the
input and compares.  Failed scans are retried on every run.

QA columns (``qa_flags``, ``qa_pass``, ``uncertainty_score``): :mod:`.qa`.

The package, by job (each imports only the ones below it, checked by ``.importlinter``): :mod:`.cohort`
(:func:`run_batch`), :mod:`.engines` (in this process, a local pool, Dask), :mod:`.worker` (:func:`segment_scan`
and the skip logic), :mod:`.levels` (the levels tables, their summary, the report figure), :mod:`.tables` (the
results table), :mod:`.inputs` (:func:`find_scans`, input hashes), :mod:`.qa` (:func:`measure`) and
:mod:`.jobs` (:class:`ScanJob`, :class:`BatchSettings`, the model and settings hashes).
"""

from __future__ import annotations

from .cohort import BatchSummary, run_batch
from .engines import WORKER_MEMORY_BYTES, _run_dask, _run_inline, _run_pool, cpu_cores, default_workers
from .inputs import SCAN_SUFFIXES, TABLE_SUFFIXES, find_scans, input_sha256, input_stat
from .jobs import (LEVELS_CSV, LEVELS_PARQUET, OUTPUT_SUFFIXES, RESULTS_CSV, RESULTS_PARQUET, ROWS_DIR, BatchError,
                   BatchSettings, ScanJob, _read_json, _sha256_file, _write_json, model_sha256, one_sentence, prepare,
                   settings_sha256)
from .levels import DOUBT_BELOW, level_columns, read_scan_levels, summarise, write_levels
from .qa import (BAND_MM, CANAL_MIN_COVER, CANAL_PIECE_SHARE, EXPECTED_DISCS, EXPECTED_VERTEBRAE, LEVEL_MIN_SHARE,
                 MAX_LEVEL_MISMATCH, PLAUSIBLE_ML, STRUCTURES, measure)
from .tables import COLUMNS, FINDINGS, SUMMARY_COLUMNS, stored_rows, write_results
from .worker import _base_row, _skipped, segment_scan, stored_row

__all__ = [
    "BAND_MM", "CANAL_MIN_COVER", "CANAL_PIECE_SHARE", "COLUMNS", "DOUBT_BELOW", "EXPECTED_DISCS",
    "EXPECTED_VERTEBRAE", "FINDINGS", "LEVELS_CSV", "LEVELS_PARQUET", "LEVEL_MIN_SHARE", "MAX_LEVEL_MISMATCH",
    "OUTPUT_SUFFIXES", "PLAUSIBLE_ML", "RESULTS_CSV", "RESULTS_PARQUET", "ROWS_DIR", "SCAN_SUFFIXES", "STRUCTURES",
    "SUMMARY_COLUMNS", "TABLE_SUFFIXES", "WORKER_MEMORY_BYTES", "BatchError", "BatchSettings", "BatchSummary",
    "ScanJob", "cpu_cores", "default_workers", "find_scans", "input_sha256", "input_stat", "level_columns",
    "measure", "model_sha256", "one_sentence", "prepare", "read_scan_levels", "run_batch", "segment_scan",
    "settings_sha256", "stored_row", "stored_rows", "summarise", "write_levels", "write_results",
]
