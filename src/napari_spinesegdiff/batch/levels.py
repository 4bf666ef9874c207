"""The level report of a batch: each scan's levels table (:mod:`napari_spinesegdiff.report`), its summary in
the results row (:func:`summarise`), and the cohort's table of every scan's levels (:func:`write_levels`).

Per scan, ``OUTDIR/<name>_levels.parquet``: the rows of ``spinesegdiff segment --levels`` (one per vertebra
and disc, and per level the canal passes; :data:`napari_spinesegdiff.report.table.COLUMNS`), written by the
worker with the scan's other outputs; Parquet so that the cohort table is rebuilt from them with their types.
A scan whose levels cannot be found (no disc, say) still has its table, with no rows, and says why in
``level_doubt``.

The cohort, ``OUTDIR/levels.parquet`` and ``OUTDIR/levels.csv``: the same rows in long format with the
``scan`` column first (:data:`LEVEL_COLUMNS`), rebuilt from the per-scan tables of the scans whose results
row is ``ok`` or ``skipped`` (a skipped scan keeps its rows), like the results table from ``.rows/``.

Summary columns of the results row (:data:`~.tables.SUMMARY_COLUMNS`), so that a cohort can be ordered by them:

* ``stenosis`` (``L3-L4 absolute; L4 relative``: canal levels under 10 / 12 mm) and ``canal_ap_min_mm``, the
  narrowest canal AP diameter measured;
* ``height_loss`` (``L1 genant2:wedge``: bodies with a Genant grade) and ``height_loss_grade``, the worst grade
  (0 when every body measured has none);
* ``slip`` (``L4 meyerding1``, ``L3 retrolisthesis``) and ``slip_max_percent``, the largest slip in either
  direction (its absolute value);
* ``level_doubt`` (the naming's scan flags such as ``sacrum_out_of_view`` or ``missing_disc:L3-L4``, and
  ``confidence 0.52 at T12`` when the least sure name is under :data:`DOUBT_BELOW`) and ``level_confidence_min``;
* ``level_anchor`` (``sacrum`` or ``lowest disc``: where the counting started) and ``levels`` (the per-scan
  table, relative to OUTDIR).
"""

from __future__ import annotations

import functools
import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

from .jobs import LEVELS_CSV, LEVELS_PARQUET, BatchSettings, ScanJob, one_sentence
from .tables import write_tables

#: A level name with a confidence under this is doubtful (a count from the lowest disc starts at 0.6,
#: from the sacrum at 0.95).
DOUBT_BELOW = 0.7
#: Scan flags of the naming that are a reviewer's choice, not a doubt.
NOT_DOUBT = ("lumbar:", "renumbered:")


@functools.lru_cache(maxsize=1)
def level_columns() -> dict[str, str]:
    """Columns of the cohort's levels table with their Arrow types: ``scan``, then those of the per-scan
    table, read from the schema the report's writer gives an empty table (so they cannot drift apart)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..report.table import table_bytes

    kinds = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}
    schema = pq.read_schema(io.BytesIO(table_bytes([], ".parquet")))
    return {"scan": "string", **{f.name: kinds[f.type] for f in schema}}


def _flags(row: dict[str, Any]) -> list[str]:
    return [f for f in str(row.get("flags") or "").split(";") if f]


def _finite(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarise(rows: Sequence[dict[str, Any]], scan_flags: Sequence[str] = (), anchor: str | None = None,
              error: str | None = None) -> dict[str, Any]:
    """The summary columns (:data:`~.tables.SUMMARY_COLUMNS`, without ``levels``) of one scan's levels rows, the
    naming's scan flags and anchor; ``error``: why the levels could not be found (then in ``level_doubt``)."""
    stenosis, height, slip = [], [], []
    aps, grades, slips, confidences = [], [], [], []
    for r in rows:
        flags, level = _flags(r), str(r.get("level") or "")
        if r.get("structure") == "canal":
            ap = _finite(r.get("ap_diameter_mm"))
            if ap is not None:
                aps.append(ap)
            stenosis += [f"{level} {f.split(':', 1)[1]}" for f in flags if f.startswith("stenosis:")]
            continue
        conf = _finite(r.get("level_confidence"))
        if conf is not None and r.get("value") is not None:  # extra discs (no value) are in the scan flags
            confidences.append((conf, level))
        if r.get("structure") == "vertebra":
            marks = [f for f in flags if re.fullmatch(r"genant\d:\w+", f)]
            height += [f"{level} {f}" for f in marks]
            if _finite(r.get("height_posterior_mm")) is not None:
                grades.append(max([int(f[6]) for f in marks], default=0))
            s = _finite(r.get("slip_percent"))
            if s is not None:
                slips.append(abs(s))
            slip += [f"{level} {f}" for f in flags if f.startswith("meyerding") or f == "retrolisthesis"]
    doubt = [f for f in scan_flags if not f.startswith(NOT_DOUBT)]
    if error:
        doubt.insert(0, f"levels not found: {error}")
    lowest = min(confidences, default=None)
    if lowest is not None and lowest[0] < DOUBT_BELOW:
        doubt.append(f"confidence {lowest[0]:.2f} at {lowest[1]}")
    return {
        "level_anchor": anchor,
        "stenosis": "; ".join(stenosis), "canal_ap_min_mm": min(aps) if aps else None,
        "height_loss": "; ".join(height), "height_loss_grade": max(grades) if grades else None,
        "slip": "; ".join(slip), "slip_max_percent": round(max(slips), 3) if slips else None,
        "level_doubt": "; ".join(doubt),
        "level_confidence_min": round(lowest[0], 4) if lowest is not None else None,
    }


