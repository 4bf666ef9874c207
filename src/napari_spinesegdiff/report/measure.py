"""Level-by-level measurements in millimetres: disc and vertebral-body heights and depths, wedge and
biconcavity ratios, the canal's AP diameter at every level, and each vertebra's slip over the one below.

Everything is measured in the scan's physical space, on each structure's own mid-sagittal plane and in the
column's own frame, never along image rows or columns:

* **frame**: a disc's axis is its own minor principal axis (the bisector of its endplates; a wedged or
  sheared disc is measured across its own endplates), a body's the principal axis of its mid-sagittal
  section nearer the column's direction (the chord between its neighbours in the chain of bodies and discs,
  which a body too round for its moments takes instead).  The centre is the point midway between the anterior
  and posterior walls across the axis and midway between the endplates along it.  ``depth`` runs across the
  axis through the centre, the heights along it at 10 / 50 / 90 % of the depth from the anterior wall;
* **mid-sagittal plane**: the structure's left-right centroid; every value is measured on the three
  sagittal slices around it and interpolated there (quadratic), so a thick-slice scan and a round canal give
  the value at the centre rather than at the nearest slice;
* **sub-voxel**: extents come from profiles interpolated bilinearly along each line, the edge where the
  profile crosses one half, over parallel lines in a 2 mm strip: their mean on a binary mask (averaging the
  staircase of edges not aligned with the grid), their median on a partial-volume occupancy (which keeps the
  value at the centre where a height changes steeply across the strip);
* **vertebrae**: a whole vertebra (body and posterior elements in one label) is measured by its body, the
  part in front of the canal (each row's most anterior canal voxel, the median over the slices); with
  ``vertebrae="split"`` classes the body label;
* **slip**: around the disc between a vertebra and the next one down, each body's endplate facing the disc
  (its AP depth :data:`SLIP_DEPTH_MM` inside the body, the midpoint of that depth carried to the endplate
  along the disc's axis); the slip is the upper midpoint's anterior offset over the lower one across the
  disc's axis, in % of the lower endplate's depth (Meyerding's measure, from endplate midpoints rather than
  corners, so the disc's own wedge angle cancels);
* **canal**: the AP diameter on the line across the axis through each disc's and each body's centre, on the
  canal's own mid-sagittal plane at that level.

A structure cut by the field of view (touching the in-plane border) or a line that finds no edge leaves the
value empty (NaN) with a flag saying why (``cut_by_fov``, ``not_measured:...``); the sacrum is not measured
as a body (``sacrum``).  Grading flags: Genant-style ``genant<g>:<type>`` where a body height is reduced by
20 % or more (grade 1 20-25 %, 2 25-40 %, 3 over 40 %; wedge: anterior against posterior, biconcave: middle
against posterior, crush: posterior against the mean posterior height of the neighbouring bodies),
``stenosis:absolute`` (AP diameter under 10 mm) and ``stenosis:relative`` (10-12 mm), ``meyerding<g>`` for a
slip of 10 % or more (grade 1 under 25 %, 2 under 50 %, 3 under 75 %, 4 up to 100 %, 5 beyond) and
``retrolisthesis`` for -10 % or less.  numpy and scipy only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import numpy as np
from scipy import ndimage

from ..column import foreground_box

#: Measurements of a body or disc (mm).
PROFILE = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm", "depth_mm")
#: Every measurement column, in table order.
MEASURES = (*PROFILE, "wedge_ratio", "biconcavity_ratio", "ap_diameter_mm", "slip_percent")
#: Positions of the three heights along the depth, from its anterior end.
HEIGHT_AT = {"height_anterior_mm": 0.1, "height_middle_mm": 0.5, "height_posterior_mm": 0.9}
SLIP_DEPTH_MM = 3.0
STRIP_MM = 2.0  # width of the strip of parallel lines an extent is taken over (a disc's depth: 1 mm)
STENOSIS_ABSOLUTE_MM, STENOSIS_RELATIVE_MM = 10.0, 12.0
GENANT_GRADES = ((0.40, 3), (0.25, 2), (0.20, 1))  # reduction at least -> grade
SLIP_FLAG_PERCENT = 10.0
ROUND_BODY = 0.8  # a body whose principal second moments are closer than this takes the chain's direction
CANAL_BAND_MM = 5.0  # canal voxels this close to a level's line (along the axis) give its mid-sagittal plane


class StructureLike(Protocol):
    """What is measured of a structure (report.instances.Structure has it)."""

    value: int | None
    structure: str  # "vertebra", "disc", "canal"
    level: str


@dataclass(frozen=True)
class Line:
    """One measured line for a viewer: canonical voxel coordinates (slice, row, column) of its ends."""

    measure: str
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    value: float


@dataclass(frozen=True)
class Frame:
    """A structure's mid-sagittal plane (fractional slice), centre (mm: y along rows, z along columns) and
    unit axis (inferior-pointing, (dy, dz))."""

    x: float
    centre: np.ndarray
    axis: np.ndarray

    @property
    def across(self) -> np.ndarray:
        """Unit vector across the axis, pointing posteriorly."""
        return np.array([-self.axis[1], self.axis[0]])


@dataclass
class Measured:
    """One table row before intervals: the structure, its values (NaN where not measured), flags, lines, and
    the frame it was measured in (the ensemble members are measured in the same frames)."""

    value: int | None
    structure: str
    level: str
    values: dict[str, float]
    flags: list[str] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    frame: Frame | None = None


class _Planes:
    """One structure's occupancy (boolean mask or partial volume) in a box of the canonical volume, sampled
    along lines given in millimetres of the whole volume."""

    def __init__(self, occ: np.ndarray, origin: tuple[int, int, int], spacing: Sequence[float]):
        self.occ = occ
        self.k0, self.r0, self.c0 = origin
        self.sy, self.sz = float(spacing[1]), float(spacing[2])
        self.step = 0.25 * min(self.sy, self.sz)
        self.fractional = occ.dtype != bool
        self._planes: dict[int, np.ndarray] = {}

    def voxels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices (in the box) of the occupied voxels, found once."""
        if not hasattr(self, "_voxels"):
            self._voxels = np.nonzero(self.occ)
        return self._voxels

    def has(self, k: int) -> bool:
        j = k - self.k0
        return 0 <= j < self.occ.shape[0] and bool(self.occ[j].any())

    def _plane(self, k: int) -> np.ndarray:
        if k not in self._planes:
            self._planes[k] = np.asarray(self.occ[k - self.k0], np.float32)
        return self._planes[k]

    def runs(self, k: int, p0: np.ndarray, d: np.ndarray, reach: float, offsets=(0.0,), strip=None):
        """Per line ``p0 + o strip + t d`` (|t| <= reach, o in ``offsets``): its sub-voxel runs (t_start,
        t_end) in mm, an end at +-inf where the run reaches the box's border (cut)."""
        t = np.arange(-reach, reach + self.step / 2, self.step)
        offs = np.asarray(offsets, float)[:, None]
        shift = np.zeros(2) if strip is None else strip
        rows = (p0[0] + offs * shift[0] + t * d[0]) / self.sy - self.r0
        cols = (p0[1] + offs * shift[1] + t * d[1]) / self.sz - self.c0
        plane = self._plane(k)
        prof = ndimage.map_coordinates(plane, [rows.ravel(), cols.ravel()], order=1, mode="constant", cval=0.0)
        prof = prof.reshape(rows.shape)
        inside = (rows >= 0) & (rows <= plane.shape[0] - 1) & (cols >= 0) & (cols <= plane.shape[1] - 1)
        n_t = len(t)
        pad = np.zeros((len(prof), 1), np.int8)
        change = np.diff(np.concatenate([pad, (prof >= 0.5).astype(np.int8), pad], axis=1), axis=1)
        lines, first = np.nonzero(change == 1)  # first sample of each run (row-major: runs in order)
        _, after = np.nonzero(change == -1)  # first sample after it
        out: list[list[tuple[float, float]]] = [[] for _ in range(len(prof))]
        for li, a, b in zip(lines, first, after):
            p = prof[li]
            start = -np.inf if a == 0 else t[a - 1] + (0.5 - p[a - 1]) / (p[a] - p[a - 1]) * self.step
            end = np.inf if b == n_t else t[b - 1] + (0.5 - p[b - 1]) / (p[b] - p[b - 1]) * self.step
            # a run that touches the box's edge (the image border, or the box) is cut
            if a > 0 and not inside[li, max(a - 3, 0)]:
                start = -np.inf
            if b < n_t and not inside[li, min(b + 2, n_t - 1)]:
                end = np.inf
            out[li].append((float(start), float(end)))
        return out

    def extent(self, k: int, p0: np.ndarray, d: np.ndarray, strip: np.ndarray, reach: float,
               pick=None, half_width: float = STRIP_MM / 2, start_only: bool = False) -> tuple[float, float] | None:
        """(t_start, t_end) of the chosen run over the strip of lines parallel to ``d`` offset along ``strip``
        by up to ``half_width`` mm (mean on a mask, median on a partial volume, see the module docstring);
        ``pick`` chooses a line's run (default: the one through t=0, else the nearest); None when fewer than
        half the lines find one or a chosen run is cut (``start_only``: only its start counts)."""
        n = max(1, int(round(half_width / self.step / 2)) * 2 + 1)
        offsets = np.linspace(-half_width, half_width, n) if n > 1 else np.zeros(1)
        found = []
        for runs in self.runs(k, p0, d, reach, offsets, strip):
            run = (pick or _through_zero)(runs)
            if run is None:
                continue
            if not np.isfinite(run[0]) or not (start_only or np.isfinite(run[1])):
                return None
            found.append((run[0], run[0]) if start_only else run)
        if len(found) * 2 < n:
            return None
        arr = np.array(found)
        if self.fractional:
            mid, length = np.median(arr.sum(axis=1) / 2), np.median(arr[:, 1] - arr[:, 0])
            return float(mid - length / 2), float(mid + length / 2)
        return float(arr[:, 0].mean()), float(arr[:, 1].mean())


