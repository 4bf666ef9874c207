"""The dock's level report, Qt-free: the structures of a result named by level (``L4-L5 disc``, ``L4 vertebra``,
``canal at L3-L4``), their measurements with intervals, and what the viewer shows of them.

:func:`compute_levels` runs in a worker thread (after a run, with the run's ensemble members, or on the labels
layer as it is, edits included, without them) and :func:`renumber` there too, on the inputs the report kept:
the report package (:mod:`..report.instances`, :mod:`..report.levels`) does the naming and the measuring, this
module only the dock's side of it:

* :func:`title`, :func:`measure_text`, :data:`TABLE_MEASURES` -- the Review tab's rows;
* :func:`instance_features` -- the ``instances`` labels layer's features (one row per SPIDER value, with the
  ``index`` column napari maps label values by): hovering a structure shows its level name and measurements;
* :func:`measured_lines` -- the ``measurements`` layer: every measured line, its value as its text;
* :func:`position` -- where a row's "go there" moves the viewer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..report.measure import MEASURES
from ..report.table import interval_names

#: The Review tab's measurement columns: (header, table column).
TABLE_MEASURES: tuple[tuple[str, str], ...] = (
    ("H ant mm", "height_anterior_mm"), ("H mid mm", "height_middle_mm"), ("H post mm", "height_posterior_mm"),
    ("depth mm", "depth_mm"), ("wedge", "wedge_ratio"), ("biconc.", "biconcavity_ratio"),
    ("canal AP mm", "ap_diameter_mm"), ("slip %", "slip_percent"))
#: Short names of the measured lines' text in the viewer.
LINE_NAMES = {"height_anterior_mm": "Ha", "height_middle_mm": "Hm", "height_posterior_mm": "Hp", "depth_mm": "D",
              "ap_diameter_mm": "AP", "slip_percent": "slip"}
#: Colour of each kind of measured line (none of the label colours: a line stays visible over its structure).
LINE_COLORS = {"height_anterior_mm": "cyan", "height_middle_mm": "cyan", "height_posterior_mm": "cyan",
               "depth_mm": "magenta", "ap_diameter_mm": "lime", "slip_percent": "orange"}


@dataclass(frozen=True)
class LevelInputs:
    """What a level report is computed from (kept, so that a renumbering measures the same labels again)."""

    classes: np.ndarray  # canonical class map (a copy: 1 canal, 2 vertebra or body, 3 disc, 4 posterior elements)
    spacing: tuple[float, float, float]  # mm per canonical axis
    vertebrae: str  # "whole" or "split"
    uncertainty: np.ndarray | None = None  # canonical, float32
    members: np.ndarray | None = field(default=None, repr=False)  # (S, slices, rows, cols) ensemble labels
    source: str = "run"  # "run" (the run's result and its members) or "labels" (the labels layer, no intervals)


@dataclass(frozen=True)
class LevelReport:
    """One scan's named structures and table rows (``rows``: the levels table's rows, each with its ``lines``),
    or the sentence that says why there are none (``error``)."""

    inputs: LevelInputs
    base: Any = None  # report.instances.Instances as found (no shift)
    instances: Any = None  # the same, renumbered by ``shift``
    rows: tuple[dict[str, Any], ...] = ()
    shift: int = 0
    error: str | None = None
    seconds: float = 0.0

    @property
    def has_intervals(self) -> bool:
        return any(r.get(interval_names(m)[0]) is not None for r in self.rows for m in MEASURES)

    @property
    def anchor(self) -> str:
        return getattr(self.base, "anchor", "")

    @property
    def scan_flags(self) -> tuple[str, ...]:
        return tuple(getattr(self.instances, "flags", ()) or ())


def compute_levels(inputs: LevelInputs, shift: int = 0) -> LevelReport:
    """The level report of ``inputs`` (worker thread): instances named, renumbered by ``shift``, measured.

    A report that cannot be made (labels without discs, a failure in the report code) comes back with its
    ``error`` sentence instead of raising: the run's segmentation stands without it."""
    from ..report.instances import find_instances

    t0 = time.perf_counter()
    try:
        base = find_instances(inputs.classes, inputs.spacing, vertebrae=inputs.vertebrae)
    except Exception as exc:  # noqa: BLE001 - said on the Review tab; the segmentation is kept
        return LevelReport(inputs, error=_sentence(exc), seconds=time.perf_counter() - t0)
    return _measured(LevelReport(inputs, base=base), shift, t0)