def scan_levels(result, vertebrae: str) -> tuple[list[dict[str, Any]], Any, str | None]:
    """``(rows, instances, None)`` of a :class:`~napari_spinesegdiff.pipeline.SegmentationResult` (with its
    ensemble members: ``segment(keep_samples=True)``), or ``([], None, why)`` when its levels cannot be found:
    the segmentation is kept either way."""
    from ..report.instances import find_instances
    from ..report.levels import levels_for_result

    try:
        inst = find_instances(result.canonical_labels, result.labels.orientation.canonical_spacing,
                              vertebrae=vertebrae)
        return levels_for_result(result, vertebrae, instances=inst), inst, None
    except Exception as exc:  # noqa: BLE001 - no levels is a doubt in the row, never a lost segmentation
        return [], None, one_sentence(exc)


def summary_row(rows: Sequence[dict[str, Any]], inst, error: str | None, levels: str) -> dict[str, Any]:
    """The summary columns of a scan's results row; ``levels``: its table's path relative to OUTDIR."""
    flags, anchor = (inst.flags, inst.anchor) if inst is not None else ((), None)
    return {"levels": levels, **summarise(rows, flags, anchor, error)}


def write_report(path: str | Path, image, inst, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """The scan's report figure (:func:`~napari_spinesegdiff.report.figure.report_png`) as a PNG, atomically."""
    from ..io.outputs import OutputSet
    from ..report.figure import report_png

    data = report_png(image, inst, rows, title=title)
    with OutputSet() as out:
        out.add_bytes(path, data)
        out.commit()
    return Path(path)


def report_from_outputs(job: ScanJob, settings: BatchSettings) -> Path:
    """The report figure of a scan that is up to date, from its outputs (the labels file, named again by the
    same code, and its levels table) and its input: no segmentation.  The measured lines are those of the
    final labels (the table's values, intervals included, are the run's)."""
    from ..io.readers import read_volume
    from ..report.instances import find_instances
    from ..report.levels import levels_for_instances

    volume = read_volume(job.path, kind="image")
    labels = read_volume(settings.labels_path(job), kind="labels").canonical()
    inst = find_instances(labels, volume.orientation.canonical_spacing, vertebrae=settings.config.vertebrae)
    lines = {(r["structure"], r["level"]): r.get("lines") for r in levels_for_instances(inst, classes=labels)}
    rows = [{**r, "lines": lines.get((r["structure"], r["level"])) or []}
            for r in read_scan_levels(settings.levels_path(job))]
    return write_report(settings.report_path(job), volume.canonical(), inst, rows, job.name)


def read_scan_levels(path: str | Path) -> list[dict[str, Any]]:
    """A per-scan levels table back as rows (``[]`` when it is missing or unreadable: the scan is then
    segmented again, since its outputs are not complete)."""
    from ..report.table import read_levels_table

    try:
        return read_levels_table(path)
    except (OSError, ValueError):  # pyarrow's errors are both (ArrowInvalid is a ValueError)
        return []


def write_scan_levels(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One scan's levels table as Parquet, atomically (:func:`~napari_spinesegdiff.report.table.write_levels_table`)."""
    from ..report.table import write_levels_table

    return write_levels_table(rows, path)


def write_levels(outdir: str | Path, tables: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> tuple[Path, Path]:
    """``levels.parquet`` and ``levels.csv`` in ``outdir``: every (scan, rows) pair in long format."""
    rows = [{**r, "scan": scan} for scan, scan_rows in tables for r in scan_rows]
    return write_tables(outdir, rows, level_columns(), (LEVELS_PARQUET, LEVELS_CSV))
