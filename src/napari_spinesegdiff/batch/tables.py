"""The results table: its columns (:data:`COLUMNS`), written as Parquet and CSV (:func:`write_results`, through
:func:`write_tables`, which also writes the cohort's levels table), and the row files of an earlier run
(:func:`stored_rows`)."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .jobs import RESULTS_CSV, RESULTS_PARQUET, BatchSettings, ScanJob, _read_json
from .qa import STRUCTURES

#: The level report's summary columns of the results row, with their Arrow types (filled by
#: :func:`~napari_spinesegdiff.batch.levels.summarise`, which says what they hold).
SUMMARY_COLUMNS: dict[str, str] = {
    "levels": "string", "level_anchor": "string",
    "stenosis": "string", "canal_ap_min_mm": "float64",
    "height_loss": "string", "height_loss_grade": "int64",
    "slip": "string", "slip_max_percent": "float64",
    "level_doubt": "string", "level_confidence_min": "float64",
}
#: The summary columns a review queue orders by: (text column, number column, +1 when larger is worse).
FINDINGS = (("stenosis", "canal_ap_min_mm", -1), ("height_loss", "height_loss_grade", 1),
            ("slip", "slip_max_percent", 1), ("level_doubt", "level_confidence_min", -1))
#: Columns of the results table, in order, with their Arrow types.
COLUMNS: dict[str, str] = {
    "scan": "string", "input": "string", "status": "string", "error": "string", "seconds": "float64",
    "input_sha256": "string", "model_sha256": "string", "baseline_sha256": "string",
    "settings_sha256": "string", "vertebrae": "string", "slices": "string", "n_slices": "int64",
    "labels": "string", "uncertainty": "string",
    **{f"{s}_{m}": "float64" for s in STRUCTURES.values() for m in ("ml", "unc_mean", "unc_max")},
    "canal_pieces": "int64", "vertebra_levels": "int64", "disc_levels": "int64",
    "uncertainty_score": "float64", "qa_flags": "string", "qa_pass": "bool", **SUMMARY_COLUMNS,
    "worker": "string", "peak_rss_mb": "float64", "finished": "string",
}


def _arrow_schema(columns: dict[str, str]):
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}
    return pa.schema([(name, types[kind]) for name, kind in columns.items()])


def _clean_row(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, kind in columns.items():
        v = row.get(name)
        if v is not None:
            try:
                v = {"string": str, "float64": float, "int64": int, "bool": bool}[kind](v)
            except (TypeError, ValueError):
                v = None
        out[name] = v
    return out


def write_tables(outdir: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: dict[str, str],
                 names: tuple[str, str]) -> tuple[Path, Path]:
    """The Parquet and CSV files ``names`` in ``outdir`` (each written to a temporary file, then
    ``os.replace``) of ``rows``, with ``columns`` (name -> Arrow type; missing cells empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [_clean_row(r, columns) for r in rows]
    table = pa.Table.from_pylist(clean, schema=_arrow_schema(columns))
    paths = (out / names[0], out / names[1])
    for path in paths:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            if path.suffix == ".parquet":
                pq.write_table(table, tmp)
            else:
                with open(tmp, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(columns))
                    w.writeheader()
                    for r in clean:
                        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return paths


def write_results(outdir: str | os.PathLike, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``results.parquet`` and ``results.csv`` in ``outdir``, columns :data:`COLUMNS` (:func:`write_tables`)."""
    return write_tables(outdir, rows, COLUMNS, (RESULTS_PARQUET, RESULTS_CSV))


def stored_rows(jobs: list[ScanJob], settings: BatchSettings) -> dict[str, dict[str, Any]]:
    """The row files of ``jobs`` under ``OUTDIR/.rows`` made with this batch's model and settings
    (name -> row; a job without one is left out)."""
    rows = {}
    for job in jobs:
        r = _read_json(settings.row_path(job))
        if (r is not None and r.get("scan") == job.name and r.get("settings_sha256") == settings.settings_sha256
                and r.get("model_sha256") == settings.model_sha256):
            rows[job.name] = r
    return rows