def _through_zero(runs: list) -> tuple[float, float] | None:
    if not runs:
        return None
    return min(runs, key=lambda r: 0.0 if r[0] <= 0.0 <= r[1] else min(abs(r[0]), abs(r[1])))


def _first_after(runs: list) -> tuple[float, float] | None:
    """The first run beyond t = 0 (the canal behind a body or disc)."""
    later = [r for r in runs if r[0] > 0.0]
    return min(later) if later else None


def _interpolate(values: dict[int, float], x: float) -> float:
    """The value at fractional slice ``x`` from the slices measured: quadratic through three neighbours,
    linear through two, the one otherwise; NaN without any."""
    ks = sorted(k for k, v in values.items() if np.isfinite(v))
    if not ks:
        return math.nan
    if len(ks) == 1:
        return float(values[ks[0]])
    if len(ks) == 3 and ks[2] - ks[0] == 2:
        f = x - ks[1]
        return float(values[ks[0]] * f * (f - 1) / 2 + values[ks[1]] * (1 - f * f) + values[ks[2]] * f * (f + 1) / 2)
    a, b = ks[0], ks[-1]
    w = min(max((x - a) / (b - a), 0.0), 1.0)
    return float((1 - w) * values[a] + w * values[b])


def _mid_slices(x: float, planes: _Planes) -> list[int]:
    k = int(round(x))
    return [j for j in (k - 1, k, k + 1) if planes.has(j)]


