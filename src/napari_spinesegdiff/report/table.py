"""The levels table: one row per vertebra and disc, and per level the canal passes, written as CSV or Parquet.

Columns (:data:`COLUMNS`): ``value`` (the structure's value in the instance map; empty on canal rows),
``structure`` (``vertebra``, ``disc``, ``canal``), ``level`` (``L4``, ``L4-L5``; a canal row the level it
is measured at), ``level_confidence``, ``volume_ml`` (the whole structure: a vertebra with its posterior
elements; empty on canal rows), ``uncertainty_mean`` (the uncertainty map's mean over the structure, on a
canal row over the canal within 5 mm of the level's line), then each measurement of :mod:`.measure` with its
interval (the unit stays last: ``height_middle_mm``, ``height_middle_lo_mm``, ``height_middle_hi_mm``;
``wedge_ratio``, ``wedge_lo_ratio``, ``wedge_hi_ratio``; ``slip_percent``, ``slip_lo_percent``, ...), and
``flags`` (``;``-joined).  Values that were not measured, and intervals without a calibration (``spinesegdiff
measure``), are empty.  Tables are written to a temporary file beside the target and moved onto it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .measure import CANAL_BAND_MM, MEASURES, Measured

TABLE_SUFFIXES = (".csv", ".parquet")


def interval_names(measure: str) -> tuple[str, str]:
    """``height_middle_mm`` -> (``height_middle_lo_mm``, ``height_middle_hi_mm``): the unit stays last."""
    base, unit = measure.rsplit("_", 1)
    return f"{base}_lo_{unit}", f"{base}_hi_{unit}"


COLUMNS: tuple[str, ...] = ("value", "structure", "level", "level_confidence", "volume_ml", "uncertainty_mean",
                            *[c for m in MEASURES for c in (m, *interval_names(m))], "flags")
_TEXT = {"structure", "level", "flags"}


class TableError(ValueError):
    """A levels table that cannot be written, in one sentence."""


def check_table_path(path: str | Path) -> Path:
    """A ``.csv`` or ``.parquet`` path whose folder can take it (before any long work)."""
    from ..io.outputs import check_output_path

    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise TableError(f"The levels table {path} must end in .csv or .parquet.")
    check_output_path(path, "levels table", volume=False)
    return path


def levels_rows(structures: Sequence[Any], measured: Sequence[Measured], *, instance_map: np.ndarray,
                spacing: Sequence[float], uncertainty: np.ndarray | None = None,
                intervals: Sequence[dict[str, tuple[float, float]]] | None = None) -> list[dict[str, Any]]:
    """Table rows (:data:`COLUMNS`) from the measured rows and their structures (``value``, ``level``,
    ``level_confidence``, ``flags``): volumes and mean uncertainty from the canonical ``instance_map``; each row
    also keeps its measured ``lines`` (canonical voxel coordinates), which the table files leave out."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    inst = np.asarray(instance_map)
    boxes = ndimage.find_objects(inst) if inst.size and inst.max() > 0 else []
    by_value = {s.value: s for s in structures if s.value is not None}
    canal = next((s for s in structures if s.structure == "canal" and s.value is not None), None)
    rows = []
    canal_idx = None  # the canal's voxels, found once
    for j, m in enumerate(measured):
        own = by_value.get(m.value) if m.structure != "canal" else None
        ref = own or next((s for s in structures if s.level == m.level and s.structure != "canal"), None)
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row.update(value=m.value, structure=m.structure, level=m.level,
                   level_confidence=getattr(ref, "level_confidence", None))
        if m.structure == "canal":
            if uncertainty is not None and canal is not None and m.frame is not None:
                if canal_idx is None:
                    canal_idx = np.nonzero(inst == canal.value)
                row["uncertainty_mean"] = _band_mean(canal_idx, uncertainty, m.frame, spacing)
        elif m.value is not None and 0 < m.value <= len(boxes) and boxes[m.value - 1] is not None:
            box = boxes[m.value - 1]
            mask = inst[box] == m.value
            row["volume_ml"] = float(mask.sum()) * voxel_ml
            if uncertainty is not None:
                row["uncertainty_mean"] = float(np.asarray(uncertainty)[box][mask].mean())
        for measure in MEASURES:
            row[measure] = _number(m.values.get(measure))
            lo, hi = (intervals[j].get(measure, (math.nan, math.nan)) if intervals is not None else (math.nan, math.nan))
            lo_name, hi_name = interval_names(measure)
            row[lo_name], row[hi_name] = _number(lo), _number(hi)
        flags = [*(getattr(own, "flags", ()) or ()), *m.flags]
        row["flags"] = ";".join(dict.fromkeys(flags))
        row["lines"] = list(m.lines)  # what was measured, for figures and the viewer (not a table column)
        rows.append(row)
    return rows


def _number(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _band_mean(canal_idx: tuple[np.ndarray, ...], uncertainty: np.ndarray, frame, spacing) -> float | None:
    """The uncertainty's mean over the canal (its voxel indices) within :data:`CANAL_BAND_MM` of a level's
    line."""
    k, r, c = canal_idx
    u = (r * spacing[1] - frame.centre[0]) * frame.axis[0] + (c * spacing[2] - frame.centre[1]) * frame.axis[1]
    near = np.abs(u) <= CANAL_BAND_MM
    return float(np.asarray(uncertainty)[k[near], r[near], c[near]].mean()) if near.any() else None


def table_bytes(rows: Sequence[dict[str, Any]], suffix: str) -> bytes:
    """The table as ``.csv`` (empty cells for missing values) or ``.parquet`` (typed, nulls) bytes."""
    if suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {c: pa.string() if c in _TEXT else pa.int64() if c == "value" else pa.float64() for c in COLUMNS}
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows],
                                     schema=pa.schema([(c, types[c]) for c in COLUMNS]))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})
    return text.getvalue().encode("utf-8")


def write_levels_table(rows: Sequence[dict[str, Any]], path: str | Path, outputs=None) -> Path:
    """Write the table to ``path`` (.csv or .parquet) through a temporary file moved onto it; with
    ``outputs`` (an :class:`~..io.outputs.OutputSet`), as one of that set, moved with the others."""
    from ..io.outputs import OutputSet

    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise TableError(f"The levels table {path} must end in .csv or .parquet.")
    data = table_bytes(rows, path.suffix)
    if outputs is not None:
        return outputs.add_bytes(path, data)
    with OutputSet() as out:
        out.add_bytes(path, data)
        out.commit()
    return path


def read_levels_table(path: str | Path) -> list[dict[str, Any]]:
    """A written table back as rows (numbers as floats, missing values as None)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="") as fh:
        return [{c: (None if v == "" else v if c in _TEXT else float(v)) for c, v in r.items()} for r in csv.DictReader(fh)]
