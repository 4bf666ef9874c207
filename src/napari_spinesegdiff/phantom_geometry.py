"""The phantom's analytic shapes, shared by the painter (:mod:`.phantom`) and by the geometry it was built with.

Bodies, discs and the dural sac are drawn from closed-form shape functions in the canonical sagittal frame
(millimetres: ``x`` left-right from the slab centre, ``y`` superior-inferior from the top row, ``z``
anterior-posterior from the first column).  :func:`construction_geometry` evaluates the same functions along
the lines a radiologist measures on, in each structure's own frame (its centre and the column's tangent
there), and finds where each structure's label starts and stops to 1e-4 mm: the *constructed* disc and body
heights at 10 / 50 / 90 % of the depth, the depths, the canal's AP diameter at every disc and body, and each
vertebra's slip over the one below.  :mod:`.report.measure` measures the same quantities on a label map; the
phantom's numbers are what it must find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Ids of the analytic label map of :func:`construction_geometry` (bodies ``BODY + i``, discs ``DISC + i``).
CANAL_ID, BODY_ID, DISC_ID = 100, 10, 30
#: The endplate depth line of the slip lies this far (mm) inside the body from its endplate.
SLIP_DEPTH_MM = 3.0
_LINE_MM = 50.0  # half-length of a measurement line
_STEP_MM = 0.1  # coarse sampling before the ends are bisected
_BISECT = 12


@dataclass(frozen=True)
class _Seg:
    """A body (or disc) in the mid-sagittal plane: centre (y, z) mm, tangent angle, sizes (mm)."""

    y: float
    z: float
    theta: float  # angle of the column axis from straight-down, positive tilting posteriorly
    h: float
    a: float
    w: float
    x: float  # LR centre (mm from the slab centre)
    conc: float = 0.0  # endplate concavity (mm) of a body
    wedge: float = 0.0  # a body's loss of anterior height (fraction at the anterior wall, 0 at the posterior)


def _tangent(theta: float) -> np.ndarray:
    return np.array([np.cos(theta), np.sin(theta)])


def _normal(theta: float) -> np.ndarray:
    return np.array([-np.sin(theta), np.cos(theta)])


def _axial_r2(v: np.ndarray, ax: np.ndarray, seg: _Seg, shrink: float = 0.0) -> np.ndarray:
    """Normalised squared axial radius of a body (ellipse AP, flattened LR), 3-D."""
    return ((v / (seg.a / 2 - shrink)) ** 2)[None] + ((ax / (seg.w / 2 - shrink)) ** 4)[:, None, None]


def _half_height(seg: _Seg, v: np.ndarray):
    """Half the body's nominal height at AP position ``v`` (its frame): ``h / 2``, less the wedge's loss,
    which grows linearly from nothing at the posterior wall to ``wedge`` at the anterior wall."""
    if not seg.wedge:
        return seg.h / 2
    return (seg.h / 2 * (1.0 - seg.wedge * np.clip(0.5 - v / seg.a, 0.0, 1.0)))[None]


def _body_shape(u, v, ax, seg: _Seg, shrink: float) -> np.ndarray:
    """Superellipse body (rounded rectangle sagittally) with concave endplates; <= 1 inside."""
    r2 = _axial_r2(v, ax, seg, shrink)
    conc = seg.conc * np.clip(1.0 - r2, 0.0, 1.0)
    tu = ((np.abs(u)[None] + conc) / (_half_height(seg, v) - shrink)) ** 2
    tu2, r4 = tu * tu, r2 * r2
    return tu2 * tu2 + r4 * r4


def _disc_mask(u, v, u1, v1, u2, v2, ax, seg: _Seg, up: _Seg, lo: _Seg, bulge: float) -> np.ndarray:
    """Lens-shaped disc between the (concave) endplates of ``up`` and ``lo`` (3-D mask); ``u, v`` in the disc's
    frame, ``u1, v1`` and ``u2, v2`` in the bodies'; ``bulge`` (mm) its posterior bulge."""
    # between the two (concave) endplates; the bodies are painted over any overlap afterwards
    fill1 = up.conc * np.clip(1.0 - _axial_r2(v1, ax, up), 0.0, 1.0) + 0.4
    fill2 = lo.conc * np.clip(1.0 - _axial_r2(v2, ax, lo), 0.0, 1.0) + 0.4
    between = (u1[None] > _half_height(up, v1) - fill1) & (u2[None] < -_half_height(lo, v2) + fill2)
    ha = np.where(v > 0, seg.a / 2 + bulge, seg.a / 2 + 0.3)
    hw = seg.w / 2 + 0.3 + 0.5 * bulge
    lens = np.clip(1.0 - 0.3 * (u / (seg.h / 2 + 0.5)) ** 2, 0.2, 1.0)
    rd2 = ((v / ha) ** 2)[None] + ((ax / hw) ** 4)[:, None, None]
    return between & (rd2 <= lens[None])