# --------------------------------------------------------------------------------------------- frames
def _canal_front(canal: np.ndarray | None, rows: int) -> np.ndarray | None:
    """Per row, the column of the canal's anterior wall: the median over the slices of each slice's most
    anterior canal voxel in that row; rows without canal from the nearest rows."""
    if canal is None or not canal.any():
        return None
    front = np.where(canal.any(axis=2), np.argmax(canal, axis=2), -1).astype(float)  # (slices, rows)
    front[front < 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_row = np.nanmedian(front, axis=0)
    have = np.flatnonzero(np.isfinite(per_row))
    return np.interp(np.arange(rows), have, per_row[have]) if have.size else None


def body_part(mask: np.ndarray, front: np.ndarray | None, origin=(0, 0, 0), largest: bool = True) -> np.ndarray:
    """A whole vertebra's body: its voxels in front of the canal's anterior wall (:func:`_canal_front`, rows
    and columns of the whole volume; ``mask`` a box of it at ``origin``), the largest 3-D part."""
    if front is None:
        return mask
    r0, c0 = origin[1], origin[2]
    wall = front[r0:r0 + mask.shape[1]] - c0
    body = mask & (np.arange(mask.shape[2])[None, None, :] < wall[None, :, None])
    if largest and body.any():
        comp, n = ndimage.label(body)
        if n > 1:
            body = comp == int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
    return body


def _principal_axis(planes: _Planes, x: float, kind: str, chord: np.ndarray | None) -> np.ndarray:
    """A structure's own axis from the (occupancy-weighted) second moments of its slice nearest ``x``: a
    disc's minor principal axis; a body's principal axis nearer the chain's chord (the rows' direction without
    one), or the chord itself where the body is too round for its moments to say."""
    fallback = chord if chord is not None else np.array([1.0, 0.0])
    k = int(round(x))
    if not planes.has(k):
        return fallback
    plane = planes._plane(k)
    r, c = np.nonzero(plane)
    w = plane[r, c].astype(float)
    if len(w) < 3:
        return fallback
    pts = np.stack([(r + planes.r0) * planes.sy, (c + planes.c0) * planes.sz], axis=1)
    vals, vecs = np.linalg.eigh(np.cov(pts.T, aweights=w))
    if kind == "disc":
        axis = vecs[:, 0]
    elif vals[0] > ROUND_BODY * vals[1]:
        return fallback
    else:
        axis = max(vecs.T, key=lambda v: abs(v @ fallback))
    return axis if axis[0] >= 0 else -axis


def _chain_axes(centres: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Index -> the column's direction there: the chord between its neighbours in the chain (by row)."""
    order = sorted(centres, key=lambda i: centres[i][0])
    out = {}
    for j, i in enumerate(order):
        d = centres[order[min(j + 1, len(order) - 1)]] - centres[order[max(j - 1, 0)]]
        if np.hypot(*d) > 0:
            out[i] = d / np.hypot(*d)
    return out


def _centred(planes: _Planes, x: float, centre: np.ndarray, axis: np.ndarray, reach: float) -> Frame:
    """The frame at the structure's geometric centre: midway between its walls across the axis, then between
    its endplates along it (twice, from the centroid, on the slice nearest ``x``)."""
    frame = Frame(x, centre, axis)
    k = int(round(x))
    if not planes.has(k):
        return frame
    c = centre
    for _ in range(2):
        for d in (frame.across, axis):
            run = _through_zero(planes.runs(k, c, d, reach)[0])
            if run is None or not np.all(np.isfinite(run)):
                return Frame(x, c, axis)
            c = c + d * (run[0] + run[1]) / 2
    return Frame(x, c, axis)


# --------------------------------------------------------------------------------------------- measures
def _to_voxels(x: float, p: np.ndarray, spacing) -> tuple[float, float, float]:
    return (float(x), float(p[0] / spacing[1]), float(p[1] / spacing[2]))


def _lines(ends: dict[str, dict[int, tuple]], values: dict[str, float], x: float, spacing) -> list[Line]:
    """The measured lines, from the slice nearest the mid-sagittal plane, in canonical voxel coordinates."""
    out = []
    for key, by_slice in ends.items():
        if by_slice and np.isfinite(values.get(key, math.nan)):
            a, b = by_slice[min(by_slice, key=lambda j: abs(j - x))]
            out.append(Line(key, _to_voxels(x, a, spacing), _to_voxels(x, b, spacing), values[key]))
    return out


def _profile(planes: _Planes, frame: Frame, reach: float, disc: bool, spacing) -> tuple[dict[str, float], list]:
    """Depth through the centre and the three heights, each interpolated to the mid-sagittal plane."""
    n, t = frame.across, frame.axis
    per: dict[str, dict[int, float]] = {k: {} for k in PROFILE}
    ends: dict[str, dict[int, tuple]] = {k: {} for k in PROFILE}
    for k in _mid_slices(frame.x, planes):
        run = planes.extent(k, frame.centre, n, t, reach, half_width=STRIP_MM / 4 if disc else STRIP_MM / 2)
        if run is None:
            continue
        va, vp = run
        per["depth_mm"][k] = vp - va
        ends["depth_mm"][k] = (frame.centre + n * va, frame.centre + n * vp)
        for key, f in HEIGHT_AT.items():
            p = frame.centre + n * (va + f * (vp - va))
            h = planes.extent(k, p, t, n, reach)
            if h is not None:
                per[key][k] = h[1] - h[0]
                ends[key][k] = (p + t * h[0], p + t * h[1])
    values = {key: _interpolate(per[key], frame.x) for key in PROFILE}
    return values, _lines(ends, values, frame.x, spacing)


def _canal_ap(canal: _Planes, frame: Frame, spacing, reach: float) -> tuple[float, Line | None, str | None]:
    """The canal's AP diameter across the axis through ``frame``'s centre, on the canal's own mid-sagittal
    plane there (the left-right centroid of its voxels within :data:`CANAL_BAND_MM` of the line)."""
    k, r, c = canal.voxels()
    u = ((r + canal.r0) * spacing[1] - frame.centre[0]) * frame.axis[0] \
        + ((c + canal.c0) * spacing[2] - frame.centre[1]) * frame.axis[1]
    near = np.abs(u) <= CANAL_BAND_MM
    if not near.any():
        return math.nan, None, "canal_not_found"
    x = float(k[near].mean()) + canal.k0
    per, ends, cut = {}, {}, False
    for j in _mid_slices(x, canal):
        run = canal.extent(j, frame.centre, frame.across, frame.axis, reach, pick=_first_after)
        if run is None:
            cut = cut or _first_after(canal.runs(j, frame.centre, frame.across, reach)[0]) is not None
            continue
        per[j] = run[1] - run[0]
        ends[j] = (frame.centre + frame.across * run[0], frame.centre + frame.across * run[1])
    value = _interpolate(per, x)
    if not np.isfinite(value):
        return math.nan, None, "cut_by_fov:ap_diameter" if cut else "canal_not_found"
    return value, _lines({"ap_diameter_mm": ends}, {"ap_diameter_mm": value}, x, spacing)[0], None


def _endplate_midpoint(planes: _Planes, disc: Frame, below: bool, reach: float):
    """The midpoint of a body's endplate facing the disc and that endplate's depth (see the module
    docstring), interpolated to the disc's mid-sagittal plane; None when not found."""
    t = disc.axis * (1.0 if below else -1.0)
    mids, depths = {}, {}
    for k in _mid_slices(disc.x, planes):
        ahead = [r for r in planes.runs(k, disc.centre, t, reach)[0] if r[1] > 0]
        if not ahead or not np.isfinite(min(ahead)[0]):
            continue
        p = disc.centre + t * (max(min(ahead)[0], 0.0) + SLIP_DEPTH_MM)
        run = planes.extent(k, p, disc.across, t, reach, half_width=0.5)
        if run is None:
            continue
        mid = p + disc.across * (run[0] + run[1]) / 2
        back = planes.extent(k, mid, t, disc.across, reach, half_width=0.5, start_only=True)
        if back is None:
            continue
        mids[k], depths[k] = mid + t * back[0], run[1] - run[0]
    if not mids:
        return None
    point = np.array([_interpolate({k: m[i] for k, m in mids.items()}, disc.x) for i in range(2)])
    return point, _interpolate(depths, disc.x)


def genant_flag(values: dict[str, float], reference_posterior: float) -> str | None:
    """The worst Genant-style height reduction of a body, as ``genant<grade>:<wedge|biconcave|crush>``."""
    post = values.get("height_posterior_mm", math.nan)
    reductions = {}
    if np.isfinite(post) and post > 0:
        reductions["wedge"] = 1 - values.get("height_anterior_mm", math.nan) / post
        reductions["biconcave"] = 1 - values.get("height_middle_mm", math.nan) / post
        if np.isfinite(reference_posterior) and reference_posterior > 0:
            reductions["crush"] = 1 - post / reference_posterior
    reductions = {k: v for k, v in reductions.items() if np.isfinite(v)}
    if not reductions:
        return None
    kind = max(reductions, key=lambda key: reductions[key])
    grade = next((g for floor, g in GENANT_GRADES if reductions[kind] >= floor), None)
    return f"genant{grade}:{kind}" if grade else None


def meyerding_flag(slip: float) -> str | None:
    if not np.isfinite(slip) or abs(slip) < SLIP_FLAG_PERCENT:
        return None
    if slip < 0:
        return "retrolisthesis"
    return f"meyerding{min(5, int(slip // 25) + 1)}"


def stenosis_flag(ap: float) -> str | None:
    if not np.isfinite(ap):
        return None
    if ap < STENOSIS_ABSOLUTE_MM:
        return "stenosis:absolute"
    return "stenosis:relative" if ap < STENOSIS_RELATIVE_MM else None


def is_sacrum(s: StructureLike) -> bool:
    return s.structure == "vertebra" and s.level.upper().startswith("S")


# --------------------------------------------------------------------------------------------- driver
@dataclass
class _Item:
    """A vertebra or disc being measured: its index in ``structures``, occupancy planes, flags, frame."""

    index: int
    planes: _Planes
    x: float
    centroid: np.ndarray
    cut: bool
    frame: Frame | None = None


@dataclass
class _Shape:
    """A body or disc of the final labels in its own box: the mask (a vertebra's body), where it lies."""

    box: tuple[slice, ...]
    mask: np.ndarray
    x: float
    centroid: np.ndarray
    cut: bool
    _near: np.ndarray | None = None

    @property
    def origin(self) -> tuple[int, int, int]:
        return tuple(b.start for b in self.box)  # type: ignore[return-value]

    @property
    def near(self) -> np.ndarray:
        """The mask grown by two voxels: where an ensemble member's voxels of its class belong to it."""
        if self._near is None:
            self._near = ndimage.binary_dilation(self.mask, iterations=2)
        return self._near


def _shapes(inst, spacing, structures, front, split, classes) -> dict[int, _Shape]:
    """Structure index -> its :class:`_Shape` for every body and disc in the instance map."""
    boxes = ndimage.find_objects(inst) if inst.size and inst.max() > 0 else []
    pad = (1, 3, 3)
    out = {}
    for i, s in enumerate(structures):
        if s.structure not in ("vertebra", "disc") or s.value is None or not 0 < s.value <= len(boxes):
            continue
        box = boxes[s.value - 1]
        if box is None:
            continue
        box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, inst.shape))
        origin = tuple(b.start for b in box)
        mask = inst[box] == s.value
        if s.structure == "vertebra":
            mask = (mask & (classes[box] == 2)) if split else body_part(mask, front, origin)
        if not mask.any():
            continue
        touches = bool(mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
        cut = touches and any(b.start == 0 or b.stop == n for b, n in zip(box[1:], inst.shape[1:]))
        idx = np.nonzero(mask)
        x = float(idx[0].mean()) + origin[0]
        mid = np.abs(idx[0] + origin[0] - round(x)) <= 1
        centroid = np.array([(idx[1][mid].mean() + origin[1]) * spacing[1], (idx[2][mid].mean() + origin[2]) * spacing[2]])
        out[i] = _Shape(box, mask, x, centroid, cut)
    return out


def _items(shapes: dict[int, _Shape], structures, spacing, front, split, fractions, member) -> dict[int, _Item]:
    """The items to measure: each shape's mask, or its partial volume, or an ensemble member's voxels of its
    class near it (the member's body in front of the member's canal)."""
    out = {}
    for i, sh in shapes.items():
        kind = structures[i].structure
        occ = sh.mask
        if member is not None:
            occ = sh.near & (member[sh.box] == (2 if kind == "vertebra" else 3))
            if kind == "vertebra" and not split:
                occ = body_part(occ, front, sh.origin)
        elif fractions is not None:
            occ = fractions[1 if kind == "vertebra" else 2][sh.box] * sh.near
        out[i] = _Item(i, _Planes(occ, sh.origin, spacing), sh.x, sh.centroid, sh.cut)
    return out


#: In-plane voxels kept around the instance map's foreground when it is measured (more than the pad of a
#: structure's box, so a box touches the cropped edge only where that edge is the image's).
BOX_MARGIN = 6


def measure_structures(instance_map: np.ndarray, spacing: Sequence[float], structures: Sequence[StructureLike], *,
                       classes: np.ndarray | None = None, fractions: np.ndarray | None = None,
                       frames: dict[int, Frame] | None = None, members: np.ndarray | None = None,
                       along: str = "column", cache: dict | None = None) -> list[Measured]:
    """Every measurement of :func:`_measure` (its docstring), taken on the rows and columns of the instance
    map's foreground grown by :data:`BOX_MARGIN` (every array cropped alike, so the work follows the spine,
    not the field of view); frames and lines come back in the whole map's coordinates."""
    spacing = tuple(float(s) for s in spacing)
    inst = np.asarray(instance_map)
    cache = {} if cache is None else cache
    if "box" not in cache:
        box = foreground_box(inst, BOX_MARGIN) if inst.ndim == 3 else (slice(0, 0),) * 2
        cache["box"] = box if box[0].stop else (slice(None), slice(None))  # nothing labelled: the whole map
    rs, cs = cache["box"]
    r0, c0 = rs.start or 0, cs.start or 0
    shift_mm = np.array([r0 * spacing[1], c0 * spacing[2]])

    def crop(a):
        return None if a is None else np.asarray(a)[..., rs, cs]

    local = None if frames is None else {v: replace(f, centre=np.asarray(f.centre) - shift_mm)
                                         for v, f in frames.items() if f is not None}
    out = _measure(inst[:, rs, cs], spacing, structures, classes=crop(classes), fractions=crop(fractions),
                   frames=local, members=crop(members), along=along, cache=cache)
    if r0 or c0:
        for row in out:
            if row.frame is not None:
                row.frame = replace(row.frame, centre=np.asarray(row.frame.centre) + shift_mm)
            row.lines = [replace(ln, start=(ln.start[0], ln.start[1] + r0, ln.start[2] + c0),
                                 end=(ln.end[0], ln.end[1] + r0, ln.end[2] + c0)) for ln in row.lines]
    return out


def _measure(inst: np.ndarray, spacing: tuple[float, ...], structures: Sequence[StructureLike], *,
             classes: np.ndarray | None, fractions: np.ndarray | None, frames: dict[int, Frame] | None,
             members: np.ndarray | None, along: str, cache: dict) -> list[Measured]:
    """Every measurement of the module docstring on a canonical instance map (structure ``value``s), ``spacing``
    in mm per canonical axis.  Rows: the bodies and discs in the order of ``structures``, then the canal's (one
    per disc and per body, top to bottom) when a canal structure is given.

    ``classes``: the class map in the project's scheme; with posterior elements (4) present, a vertebra's body
    is its label-2 part.  ``fractions`` (3, slices, rows, cols): partial volumes of canal, vertebra (or body)
    and disc to measure on instead of the masks (a phantom's truth, or probabilities).  ``members`` with
    ``frames`` (value -> Frame of the final labels' measurement): an ensemble member's class map, measured in
    those frames, each structure from the member's voxels near the final structure.  ``along="rows"``
    measures heights along image rows and depths along columns (only to show what that costs).  ``cache``: a
    dict shared by the calls for one final labels and its members (the final shapes are found once)."""
    canal_s = next((s for s in structures if s.structure == "canal" and s.value is not None), None)
    split = classes is not None and bool(np.any(classes == 4))
    if "shapes" not in cache:
        final_canal = inst == canal_s.value if canal_s is not None else None
        cache["canal"] = final_canal
        cache["shapes"] = _shapes(inst, spacing, structures, _canal_front(final_canal, inst.shape[1])
                                  if final_canal is not None else None, split, classes)
    canal_mask = cache["canal"]
    if members is not None and canal_mask is not None:
        if "canal_near" not in cache:
            cache["canal_near"] = ndimage.binary_dilation(canal_mask, iterations=2)
        canal_mask = (members == 1) & cache["canal_near"]
    front = _canal_front(canal_mask, inst.shape[1]) if canal_mask is not None else None
    items = _items(cache["shapes"], structures, spacing, front, split, fractions, members)
    reach_of = {i: 0.6 * float(np.hypot(it.planes.occ.shape[1] * spacing[1], it.planes.occ.shape[2] * spacing[2]))
                for i, it in items.items()}
    if frames is not None:
        for i, it in items.items():
            it.frame = frames.get(structures[i].value)
    else:
        chain = {i: it.centroid for i, it in items.items() if not it.cut and not is_sacrum(structures[i])}
        chords = _chain_axes(chain) if len(chain) >= 2 else {}
        for i, it in items.items():
            axis = _principal_axis(it.planes, it.x, structures[i].structure, chords.get(i))
            if along == "rows":
                axis = np.array([1.0, 0.0])
            it.frame = _centred(it.planes, it.x, it.centroid, axis, reach_of[i])

    rows: list[Measured] = []
    by_index: dict[int, Measured] = {}
    for i, s in enumerate(structures):
        if s.structure == "canal":
            continue
        row = Measured(s.value, s.structure, s.level, {k: math.nan for k in MEASURES})
        rows.append(row)
        by_index[i] = row
        it = items.get(i)
        if it is None or it.frame is None:
            row.flags.append("not_measured:empty")
            continue
        row.frame = it.frame
        if it.cut:
            row.flags.append("cut_by_fov")
            continue
        if is_sacrum(s):
            row.flags.append("sacrum")
            continue
        values, lines = _profile(it.planes, it.frame, reach_of[i], s.structure == "disc", spacing)
        row.values.update(values)
        row.lines += lines
        missing = [k.removesuffix("_mm") for k in PROFILE if not np.isfinite(values[k])]
        if missing:
            row.flags.append("not_measured:" + ",".join(missing))
        if s.structure == "vertebra":
            post = values["height_posterior_mm"]
            row.values["wedge_ratio"] = values["height_anterior_mm"] / post if post > 0 else math.nan
            row.values["biconcavity_ratio"] = values["height_middle_mm"] / post if post > 0 else math.nan

    _grade_bodies(structures, items, by_index)
    _slips(structures, items, by_index, spacing, max(reach_of.values(), default=1.0))
    if canal_mask is not None and canal_mask.any():
        rows += _canal_rows(structures, items, by_index, canal_mask, fractions, members is not None, spacing)
    return rows


def _grade_bodies(structures, items: dict[int, _Item], by_index: dict[int, Measured]) -> None:
    bodies = sorted((i for i in by_index if structures[i].structure == "vertebra" and i in items
                     and np.isfinite(by_index[i].values["height_posterior_mm"])), key=lambda i: items[i].centroid[0])
    for j, i in enumerate(bodies):
        neigh = [by_index[bodies[k]].values["height_posterior_mm"] for k in (j - 1, j + 1) if 0 <= k < len(bodies)]
        flag = genant_flag(by_index[i].values, float(np.mean(neigh)) if neigh else math.nan)
        if flag:
            by_index[i].flags.append(flag)


def _slips(structures, items: dict[int, _Item], by_index: dict[int, Measured], spacing, reach: float) -> None:
    """Each vertebra's slip over the next vertebra down, around the disc between them."""
    verts = sorted((i for i, s in enumerate(structures) if s.structure == "vertebra" and i in items
                    and items[i].frame is not None), key=lambda i: items[i].centroid[0])
    discs = [i for i, s in enumerate(structures) if s.structure == "disc" and i in items and not items[i].cut
             and items[i].frame is not None]
    for up, lo in zip(verts[:-1], verts[1:]):
        row = by_index[up]
        if is_sacrum(structures[up]) or items[up].cut:
            continue
        between = [d for d in discs if items[up].centroid[0] < items[d].centroid[0] < items[lo].centroid[0]]
        if not between:
            row.flags.append("slip:no_disc_below")
            continue
        disc = items[min(between, key=lambda d: items[d].centroid[0])].frame
        a = _endplate_midpoint(items[up].planes, disc, below=False, reach=reach)
        b = _endplate_midpoint(items[lo].planes, disc, below=True, reach=reach)
        if a is None or b is None or not b[1] > 0:
            row.flags.append("slip:endplate_not_found")
            continue
        slip = float(-(a[0] - b[0]) @ disc.across) / b[1] * 100.0
        row.values["slip_percent"] = slip
        row.lines.append(Line("slip_percent", _to_voxels(disc.x, b[0], spacing), _to_voxels(disc.x, a[0], spacing), slip))
        flag = meyerding_flag(slip)
        if flag:
            row.flags.append(flag)


def _canal_rows(structures, items, by_index, canal_mask, fractions, member: bool, spacing) -> list[Measured]:
    """One canal row per disc and body (not the sacrum, not cut by the field of view), top to bottom."""
    box = ndimage.find_objects(canal_mask.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, (1, 3, 3), canal_mask.shape))
    origin = tuple(b.start for b in box)
    occ = canal_mask[box] if fractions is None or member else fractions[0][box] * ndimage.binary_dilation(
        canal_mask[box], iterations=2)
    planes = _Planes(occ, origin, spacing)
    levels = sorted((i for i, it in items.items() if not it.cut and it.frame is not None and not is_sacrum(structures[i])),
                    key=lambda i: items[i].centroid[0])
    out = []
    for i in levels:
        row = Measured(None, "canal", structures[i].level, {k: math.nan for k in MEASURES}, frame=items[i].frame)
        reach = by_index[i].values.get("depth_mm", math.nan)
        reach = (reach if np.isfinite(reach) else 60.0) + 40.0
        value, line, why = _canal_ap(planes, items[i].frame, spacing, reach)
        row.values["ap_diameter_mm"] = value
        if line is not None:
            row.lines.append(line)
        flag = why or stenosis_flag(value)
        if flag:
            row.flags.append(flag)
        out.append(row)
    return out


def as_row(m: Measured, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A table row without intervals: value, structure, level, ``extra``, the measurements, flags (';')."""
    row: dict[str, Any] = {"value": m.value, "structure": m.structure, "level": m.level}
    row.update(extra or {})
    row.update({k: m.values[k] for k in MEASURES})
    row["flags"] = ";".join(m.flags)
    return row
