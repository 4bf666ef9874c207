"""Measurement intervals from the diffusion ensemble, calibrated on validation cases.

Every measurement of :mod:`.measure` is taken on the final labels and on each ensemble member's labels
(``SegmentationResult.canonical_sample_labels``), the members in the final labels' frames (the same centre,
axis and mid-sagittal plane), each structure from the member's own voxels of its class near the final
structure.  The members' spread ``s`` (their standard deviation) gives the interval

    value +- k (s + f)

where ``f``, the floor, is the median spread of that kind of measurement on the validation cases, at least
the measurement's resolution (:data:`RESOLUTION`: half a voxel of the 0.47 mm validation slabs; the members
often agree to within less than that, so their spread alone would make some intervals vanish), and ``k`` a
split-conformal scale factor fitted on them: the ``ceil((n + 1) 0.9)``-th smallest of
``|final - manual| / (s + f)`` over the ``n`` validation structures, so that about 90 % of intervals hold the
value of the manual labels (:func:`fit_calibration`, ``scripts/calibrate_intervals.py``; stored in
``calibration.json`` beside this module).  A kind is ``<structure>:<measure>`` (``disc:height_middle_mm``);
the three heights of a structure share one factor (three times the validation structures), and kinds with
fewer than :data:`MIN_CALIBRATION` validation structures take the factor of all the structure's measures of
the same unit together.

A measurement that fewer than half of the members could take, or whose spread is over
:data:`UNCERTAIN_SPREAD` (the members disagree by more than a disc's margin), is too uncertain: its value is
left empty and flagged ``uncertain:<measure>``.  numpy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .measure import MEASURES, Measured, measure_structures

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
COVERAGE = 0.9
MIN_CALIBRATION = 10
#: Spread (standard deviation over the members) above which a measurement is too uncertain, by unit.
UNCERTAIN_SPREAD = {"mm": 1.5, "ratio": 0.1, "percent": 5.0}
#: The smallest floor of an interval, by unit: half a 0.47 mm voxel, and what that moves a ratio and a slip.
RESOLUTION = {"mm": 0.235, "ratio": 0.01, "percent": 1.0}


def unit_of(measure: str) -> str:
    return measure.rsplit("_", 1)[-1]


def kind_of(structure: str, measure: str) -> str:
    return f"{structure}:{measure}"


def factor_group(kind: str) -> str:
    """The kinds that share a conformal factor: a structure's three heights, every other kind on its own."""
    structure, measure = kind.split(":", 1)
    return f"{structure}:height" if measure.startswith("height_") else kind


@dataclass(frozen=True)
class Calibration:
    """Per kind of measurement its conformal scale factor and spread floor; ``source`` says how they were
    fitted (cases, counts, coverage on the validation cases)."""

    coverage: float
    factors: dict[str, float]
    floors: dict[str, float]
    source: dict[str, Any] = field(default_factory=dict)

    def half_width(self, kind: str, spread: float) -> float:
        """Half the interval of a measurement of ``kind`` whose members spread by ``spread``; NaN when the
        kind was never calibrated."""
        if kind not in self.factors or not np.isfinite(spread):
            return math.nan
        return self.factors[kind] * (spread + self.floors[kind])

    def to_json(self) -> str:
        return json.dumps({"coverage": self.coverage, "factors": self.factors, "floors": self.floors,
                           "source": self.source}, indent=1, sort_keys=True)


def load_calibration(path: str | Path | None = None) -> Calibration | None:
    """The shipped calibration (or the one at ``path``); None when there is none."""
    path = Path(path) if path is not None else CALIBRATION_PATH
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Calibration(float(data["coverage"]), {k: float(v) for k, v in data["factors"].items()},
                       {k: float(v) for k, v in data["floors"].items()}, data.get("source", {}))


def member_measurements(instance_map: np.ndarray, spacing: Sequence[float], structures, final: list[Measured],
                        members: np.ndarray, classes: np.ndarray | None = None) -> list[list[Measured]]:
    """Each ensemble member's class map (S, slices, rows, cols) measured in the final labels' frames; rows as
    in ``final``."""
    frames = {m.value: m.frame for m in final if m.structure != "canal" and m.frame is not None}
    cache: dict = {}
    return [measure_structures(instance_map, spacing, structures, classes=classes, frames=frames, members=m,
                               cache=cache) for m in members]