def renumber(report: LevelReport, shift: int) -> LevelReport:
    """``report`` with every name ``shift`` levels down from the automatic naming (+1: L4 -> L5; absolute),
    measured again on the same inputs (a vertebra that becomes the sacrum is no longer measured as a body)."""
    if report.base is None:
        return report
    return _measured(report, shift, time.perf_counter())


def _measured(report: LevelReport, shift: int, t0: float) -> LevelReport:
    from ..report.levels import levels_for_instances

    inp = report.inputs
    try:
        inst = report.base.renumbered(int(shift))
        rows = levels_for_instances(inst, classes=inp.classes, uncertainty=inp.uncertainty, members=inp.members)
    except Exception as exc:  # noqa: BLE001 - said on the Review tab; the segmentation is kept
        return LevelReport(inp, base=report.base, shift=int(shift), error=_sentence(exc),
                           seconds=time.perf_counter() - t0)
    return LevelReport(inp, report.base, inst, tuple(rows), int(shift), None, time.perf_counter() - t0)


def _sentence(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def inputs_from_result(result, spacing, vertebrae: str) -> LevelInputs | None:
    """The inputs of a pipeline ``SegmentationResult`` (its ensemble members when it kept them); ``None`` for a
    model whose channels are not the label scheme's (no anatomy to name)."""
    from ..labelscheme import ChannelRoles

    if not ChannelRoles.of(result.class_names).known:
        return None
    return LevelInputs(np.asarray(result.canonical_labels), tuple(float(s) for s in spacing), vertebrae,
                       np.asarray(result.canonical_uncertainty, np.float32), result.canonical_sample_labels, "run")


# ------------------------------------------------------------------------------------------ presentation


def title(row: dict[str, Any]) -> str:
    """A row's name as the Review tab lists it: ``L4-L5 disc``, ``L4 vertebra``, ``S1 (sacrum)``, ``canal at L3-L4``."""
    level, kind = str(row.get("level") or "?"), row.get("structure")
    if kind == "canal":
        return f"canal at {level}"
    if kind == "vertebra" and level.upper().startswith("S"):
        return f"{level} (sacrum)"
    return f"{level} {kind}"


def _digits(measure: str) -> int:
    return 2 if measure.endswith("_ratio") else 1


def measure_text(row: dict[str, Any], measure: str) -> str:
    """``9.8 ± 0.4`` (the 90 % interval, when symmetric), ``9.8 (9.3-10.4)`` (when not), ``9.8`` (no interval),
    ``""`` (not measured)."""
    value = _num(row.get(measure))
    if value is None:
        return ""
    d = _digits(measure)
    lo, hi = (_num(row.get(n)) for n in interval_names(measure))
    if lo is None or hi is None:
        return f"{value:.{d}f}"
    if math.isclose(value - lo, hi - value, rel_tol=1e-6, abs_tol=1e-9):
        return f"{value:.{d}f} ± {hi - value:.{d}f}"
    return f"{value:.{d}f} ({lo:.{d}f}-{hi:.{d}f})"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def position(report: LevelReport, row: dict[str, Any]) -> tuple[float, float, float] | None:
    """Where to show ``row`` (canonical slice, row, column): its structure's centroid; a canal row the middle of
    its measured line, else the centroid of the structure at its level."""
    inst = report.instances
    if inst is None:
        return None
    if row.get("value") is not None and row.get("structure") != "canal":
        try:
            return tuple(float(c) for c in inst.by_value(int(row["value"])).centroid)  # type: ignore[return-value]
        except KeyError:
            return None
    lines = row.get("lines") or ()
    if lines:
        a, b = np.asarray(lines[0].start, float), np.asarray(lines[0].end, float)
        return tuple(float(c) for c in (a + b) / 2)  # type: ignore[return-value]
    try:
        return tuple(float(c) for c in inst.by_level(str(row.get("level"))).centroid)  # type: ignore[return-value]
    except KeyError:
        return None


def instance_features(report: LevelReport):
    """The ``instances`` layer's features (pandas): per SPIDER value its ``level`` name, ``confidence``, the key
    ``measured`` values and its ``flags`` (napari's status bar shows them where the cursor is)."""
    import pandas as pd

    inst = report.instances
    by_value = {r["value"]: r for r in report.rows if r.get("value") is not None and r.get("structure") != "canal"}
    canal_rows = [r for r in report.rows if r.get("structure") == "canal" and _num(r.get("ap_diameter_mm"))]
    index, level, conf, measured, flags = [0], ["background"], [math.nan], [""], [""]
    for s in (inst.structures if inst is not None else ()):
        if s.value is None:
            continue
        index.append(int(s.value))
        conf.append(round(float(s.level_confidence), 2))
        flags.append(";".join(s.flags))
        if s.structure == "canal":
            level.append("spinal canal")
            narrow = min(canal_rows, key=lambda r: float(r["ap_diameter_mm"]), default=None)
            measured.append(f"narrowest AP {measure_text(narrow, 'ap_diameter_mm')} mm at {narrow['level']}"
                            if narrow else "")
            continue
        row = by_value.get(s.value, {"level": s.level, "structure": s.structure})
        level.append(title(row))
        parts = [f"{LINE_NAMES.get(m, h)} {t}" for h, m in TABLE_MEASURES if (t := measure_text(row, m))]
        measured.append(", ".join(parts))
        if row.get("flags"):
            flags[-1] = ";".join(dict.fromkeys(filter(None, [*s.flags, *str(row["flags"]).split(";")])))
    return pd.DataFrame({"index": index, "level": level, "confidence": conf, "measured": measured, "flags": flags})


def measured_lines(report: LevelReport):
    """The ``measurements`` layer's data: (lines, features) -- each line a (2, 3) array of canonical voxel
    coordinates on the slice nearest its structure's mid-sagittal plane (where it was measured), and per line
    its ``label`` (the text drawn: ``Hm 9.8``), ``level``, ``measure``, ``value`` and ``color``.  Lines whose
    value the table leaves empty (too uncertain, cut) are not drawn."""
    import pandas as pd

    lines, label, level, measure, value, color = [], [], [], [], [], []
    for row in report.rows:
        for ln in row.get("lines") or ():
            v = _num(row.get(ln.measure))
            if v is None:
                continue
            a, b = np.asarray(ln.start, float), np.asarray(ln.end, float)
            a[0] = b[0] = float(np.round((a[0] + b[0]) / 2))  # measured on that slice
            lines.append(np.stack([a, b]))
            unit = "%" if ln.measure.endswith("_percent") else ""
            label.append(f"{LINE_NAMES.get(ln.measure, ln.measure)} {v:.{_digits(ln.measure)}f}{unit}")
            level.append(title(row))
            measure.append(ln.measure)
            value.append(v)
            color.append(LINE_COLORS.get(ln.measure, "white"))
    features = pd.DataFrame({"label": label, "level": level, "measure": measure, "value": value, "color": color})
    return lines, features


def summary(report: LevelReport | None) -> str:
    """The line above the Review tab's levels table: the anchor, the numbering, the scan's flags, intervals."""
    if report is None:
        return "Levels: none yet (run a segmentation)."
    if report.error:
        return f"Levels: not named ({report.error})"
    shift = f"numbering shifted {report.shift:+d} by you" if report.shift else "numbering as found"
    parts = [f"counted from the {report.anchor}" if report.anchor else "", shift]
    flags = [f for f in report.scan_flags if not f.startswith("renumbered:")]
    if flags:
        parts.append("flags: " + ", ".join(flags))
    if report.inputs.source != "run":
        parts.append("no intervals (measured on the labels layer as it is; Run again for intervals)")
    elif not report.has_intervals:
        parts.append("no intervals (one ensemble member, or no calibration)")
    else:
        parts.append("± = 90 % interval from the ensemble")
    return "Levels: " + "; ".join(p for p in parts if p) + "."