@dataclass(frozen=True)
class Construction:
    """What a phantom was drawn from: bodies T12..S3, discs T12/L1..S2/S3 (the last two fused into the
    sacrum), each disc's posterior bulge, and the dural sac's per-row profile (centre, AP and LR half sizes
    and LR centre, sampled at the rows ``y``)."""

    bodies: tuple[_Seg, ...]
    discs: tuple[_Seg, ...]
    bulges: tuple[float, ...]
    y: np.ndarray
    canal_z: np.ndarray
    canal_half_z: np.ndarray
    canal_half_w: np.ndarray
    canal_x: np.ndarray
    n_named: int = 7  # T12..S1: the lower sacral segments (and their fused discs) are all "S1"

    def ids(self, y: np.ndarray, z: np.ndarray, x: float) -> np.ndarray:
        """The analytic label at points ``(y, z)`` of the sagittal plane ``x``: ``CANAL_ID``, ``BODY_ID + i``,
        ``DISC_ID + i``, with the sacral segments and fused discs as body ``n_named - 1``; 0 elsewhere.
        Later structures win, as in the painting: canal < discs < bodies."""
        y, z = np.asarray(y, float), np.asarray(z, float)
        out = np.zeros(y.shape, np.int32)
        zc, hz = np.interp(y, self.y, self.canal_z), np.interp(y, self.y, self.canal_half_z)
        hw, xc = np.interp(y, self.y, self.canal_half_w), np.interp(y, self.y, self.canal_x)
        out[((z - zc) / hz) ** 2 + ((x - xc) / hw) ** 2 <= 1.0] = CANAL_ID
        sacrum = BODY_ID + self.n_named - 1

        def near(seg: _Seg, reach: float) -> bool:  # a point within the segment's bounding circle
            return bool(np.any((y - seg.y) ** 2 + (z - seg.z) ** 2 <= reach**2))

        for i, seg in enumerate(self.discs):
            if not near(seg, 0.5 * np.hypot(seg.h + 8.0, seg.a) + 6.0):
                continue
            up, lo = self.bodies[i], self.bodies[i + 1]
            u, v = _local(y, z, seg)
            u1, v1 = _local(y, z, up)
            u2, v2 = _local(y, z, lo)
            inside = _disc_mask(u, v, u1, v1, u2, v2, np.array([abs(x - seg.x)]), seg, up, lo, self.bulges[i])
            out[inside.reshape(out.shape)] = DISC_ID + i if i < self.n_named - 1 else sacrum
        for i, seg in enumerate(self.bodies):
            if not near(seg, 0.5 * np.hypot(seg.h, seg.a) + 2.0):
                continue
            u, v = _local(y, z, seg)
            ax = np.array([abs(x - seg.x)])
            out[(_body_shape(u, v, ax, seg, 0.0) <= 1.0).reshape(out.shape)] = BODY_ID + min(i, self.n_named - 1)
        return out

    def fractions(self, labels: np.ndarray, spacing, sub: int = 4) -> np.ndarray:
        """Partial-volume truth (3, slices, rows, cols) float32 of canal, bodies (with the sacrum) and discs: the
        share of each voxel's ``sub`` x ``sub`` in-plane sub-points inside each, evaluated where a voxel's
        in-plane neighbourhood holds more than one label (elsewhere its label); ``labels`` the painted map."""
        sx, sy, sz = (float(v) for v in spacing)
        out = np.zeros((3, *labels.shape), np.float32)
        for c in range(3):
            out[c] = labels == c + 1
        mixed = np.zeros(labels.shape, bool)
        for axis in (1, 2):
            for shift in (1, -1):
                mixed |= np.roll(labels, shift, axis=axis) != labels
        offs = (np.arange(sub) + 0.5) / sub - 0.5
        du, dv = (a.ravel() for a in np.meshgrid(offs, offs, indexing="ij"))
        for k in range(labels.shape[0]):
            r, c = np.nonzero(mixed[k])
            if r.size == 0:
                continue
            ids = self.ids(((r[:, None] + du) * sy).ravel(), ((c[:, None] + dv) * sz).ravel(),
                           (k - (labels.shape[0] - 1) / 2) * sx).reshape(r.size, -1)
            out[0, k, r, c] = (ids == CANAL_ID).mean(axis=1)
            out[1, k, r, c] = ((ids >= BODY_ID) & (ids < DISC_ID)).mean(axis=1)
            out[2, k, r, c] = ((ids >= DISC_ID) & (ids < CANAL_ID)).mean(axis=1)
        return out

    def canal_x_at(self, y: float) -> float:
        return float(np.interp(y, self.y, self.canal_x))