def _key(m: Measured) -> tuple[str, str]:
    return (m.structure, m.level)


def spreads(final: list[Measured], members: list[list[Measured]]) -> list[dict[str, tuple[float, int]]]:
    """Per final row and measurement: (standard deviation over the members that measured it, how many did)."""
    by_member = [{_key(m): m for m in rows} for rows in members]
    out = []
    for row in final:
        per = {}
        for measure in MEASURES:
            vals = [b[_key(row)].values[measure] for b in by_member if _key(row) in b]
            vals = [v for v in vals if np.isfinite(v)]
            per[measure] = (float(np.std(vals)) if vals else math.nan, len(vals))
        out.append(per)
    return out


def apply_intervals(final: list[Measured], members: list[list[Measured]], calibration: Calibration | None,
                    n_members: int) -> list[dict[str, tuple[float, float]]]:
    """Per final row, measurement -> (lo, hi); values too uncertain are emptied (NaN) and flagged on the row
    in place (see the module docstring).  Without a calibration, no interval (NaN)."""
    out = []
    for row, spread in zip(final, spreads(final, members)):
        bounds = {}
        for measure in MEASURES:
            value = row.values[measure]
            if not np.isfinite(value):
                continue
            s, n = spread[measure]
            if n * 2 < n_members or s > UNCERTAIN_SPREAD[unit_of(measure)]:
                row.values[measure] = math.nan
                row.flags.append(f"uncertain:{measure.removesuffix('_mm')}")
                continue
            half = calibration.half_width(kind_of(row.structure, measure), s) if calibration else math.nan
            bounds[measure] = (value - half, value + half)
        out.append(bounds)
    return out


def conformal_factor(scores: Sequence[float], coverage: float = COVERAGE) -> float:
    """The split-conformal quantile: the ``ceil((n + 1) coverage)``-th smallest score (the largest when
    ``n`` is too small for that rank)."""
    s = np.sort(np.asarray(scores, float))
    rank = min(len(s), int(math.ceil((len(s) + 1) * coverage)))
    return float(s[rank - 1])


def fit_calibration(records: Sequence[dict[str, Any]], coverage: float = COVERAGE,
                    source: dict[str, Any] | None = None) -> Calibration:
    """``records``: one per (validation structure, measurement) with ``kind``, ``final``, ``manual`` and
    ``spread`` (the members' standard deviation).  The floor of a kind is its median spread, at least its
    :data:`RESOLUTION`; its factor the conformal quantile of ``|final - manual| / (spread + floor)`` over its
    :func:`factor_group`; groups with too few records take the pooled factor of their structure and unit."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if all(np.isfinite([r["final"], r["manual"], r["spread"]])):
            by_kind.setdefault(r["kind"], []).append(r)
    floors = {k: max(float(np.median([r["spread"] for r in rs])), RESOLUTION[unit_of(k)])
              for k, rs in by_kind.items()}
    groups: dict[str, list[float]] = {}
    pooled: dict[str, list[float]] = {}
    for k, rs in by_kind.items():
        scores = [abs(r["final"] - r["manual"]) / (r["spread"] + floors[k]) for r in rs]
        groups.setdefault(factor_group(k), []).extend(scores)
        pooled.setdefault(f"{k.split(':', 1)[0]}:{unit_of(k)}", []).extend(scores)
    factors, counts = {}, {}
    for k, rs in by_kind.items():
        group = factor_group(k)
        if len(groups[group]) < MIN_CALIBRATION:
            group = f"{k.split(':', 1)[0]}:{unit_of(k)}"
        factors[k] = conformal_factor(groups[group] if group in groups else pooled[group], coverage)
        counts[k] = {"n": len(rs), "factor_from": group}
    info = dict(source or {})
    info["counts"] = counts
    return Calibration(coverage, factors, floors, info)