def _local(y: np.ndarray, z: np.ndarray, seg: _Seg) -> tuple[np.ndarray, np.ndarray]:
    """Points in a segment's frame: u along its column (inferior +), v across it (posterior +)."""
    dy, dz = y - seg.y, z - seg.z
    c, s = np.cos(seg.theta), np.sin(seg.theta)
    return dy * c + dz * s, dz * c - dy * s


def _runs(con: Construction, p0: np.ndarray, d: np.ndarray, x: float, target: int) -> list[tuple[float, float]]:
    """Where the line ``p0 + t d`` (|t| <= _LINE_MM) lies in ``target``: (t_start, t_end) runs, the ends
    bisected (all together) to ``_STEP_MM / 2**_BISECT`` mm."""

    def inside(t: np.ndarray) -> np.ndarray:
        return con.ids(p0[0] + t * d[0], p0[1] + t * d[1], x) == target

    t = np.arange(-_LINE_MM, _LINE_MM + _STEP_MM / 2, _STEP_MM)
    flags = inside(t)
    edges = np.flatnonzero(np.diff(flags.astype(np.int8)))
    lo, hi = t[edges], t[edges + 1]
    lo_in = flags[edges]
    for _ in range(_BISECT):
        mid = (lo + hi) / 2
        same = inside(mid) == lo_in
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    ends = list((lo + hi) / 2)
    if flags[0]:
        ends.insert(0, -np.inf)
    if flags[-1]:
        ends.append(np.inf)
    return list(zip(ends[0::2], ends[1::2]))


def _run_through(con, p0, d, x, target, t0: float = 0.0) -> tuple[float, float] | None:
    """The run of ``target`` that holds ``t0``, else the nearest one."""
    runs = _runs(con, p0, d, x, target)
    if not runs:
        return None
    return min(runs, key=lambda r: 0.0 if r[0] <= t0 <= r[1] else min(abs(r[0] - t0), abs(r[1] - t0)))


def _disc_axis(con: Construction, seg: _Seg, target: int) -> float:
    """A disc's own axis: the minor principal axis of its mid-sagittal shape (sampled every 0.05 mm), the
    angle of its endplates' bisector (sheared or wedged discs tilt away from their bodies' mean)."""
    r = 0.5 * np.hypot(seg.h + 8.0, seg.a) + 6.0
    yy, zz = np.meshgrid(np.arange(seg.y - r, seg.y + r, 0.05), np.arange(seg.z - r, seg.z + r, 0.05), indexing="ij")
    inside = con.ids(yy.ravel(), zz.ravel(), seg.x) == target
    pts = np.stack([yy.ravel()[inside], zz.ravel()[inside]], axis=1)
    axis = np.linalg.eigh(np.cov(pts.T))[1][:, 0]
    return float(np.arctan2(axis[1], axis[0]) if axis[0] >= 0 else np.arctan2(-axis[1], -axis[0]))


def _frame(con: Construction, seg: _Seg, target: int, disc: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre and axes of a structure as measured: a body's axis is its column's tangent, a disc's its own
    principal axis; the centre midway between its walls across the axis, then between its endplates."""
    theta = _disc_axis(con, seg, target) if disc else seg.theta
    c, t, n = np.array([seg.y, seg.z]), _tangent(theta), _normal(theta)
    for _ in range(2):
        va, vp = _run_through(con, c, n, seg.x, target)
        c = c + n * (va + vp) / 2
        lo, hi = _run_through(con, c, t, seg.x, target)
        c = c + t * (lo + hi) / 2
    return c, t, n


def _profile(con: Construction, seg: _Seg, target: int, frame) -> dict[str, float]:
    """Depth through the centre and the heights at 10 / 50 / 90 % of it, in the structure's frame."""
    c, t, n = frame
    va, vp = _run_through(con, c, n, seg.x, target)
    out = {"depth_mm": vp - va}
    for key, f in (("height_anterior_mm", 0.1), ("height_middle_mm", 0.5), ("height_posterior_mm", 0.9)):
        lo, hi = _run_through(con, c + n * (va + f * (vp - va)), t, seg.x, target)
        out[key] = hi - lo
    return out


def _canal_ap(con: Construction, frame) -> float:
    """AP diameter of the sac on the line through a structure's centre, across its axis."""
    c, _, n = frame
    runs = [r for r in _runs(con, c, n, con.canal_x_at(c[0]), CANAL_ID) if r[0] > 0]
    return min(runs)[1] - min(runs)[0]


def _endplate_midpoint(con: Construction, disc: _Seg, frame, body: int, below: bool) -> tuple[np.ndarray, float]:
    """The midpoint of a body's endplate facing ``disc`` and that endplate's AP depth (``SLIP_DEPTH_MM``
    inside the body), in the disc's frame: the body's surface on the disc's axis, the depth line there, and
    its midpoint carried back to the surface along the axis."""
    c, t, n = frame
    sign = 1.0 if below else -1.0
    runs = [r for r in _runs(con, c, t * sign, disc.x, BODY_ID + body) if r[1] > 0]
    surface = max(min(runs)[0], 0.0)
    p = c + t * sign * (surface + SLIP_DEPTH_MM)
    va, vp = _run_through(con, p, n, disc.x, BODY_ID + body)
    mid = p + n * (va + vp) / 2
    lo, _ = _run_through(con, mid, t * sign, disc.x, BODY_ID + body)
    return mid + t * sign * lo, vp - va


def construction_geometry(con: Construction, body_names, disc_names) -> dict[str, dict[str, float]]:
    """Per named level, the constructed values (mm; ratios; slip in % of the lower body's endplate depth):
    bodies T12..L5 their heights, depth, ``wedge_ratio``, ``biconcavity_ratio``, ``ap_diameter_mm`` of the
    canal at mid-height and ``slip_percent`` over the body below; discs their heights, depth and the canal's
    ``ap_diameter_mm``; S1 its ``slip`` reference only (the sacrum is not measured)."""
    out: dict[str, dict[str, float]] = {}
    last = con.n_named - 1
    disc_frames = [_frame(con, seg, DISC_ID + i, True) for i, seg in enumerate(con.discs[:last])]
    for i, name in enumerate(body_names[:last]):
        seg = con.bodies[i]
        frame = _frame(con, seg, BODY_ID + i, False)
        vals = _profile(con, seg, BODY_ID + i, frame)
        vals["wedge_ratio"] = vals["height_anterior_mm"] / vals["height_posterior_mm"]
        vals["biconcavity_ratio"] = vals["height_middle_mm"] / vals["height_posterior_mm"]
        vals["ap_diameter_mm"] = _canal_ap(con, frame)
        disc, dframe = con.discs[i], disc_frames[i]
        upper, _ = _endplate_midpoint(con, disc, dframe, i, below=False)
        lower, depth = _endplate_midpoint(con, disc, dframe, i + 1, below=True)
        vals["slip_percent"] = float(-(upper - lower) @ dframe[2]) / depth * 100.0
        out[name] = vals
    out[body_names[last]] = {}
    for i, name in enumerate(disc_names[:last]):
        vals = _profile(con, con.discs[i], DISC_ID + i, disc_frames[i])
        vals["ap_diameter_mm"] = _canal_ap(con, disc_frames[i])
        out[name] = vals
    return {k: {m: float(v) for m, v in vals.items()} for k, vals in out.items()}
