"""A synthetic sagittal lumbar spine MRI (T12 to the sacrum) with exact ground-truth labels.

Everything is drawn analytically in the canonical sagittal frame (axis 0 left->right slices, axis 1 rows
superior->inferior, axis 2 columns anterior->posterior) at the target resolution, in millimetres, with
numpy and scipy only.  Labels: 0 background, 1 spinal canal (dural sac), 2 vertebrae, 3 intervertebral
discs.  Label 2 holds the vertebral bodies (sacral segments included), as in the real lumbar masks the
shipped model learns from; the posterior elements (pedicles, laminae, processes) are drawn in the image and
given separately as ``Phantom.posterior_elements``, or added to label 2 (SPIDER-like whole vertebrae) with
``label_posterior_elements=True``.  The image imitates a T2-weighted or T1-weighted
fast-spin-echo scan: cortical rims, textured marrow, lens-shaped discs with a nucleus, CSF with the cord and
cauda equina, a lordotic curve, psoas, vessels, paraspinal muscles, subcutaneous fat, skin and air, then
partial-volume blur, a smooth bias field and Rician noise.  Same seed, same arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from scipy import ndimage

from .io.volume import Volume
from .phantom_geometry import (
    Construction,
    _body_shape,
    _disc_mask,
    _normal,
    _Seg,
    _tangent,
    construction_geometry,
)

Contrast = Literal["T2w", "T1w"]

#: Vertebral levels drawn (and named in :attr:`Phantom.levels`), top to bottom.
BODY_NAMES = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
#: Intervertebral discs, top to bottom; ``degenerated`` indices refer to this order.
DISC_NAMES = tuple(f"{a}/{b}" for a, b in zip(BODY_NAMES[:-1], BODY_NAMES[1:]))

CANAL, VERTEBRA, DISC = 1, 2, 3
_POSTERIOR = 4  # internal label of the posterior elements while painting

# Mean tissue intensities (brightest tissue ~1).  Jittered by a few % per phantom.
_TISSUES: dict[str, dict[str, float]] = {
    "T2w": dict(csf=1.0, cord=0.36, cauda=0.55, nucleus=0.8, annulus=0.33, degen=0.24, marrow=0.45,
                cortex=0.05, fat=0.7, muscle=0.25, abdomen=0.34, skin=0.42, vessel=0.07, ligament=0.08,
                basivertebral=0.75, root=0.3),
    "T1w": dict(csf=0.15, cord=0.42, cauda=0.28, nucleus=0.3, annulus=0.27, degen=0.24, marrow=0.7,
                cortex=0.05, fat=0.9, muscle=0.35, abdomen=0.4, skin=0.5, vessel=0.1, ligament=0.08,
                basivertebral=0.55, root=0.38),
}

# Reference sizes (mm): body height (SI), depth (AP), width (LR) for T12..S1 then S2, S3.
_BODY_H = np.array([23.0, 24.5, 25.5, 26.0, 26.0, 25.0, 24.0, 19.0, 15.0])
_BODY_A = np.array([30.0, 32.0, 34.0, 36.0, 37.0, 38.0, 36.0, 28.0, 22.0])
_BODY_W = np.array([40.0, 42.0, 44.0, 46.0, 48.0, 50.0, 48.0, 40.0, 32.0])
# Disc heights (mm): T12/L1 .. L5/S1, then the fused sacral remnants S1/S2, S2/S3.
_DISC_H = np.array([6.5, 8.0, 9.0, 10.0, 11.0, 10.0, 2.5, 2.0])
_N_LUMBAR = 7  # T12..S1 are named; S2, S3 only complete the sacrum


@dataclass(frozen=True)
class Level:
    """One named body or disc: its centre in canonical voxel coordinates (row = SI, column = AP)."""

    name: str
    kind: Literal["body", "disc"]
    row: float
    column: float
    degenerated: bool = False


@dataclass(frozen=True)
class Phantom:
    """A synthetic scan: ``image`` (float32), ``labels`` (uint8) on the same grid, and its levels."""

    image: Volume
    labels: Volume
    levels: tuple[Level, ...]
    contrast: str
    seed: int
    posterior_elements: Volume | None = None  # uint8 mask of pedicles, laminae and processes
    construction: Construction | None = field(default=None, repr=False, compare=False)

    @cached_property
    def geometry(self) -> dict[str, dict[str, float]]:
        """The measures the phantom was built with, per level (:data:`BODY_NAMES`, :data:`DISC_NAMES`), from
        its analytic shapes (:func:`.phantom_geometry.construction_geometry`): bodies T12..L5
        ``height_anterior_mm``, ``height_middle_mm``, ``height_posterior_mm`` (at 10 / 50 / 90 % of the
        depth, along the column), ``depth_mm`` (across it, through the centre), ``wedge_ratio``,
        ``biconcavity_ratio``, the canal's ``ap_diameter_mm`` at mid-height and ``slip_percent`` over the body
        below; discs the heights, depth and the canal's AP diameter; S1 nothing (the sacrum is not measured)."""
        if self.construction is None:
            raise ValueError("This phantom carries no construction to measure.")
        return construction_geometry(self.construction, BODY_NAMES, DISC_NAMES)

    def truth(self, vertebrae: str = "whole") -> Volume:
        """The ground truth in the written label scheme (:mod:`labelscheme`): ``"whole"`` = 2 the whole
        vertebra (body and posterior elements, as SPIDER), ``"split"`` = 2 body and 4 posterior elements."""
        if vertebrae not in ("whole", "split"):
            raise ValueError(f"vertebrae must be 'whole' or 'split', got {vertebrae!r}.")
        out = self.labels.data.copy()
        if self.posterior_elements is not None:
            post = (self.posterior_elements.data > 0) & ((out == 0) | (out == 2))
            out[post] = 2 if vertebrae == "whole" else 4
        return self.labels.with_data(out)

    def level(self, name: str) -> Level:
        """The level called ``name`` (e.g. ``"L3"`` or ``"L4/L5"``)."""
        for lev in self.levels:
            if lev.name == name:
                return lev
        raise KeyError(name)


@dataclass(frozen=True)
class _Grid:
    x: np.ndarray  # (nx,) mm, 0 at the slab centre
    y: np.ndarray  # (ny,) mm from the top row
    z: np.ndarray  # (nz,) mm from the anterior column
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    def window(self, yc: float, zc: float, ry: float, rz: float) -> tuple[slice, slice]:
        """Row and column slices covering ``yc +- ry``, ``zc +- rz`` (mm), clipped to the grid."""
        sy, sz = self.spacing[1], self.spacing[2]
        r0, r1 = max(0, int(np.floor((yc - ry) / sy))), min(self.y.size, int(np.ceil((yc + ry) / sy)) + 1)
        c0, c1 = max(0, int(np.floor((zc - rz) / sz))), min(self.z.size, int(np.ceil((zc + rz) / sz)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def local(self, rs: slice, cs: slice, seg: _Seg) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u along the column, inferior +; v across it, posterior +) of a window, 2-D."""
        th = seg.theta
        dy = self.y[rs][:, None] - seg.y
        dz = self.z[cs][None, :] - seg.z
        c, s = np.float32(np.cos(th)), np.float32(np.sin(th))
        return (dy * c + dz * s).astype(np.float32), (dz * c - dy * s).astype(np.float32)


# --------------------------------------------------------------------------------------------- layout
def _choose_degenerated(degenerated: int | Sequence[int | str], rng: np.random.Generator) -> frozenset[int]:
    if isinstance(degenerated, (int, np.integer)):
        n = int(degenerated)
        if not 0 <= n <= len(DISC_NAMES):
            raise ValueError(f"degenerated must be between 0 and {len(DISC_NAMES)}; got {n}.")
        weights = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.25])
        return frozenset(int(i) for i in rng.choice(len(DISC_NAMES), size=n, replace=False, p=weights))
    out = set()
    for d in degenerated:
        if isinstance(d, str) and d not in DISC_NAMES:
            raise ValueError(f"Unknown disc {d!r}; expected one of {DISC_NAMES}.")
        idx = DISC_NAMES.index(d) if isinstance(d, str) else int(d)
        if not 0 <= idx < len(DISC_NAMES):
            raise ValueError(f"Disc index {d} out of range 0..{len(DISC_NAMES) - 1}.")
        out.add(idx)
    return frozenset(out)


def _layout(rng: np.random.Generator, degen: frozenset[int], fov: tuple[float, float, float],
            tilt: float = 0.0, wedges: dict[int, float] | None = None, slips: dict[int, float] | None = None):
    """Bodies (T12..S3) and discs along a lordotic curve, in mm of the canonical frame.

    ``tilt`` (radians) turns the whole column in the sagittal plane; ``wedges`` maps a body's index to its
    loss of anterior height; ``slips`` a body's index to its forward shift over the body below, as a fraction
    of that body's depth (the disc between is sheared by half of it).  None of them draws a random number,
    so the other measures of a phantom stay those of the same seed without them."""
    scale = rng.uniform(0.92, 1.08)
    h = _BODY_H * scale * rng.uniform(0.96, 1.04, _BODY_H.size)
    a = _BODY_A * rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, _BODY_A.size)
    w = _BODY_W * rng.uniform(0.92, 1.08)
    d = _DISC_H * scale * rng.uniform(0.88, 1.12, _DISC_H.size)
    for i in degen:
        d[i] *= rng.uniform(0.35, 0.5)

    theta_top = np.deg2rad(rng.uniform(-22.0, -12.0))
    lordosis = np.deg2rad(rng.uniform(28.0, 42.0))  # tangent change T12 -> L5
    # segmental lordosis T12 -> L5 shared out by disc height (a collapsed disc loses its wedge), then
    # the lumbosacral angle and the sacral kyphosis
    wedge = d[:5] + 0.3 * h[:5]
    inc = np.concatenate([lordosis * wedge / wedge.sum(),
                          np.deg2rad([rng.uniform(10.0, 18.0), rng.uniform(8.0, 14.0), rng.uniform(8.0, 14.0)])])
    # keep at least 40% of a disc's height at its back (the hinge is the disc centre)
    a_disc = (a[:-1] + a[1:]) / 2
    inc[:6] = np.minimum(inc[:6], 2 * np.arcsin(np.clip(0.6 * d[:6] / a_disc[:6], 0, 1)))
    theta = theta_top + np.concatenate([[0.0], np.cumsum(inc)])
    if tilt:
        theta = theta + tilt
    x0, x_slope = rng.uniform(-1.5, 1.5), rng.uniform(-0.01, 0.01)

    centres = [np.zeros(2)]
    disc_centres = []
    for i in range(h.size - 1):
        p = centres[-1] + _tangent(theta[i]) * (h[i] / 2 + d[i] / 2)
        disc_centres.append(p)
        centres.append(p + _tangent(theta[i + 1]) * (d[i] / 2 + h[i + 1] / 2))
    centres, disc_centres = np.array(centres), np.array(disc_centres)
    for i, frac in sorted((slips or {}).items()):  # the slipped body and everything above it move forward
        forward = -_normal(theta[i + 1]) * frac * a[i + 1]
        centres[:i + 1] += forward
        disc_centres[:i] += forward
        disc_centres[i] += forward / 2

    # Place T12..S1 in the field of view: centred SI, the lumbar bodies at ~40% of the AP field.
    shift_y = fov[1] / 2 + rng.uniform(-5, 5) - (centres[0, 0] + centres[6, 0]) / 2
    shift_z = fov[2] * 0.4 + rng.uniform(-5, 5) - centres[:6, 1].mean()
    shift = np.array([shift_y, shift_z])
    centres += shift
    disc_centres += shift

    conc = rng.uniform(0.8, 2.0, h.size)
    bodies = [_Seg(c[0], c[1], t, hh, aa, ww, x0 + x_slope * (c[0] - fov[1] / 2), cc, (wedges or {}).get(i, 0.0))
              for i, (c, t, hh, aa, ww, cc) in enumerate(zip(centres, theta, h, a, w, conc))]
    discs = []
    for i, c in enumerate(disc_centres):
        up, lo = bodies[i], bodies[i + 1]
        discs.append(_Seg(c[0], c[1], (up.theta + lo.theta) / 2, d[i], (up.a + lo.a) / 2,
                          (up.w + lo.w) / 2, (up.x + lo.x) / 2))
    return bodies, discs


# --------------------------------------------------------------------------------------------- fields
def _linear_upsampler(n_out: int, factor: int) -> np.ndarray:
    """Matrix (n_out x n_coarse) of linear interpolation from cell-centred samples ``factor`` times coarser."""
    n_c = -(-n_out // factor)
    pos = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_c - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_c - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_c), np.float32)
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], factor: int, sigma: float) -> np.ndarray:
    """Unit-variance smooth noise: white noise on a grid ``factor`` times coarser in-plane, blurred, upsampled."""
    coarse = (shape[0], -(-shape[1] // factor), -(-shape[2] // factor))
    n = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), (0.5, sigma, sigma))
    n /= n.std() + 1e-6
    if factor > 1:
        n = _linear_upsampler(shape[1], factor) @ n @ _linear_upsampler(shape[2], factor).T
    return np.ascontiguousarray(n, dtype=np.float32)


def _random_profile(rng: np.random.Generator, t: np.ndarray, n_terms: int = 3, max_cycles: float = 1.5) -> np.ndarray:
    """A smooth random function of ``t`` in [0, 1] with values roughly in [-1, 1]."""
    out = np.zeros_like(t)
    for _ in range(n_terms):
        out += rng.uniform(-1, 1) * np.cos(2 * np.pi * rng.uniform(0.2, max_cycles) * t + rng.uniform(0, 2 * np.pi))
    return out / n_terms


def _interp_rows(y: np.ndarray, pts_y: np.ndarray, vals: np.ndarray, slope_lo: float, slope_hi: float) -> np.ndarray:
    """Linear interpolation along SI with linear extrapolation (given end slopes) beyond the ends."""
    out = np.interp(y, pts_y, vals)
    out = np.where(y < pts_y[0], vals[0] + (y - pts_y[0]) * slope_lo, out)
    return np.where(y > pts_y[-1], vals[-1] + (y - pts_y[-1]) * slope_hi, out)


@dataclass(frozen=True)
class _Profiles:
    """Per-row (SI) curves of the column: canal centre/size, anterior body line, skin and fat."""

    z_canal: np.ndarray
    depth: np.ndarray  # canal AP extent along the column normal
    width: np.ndarray  # canal LR width
    theta: np.ndarray
    x: np.ndarray
    z_front: np.ndarray
    z_skin: np.ndarray
    fat: np.ndarray
    gap: float  # body posterior wall -> canal front (mm)

    @property
    def half_z(self) -> np.ndarray:
        """Canal half-extent along the AP (column) axis of the image."""
        return self.depth / 2 / np.cos(self.theta)


def _profiles(rng: np.random.Generator, grid: _Grid, bodies: list[_Seg], discs: list[_Seg]) -> _Profiles:
    gap = rng.uniform(1.5, 2.5)  # posterior longitudinal ligament + epidural space
    depth0, width0 = rng.uniform(14.0, 18.0), rng.uniform(18.0, 22.0)
    segs = sorted(bodies + discs, key=lambda s: s.y)
    taper = np.array([1.0 if s.y <= bodies[6].y else max(0.45, 1 - (s.y - bodies[6].y) / 60) for s in segs])
    depth = depth0 * taper * rng.uniform(0.95, 1.05, len(segs))
    pts = np.array([[s.y, s.z] for s in segs])
    cen = np.array([p + _normal(s.theta) * (s.a / 2 + gap + dd / 2) for p, s, dd in zip(pts, segs, depth)])
    front = np.array([p - _normal(s.theta) * s.a / 2 for p, s in zip(pts, segs)])
    th = np.array([s.theta for s in segs])
    y = grid.y
    z_canal = _interp_rows(y, cen[:, 0], cen[:, 1], np.tan(th[0]), np.tan(th[-1]))
    z_front = _interp_rows(y, front[:, 0], front[:, 1], np.tan(th[0]), np.tan(th[-1]))
    theta = np.clip(np.interp(y, pts[:, 0], th), -1.2, 1.2)
    depth_r = np.interp(y, cen[:, 0], depth)
    width_r = width0 * np.interp(y, cen[:, 0], taper)
    x_r = np.interp(y, pts[:, 0], [s.x for s in segs])
    t = (y - y[0]) / max(float(y[-1] - y[0]), 1.0)
    back = z_canal + depth_r / 2 / np.cos(theta)
    z_skin = back + rng.uniform(38.0, 55.0) + 6.0 * _random_profile(rng, t)
    # the buttocks: skin further back below the sacrum
    z_skin += np.clip((y - bodies[6].y) / 40.0, 0, 1) * rng.uniform(5.0, 20.0)
    fat = rng.uniform(8.0, 22.0) + 4.0 * _random_profile(rng, t)
    return _Profiles(z_canal.astype(np.float32), depth_r, width_r, theta, x_r, z_front.astype(np.float32),
                     z_skin.astype(np.float32), fat.astype(np.float32), float(gap))


# --------------------------------------------------------------------------------------------- painting
class _Canvas:
    """The image and labels being painted, with the texture fields."""

    def __init__(self, grid: _Grid, tissue: dict[str, float], rng: np.random.Generator):
        self.grid, self.t = grid, tissue
        self.img = np.zeros(grid.shape, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)
        self.tex = _smooth_noise(rng, grid.shape, 2, 1.2)  # fine texture (marrow, muscle)
        self.blob = _smooth_noise(rng, grid.shape, 8, 1.0)  # coarse blobs (abdomen)

    def paint(self, rs: slice, cs: slice, mask: np.ndarray, value, label: int | None = None) -> None:
        """Set ``value`` (scalar or array over the window) where ``mask``; optionally the label too."""
        sub = self.img[:, rs, cs]
        if np.ndim(value) == 0:
            sub[mask] = value
        else:
            sub[mask] = np.broadcast_to(value, mask.shape)[mask]
        if label is not None:
            self.lab[:, rs, cs][mask] = label


def _paint_soft_tissue(cv: _Canvas, prof: _Profiles, bodies: list[_Seg]) -> None:
    """Air, skin, subcutaneous fat, paraspinal muscle, epidural fat, psoas, abdomen and great vessels."""
    g, t = cv.grid, cv.t
    Z = g.z[None, :]
    z_back = (prof.z_canal + prof.half_z)[:, None]
    skin = prof.z_skin[:, None]
    fat_in = skin - 2.0 - prof.fat[:, None]
    front = prof.z_front[:, None]
    # 2-D base (rows x columns), then 3-D modulation
    base = np.full((g.y.size, g.z.size), t["abdomen"], np.float32)
    z_canal_front = (prof.z_canal - prof.half_z)[:, None]
    base[(Z >= front - 4.0) & (Z < z_canal_front)] = t["muscle"]  # psoas origin beside the bodies
    base[(Z >= z_canal_front) & (Z < z_back)] = 0.75 * t["fat"] + 0.25 * t["muscle"]  # foraminal fat
    base[(Z >= z_back) & (Z < fat_in)] = t["muscle"]
    base[(Z >= fat_in - 1.2) & (Z < fat_in)] = t["ligament"]  # thoracolumbar fascia
    base[(Z >= fat_in) & (Z < skin - 2.0)] = t["fat"]
    base[(Z >= skin - 2.0) & (Z < skin)] = t["skin"]
    base[Z >= skin] = 0.0
    img = np.broadcast_to(base, g.shape).copy()
    muscle = np.broadcast_to((Z >= z_back) & (Z < fat_in - 1.2), g.shape)
    img[muscle] *= 1.0 + 0.15 * cv.tex[muscle]
    abdomen = np.broadcast_to(Z < front - 4.0, g.shape)
    bowel = np.tanh(1.5 * cv.blob[abdomen]) + 0.2 * cv.tex[abdomen]  # loops with firmer edges
    img[abdomen] = np.clip(t["abdomen"] * (1.0 + 0.5 * bowel), 0.03, 1.0)
    cv.img[:] = img

    # psoas: antero-lateral to the bodies from L1 down, widening inferiorly
    yy = g.y[:, None]
    # psoas: an axial ellipse beside the bodies, growing from T12 down to L5
    grow = np.clip((yy - bodies[0].y) / (bodies[5].y - bodies[0].y), 0.0, 1.0)
    r_ps = (4.0 + 18.0 * grow)[None]  # AP semi-axis, mm
    ax = np.abs(g.x - prof.x.mean())[:, None, None]
    ps = ((ax - 30.0) / (0.8 * r_ps + 2.0)) ** 2 + ((Z[None] - (front[None] + 4.0)) / r_ps) ** 2 <= 1.0
    cv.img[ps] = t["muscle"] * (1.0 + 0.1 * cv.tex[ps])

    # aorta (patient left, negative x) to the bifurcation at L4, inferior vena cava (right)
    for xc, r, side_y in ((-12.0, 9.0, bodies[4].y), (17.0, 10.0, bodies[5].y)):
        xv = (g.x - prof.x.mean() - xc)[:, None, None] / r
        zv = (Z - (front - r - 3.0))[None] / (r * 0.85)
        vessel = (xv**2 + zv**2 <= 1.0) & (yy[None] < side_y)
        cv.img[vessel] = t["vessel"]


def _paint_canal(cv: _Canvas, prof: _Profiles, bodies: list[_Seg]) -> None:
    """Epidural fat, the dural sac (label 1) with CSF, the cord down to the conus, then the cauda equina."""
    g, t = cv.grid, cv.t
    zc, hz = prof.z_canal[:, None], prof.half_z[:, None]
    dz = (g.z[None, :] - zc) / hz  # rows x cols
    xr = (g.x[:, None] - prof.x[None, :])  # slices x rows
    half_w = (prof.width / 2)[None, :]
    r2 = dz[None] ** 2 + ((xr / half_w) ** 2)[:, :, None]
    ring = (dz[None] * hz[None] / (hz[None] + 3.0)) ** 2 + ((xr / (half_w + 3.0)) ** 2)[:, :, None]
    epi = (ring <= 1.0) & (r2 > 1.0)
    post = np.broadcast_to(dz[None] > 0, g.shape)
    cv.img[epi & post] = t["fat"]
    cv.img[epi & ~post] = t["ligament"]
    sac = r2 <= 1.0
    cv.img[sac] = t["csf"]
    cv.lab[sac] = CANAL

    conus = bodies[1].y + bodies[1].h * 0.5
    yy = g.y[None, :, None]
    cord_r = np.clip((conus - yy) / 15.0, 0.0, 1.0) ** 0.5  # tapers to the conus
    rc2 = ((dz[None] + 0.05) / 0.42) ** 2 + ((xr / (0.42 * half_w)) ** 2)[:, :, None]
    cord = sac & (rc2 <= cord_r**2)
    cv.img[cord] = t["cord"]
    # cauda equina: roots lying posteriorly in the sac (supine patient), as a fibrous grey bundle
    rq2 = ((dz[None] - 0.45) / 0.35) ** 2 + ((xr / (0.45 * half_w)) ** 2)[:, :, None]
    cauda = sac & (yy > conus - 10.0) & (rq2 <= 1.0)
    fib = np.clip(0.3 + 0.3 * cv.tex[cauda], 0.0, 1.0)
    cv.img[cauda] = t["csf"] + (t["cauda"] - t["csf"]) * fib


def _ellipsoid(u: np.ndarray, v: np.ndarray, ax: np.ndarray, cu, cv_, cx, ru, rv, rx) -> np.ndarray:
    """Normalised squared radius of an ellipsoid in the local frame (u, v 2-D; ax 1-D LR offsets)."""
    return (((u - cu) / ru) ** 2 + ((v - cv_) / rv) ** 2)[None] + (((ax - cx) / rx) ** 2)[:, None, None]


def _paint_posterior(cv: _Canvas, seg: _Seg, prof_depth: float, prof_width: float, gap: float,
                     sacral: int, rng: np.random.Generator) -> None:
    """Pedicles, laminae, articular and spinous processes of one vertebra (label 2).

    ``sacral``: 0 lumbar/thoracic, 1 for S1 (stout elements, short crest), 2 for lower sacral segments.
    """
    g, t = cv.grid, cv.t
    hu, ha = seg.h / 2, seg.a / 2
    v_front = ha + gap  # canal front, in the vertebra's frame
    v_back = v_front + prof_depth
    sp_len = (rng.uniform(26.0, 34.0), 16.0, 10.0)[sacral]
    # window around the arch: from the back of the body to the spinous tip
    v_lo, v_hi = ha - 5.0, v_back + sp_len + 2.0
    centre = np.array([seg.y, seg.z]) + _normal(seg.theta) * (v_lo + v_hi) / 2
    r = float(np.hypot((v_hi - v_lo) / 2, hu + 12.0))
    rs, cs = g.window(centre[0], centre[1], r, r)
    u, v = g.local(rs, cs, seg)
    ax = np.abs(g.x - seg.x).astype(np.float32)
    pw = (4.5, 7.0, 6.0)[sacral]
    xp = prof_width / 2 + 1.5 + pw
    up = -hu + 0.38 * seg.h
    f = np.full((g.x.size,) + u.shape, np.inf, np.float32)
    if sacral < 2:
        # pedicles, running from the body to the back of the canal
        ped = _ellipsoid(u, np.zeros_like(v), ax, up, 0, xp, 0.3 * seg.h, 1, pw)
        ped[:, (v < ha - 4.0) | (v > v_back + 2.0)] = np.inf
        f = np.minimum(f, ped)
        # articular pillars (superior + inferior processes), split at the facet joints
        span_lo, span_hi = -hu - 3.5, hu + 4.0
        pil = _ellipsoid(u, v, ax, (span_lo + span_hi) / 2, v_back + 1.0, xp + 2.0,
                         (span_hi - span_lo) / 2, 6.5, 5.5)
        f = np.minimum(f, pil)
    # laminae: a plate behind the canal, sloping down posteriorly
    us = u - 0.3 * (v - v_back)
    lam = _ellipsoid(us, v, ax, up + 5.0, v_back + 3.5, 0, 0.45 * seg.h, 3.5, xp + pw)
    f = np.minimum(f, lam)
    # spinous process (median sacral crest for the sacrum): midline only
    sp_h = (rng.uniform(8.0, 10.0), 7.0, 5.0)[sacral]
    spin = (((us - (up + 6.0)) / sp_h) ** 4 + ((v - (v_back + sp_len / 2)) / (sp_len / 2)) ** 4)[None] \
        + ((ax / 3.5) ** 2)[:, None, None]
    f = np.minimum(f, spin)
    bone = f <= 1.0
    core = f <= 0.45
    value = np.where(core, t["marrow"] * 0.9 * (1.0 + 0.1 * cv.tex[:, rs, cs]), t["cortex"])
    cv.paint(rs, cs, bone, value, _POSTERIOR)


def _paint_body(cv: _Canvas, seg: _Seg, rng: np.random.Generator) -> None:
    """Cortical rim, endplates, textured marrow and the basivertebral vein of one body (label 2)."""
    g, t = cv.grid, cv.t
    r = 0.5 * np.hypot(seg.h, seg.a) + 2.0
    rs, cs = g.window(seg.y, seg.z, r, r)
    u, v = g.local(rs, cs, seg)
    ax = np.abs(g.x - seg.x).astype(np.float32)
    outer = _body_shape(u, v, ax, seg, 0.0) <= 1.0
    inner = _body_shape(u, v, ax, seg, rng.uniform(0.8, 1.2)) <= 1.0
    marrow = t["marrow"] * (1.0 + 0.08 * cv.tex[:, rs, cs])
    value = np.where(inner, marrow, t["cortex"])
    # basivertebral vein: a short horizontal line entering the back of the body at mid-height
    bv = _ellipsoid(u, v, ax, 0.0, seg.a / 2 - 3.0, 0.0, 1.0, 4.5, 3.0) <= 1.0
    value = np.where(bv & inner, t["basivertebral"], value)
    cv.paint(rs, cs, outer, value, VERTEBRA)


def _paint_disc(cv: _Canvas, seg: _Seg, up: _Seg, lo: _Seg, degenerated: bool, fused: bool,
                rng: np.random.Generator) -> float:
    """Lens-shaped disc between two bodies (label 3): annulus and nucleus, or a fused sacral remnant.
    Returns its posterior bulge (mm), drawn here."""
    g, t = cv.grid, cv.t
    r = 0.5 * np.hypot(seg.h + 8.0, seg.a) + 6.0
    rs, cs = g.window(seg.y, seg.z, r, r)
    u, v = g.local(rs, cs, seg)
    u1, v1 = g.local(rs, cs, up)
    u2, v2 = g.local(rs, cs, lo)
    ax = np.abs(g.x - seg.x).astype(np.float32)
    bulge = rng.uniform(2.5, 4.5) if degenerated else rng.uniform(0.0, 0.8)
    disc = _disc_mask(u, v, u1, v1, u2, v2, ax, seg, up, lo, bulge)
    if fused:
        cv.paint(rs, cs, disc, t["cortex"] * 2.0, VERTEBRA)
        return bulge
    rn2 = _ellipsoid(u, v, ax, 0.0, 0.06 * seg.a, 0.0, max(0.45 * seg.h, 1.2), 0.42 * seg.a, 0.4 * seg.w)
    weight = np.clip((1.0 - rn2) / 0.8, 0.0, 1.0) ** 0.7
    nucleus = t["degen"] if degenerated else t["nucleus"]
    annulus = t["degen"] * 0.9 if degenerated else t["annulus"]
    value = annulus + (nucleus - annulus) * weight * (1.0 + 0.06 * cv.tex[:, rs, cs])
    if not degenerated and rng.random() < 0.5:  # intranuclear cleft of the adult disc
        value = np.where((np.abs(u) < 0.6)[None] & (weight > 0.2), value * 0.7, value)
    cv.paint(rs, cs, disc, value, DISC)
    return bulge


def _paint_roots(cv: _Canvas, bodies: list[_Seg], prof: _Profiles, gap: float) -> None:
    """Exiting nerve roots in the foramina (below each pedicle), dark dots in para-median slices."""
    g, t = cv.grid, cv.t
    for seg in bodies[:6]:
        rs, cs = g.window(seg.y, seg.z, seg.h, seg.a + 30.0)
        u, v = g.local(rs, cs, seg)
        row = int(np.clip(np.searchsorted(g.y, seg.y), 0, g.y.size - 1))
        xr = prof.width[row] / 2 + 6.0
        vr = seg.a / 2 + gap + prof.depth[row] * 0.45
        root = _ellipsoid(u, v, np.abs(g.x - seg.x), seg.h / 2 - 2.0, vr, xr, 3.0, 3.0, 3.0) <= 1.0
        root &= cv.lab[:, rs, cs] == 0
        cv.paint(rs, cs, root, t["root"])


# --------------------------------------------------------------------------------------------- public
def make_phantom(
    seed: int = 0,
    *,
    contrast: Contrast = "T2w",
    degenerated: int | Sequence[int | str] = 0,
    spacing: tuple[float, float, float] = (3.5, 0.6, 0.6),
    fov_mm: tuple[float, float, float] = (45.5, 220.0, 180.0),
    noise: float = 0.03,
    bias: float = 0.2,
    random_orientation: bool = False,
    label_posterior_elements: bool = False,
    tilt_deg: float = 0.0,
    wedge: Mapping[str, float] | None = None,
    slip: Mapping[str, float] | None = None,
) -> Phantom:
    """Generate a synthetic sagittal lumbar MRI (T12 to the sacrum) with its labels.

    ``spacing`` and ``fov_mm`` are along the canonical axes (LR, SI, AP) in mm.  ``degenerated`` is a
    number of degenerated discs (chosen at random, mostly low lumbar) or disc indices/names from
    :data:`DISC_NAMES`.  ``noise`` is the Rician noise level relative to the brightest tissue, ``bias`` the
    amplitude of the smooth multiplicative bias field.  With ``random_orientation`` the file array is a
    random axis permutation/flip of the canonical one with a matching affine (``canonical()`` is unchanged).

    Known deformities, all off by default (the same seed then gives the same arrays as without them):
    ``tilt_deg`` turns the whole column in the sagittal plane (positive: its lower end moves posteriorly);
    ``wedge`` maps bodies T12..L5 to a wedge fracture's loss of anterior height (a fraction 0..0.6 at the
    anterior wall, none at the posterior wall); ``slip`` maps bodies T12..L5 to a forward slip over the body
    below (a fraction -0.3..1 of that body's depth; negative: retrolisthesis).  :attr:`Phantom.geometry`
    gives the measures they produce.
    """
    if contrast not in _TISSUES:
        raise ValueError(f"contrast must be 'T2w' or 'T1w'; got {contrast!r}.")
    if not -30.0 <= float(tilt_deg) <= 30.0:
        raise ValueError(f"tilt_deg must be between -30 and 30 degrees; got {tilt_deg}.")
    wedges = _deformity(wedge, "wedge", 0.0, 0.6)
    slips = _deformity(slip, "slip", -0.3, 1.0)
    spacing = tuple(float(s) for s in spacing)
    fov = tuple(float(f) for f in fov_mm)
    if min(spacing) <= 0 or min(fov) <= 0:
        raise ValueError("spacing and fov_mm must be positive.")
    rng = np.random.default_rng(seed)
    degen = _choose_degenerated(degenerated, rng)
    shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing))
    grid = _Grid(
        x=((np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]).astype(np.float32),
        y=(np.arange(shape[1]) * spacing[1]).astype(np.float32),
        z=(np.arange(shape[2]) * spacing[2]).astype(np.float32),
        spacing=spacing,  # type: ignore[arg-type]
    )
    tissue = {k: v * float(rng.uniform(0.96, 1.04)) for k, v in _TISSUES[contrast].items()}
    bodies, discs = _layout(rng, degen, fov, np.deg2rad(float(tilt_deg)), wedges, slips)  # type: ignore[arg-type]
    prof = _profiles(rng, grid, bodies, discs)
    gap = prof.gap
    cv = _Canvas(grid, tissue, rng)
    # painting order: later structures win (bone arch < canal < discs < bodies)

    _paint_soft_tissue(cv, prof, bodies)
    for i, seg in enumerate(bodies):
        row = int(np.clip(round(seg.y / spacing[1]), 0, shape[1] - 1))
        _paint_posterior(cv, seg, float(prof.depth[row]), float(prof.width[row]), gap,
                         0 if i < 6 else (1 if i == 6 else 2), rng)
    _paint_canal(cv, prof, bodies)
    _paint_roots(cv, bodies, prof, gap)
    bulges = [_paint_disc(cv, seg, bodies[i], bodies[i + 1], i in degen, i >= 6, rng) for i, seg in enumerate(discs)]
    for seg in bodies:
        _paint_body(cv, seg, rng)

    posterior = cv.lab == _POSTERIOR
    cv.lab[posterior] = VERTEBRA if label_posterior_elements else 0
    image = _acquire(cv.img, rng, grid, noise, bias)
    levels = _levels(bodies, discs, degen, spacing)
    # world origin at the centre of the volume
    origin = (-(shape[0] - 1) * spacing[0] / 2, (shape[2] - 1) * spacing[2] / 2, (shape[1] - 1) * spacing[1] / 2)
    meta = dict(phantom_seed=seed, contrast=contrast)
    vols = {
        "image": Volume.from_canonical(image, spacing, origin, kind="image", **meta),  # type: ignore[arg-type]
        "labels": Volume.from_canonical(cv.lab, spacing, origin, kind="labels", **meta),  # type: ignore[arg-type]
        "posterior": Volume.from_canonical(posterior.astype(np.uint8), spacing, origin, kind="labels", **meta),  # type: ignore[arg-type]
    }
    if random_orientation:
        vols = _reorient(vols, np.random.default_rng([seed, 1]))
    construction = Construction(tuple(bodies), tuple(discs), tuple(bulges), grid.y.astype(float), prof.z_canal,
                                prof.half_z, prof.width / 2, prof.x)
    return Phantom(vols["image"], vols["labels"], levels, contrast, seed, vols["posterior"], construction)


def _deformity(spec: Mapping[str, float] | None, what: str, lo: float, hi: float) -> dict[int, float]:
    """``{"L1": 0.3}`` -> ``{1: 0.3}`` (body index), checked: bodies T12..L5, fractions in ``[lo, hi]``."""
    out: dict[int, float] = {}
    for name, frac in (spec or {}).items():
        if name not in BODY_NAMES[:6]:
            raise ValueError(f"A {what} applies to one of {', '.join(BODY_NAMES[:6])}; got {name!r}.")
        if not lo <= float(frac) <= hi:
            raise ValueError(f"The {what} of {name} must be between {lo} and {hi}; got {frac}.")
        if frac:
            out[BODY_NAMES.index(name)] = float(frac)
    return out


def _acquire(img: np.ndarray, rng: np.random.Generator, grid: _Grid, noise: float, bias: float) -> np.ndarray:
    """Partial-volume blur, smooth multiplicative bias field (brighter near the posterior coil), Rician noise."""
    out = ndimage.gaussian_filter(img, sigma=(0.35, 0.6, 0.6), truncate=3.0)
    ty = (grid.y - grid.y[0]) / max(float(np.ptp(grid.y)), 1.0)
    tz = (grid.z - grid.z[0]) / max(float(np.ptp(grid.z)), 1.0)
    field = (_random_profile(rng, ty, 3, 1.0)[:, None] + _random_profile(rng, tz, 3, 1.0)[None, :]
             + 0.8 * (tz[None, :] - 0.5))
    field /= np.abs(field).max() + 1e-6
    tx = np.linspace(-1, 1, grid.x.size, dtype=np.float32) * rng.uniform(-0.15, 0.15)
    out *= (1.0 + bias * field.astype(np.float32))[None] * (1.0 + bias * tx)[:, None, None]
    if noise > 0:
        re = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise)
        im = rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise)
        out = np.sqrt(re * re + im * im)
    return np.maximum(out, 0).astype(np.float32)


def _levels(bodies: list[_Seg], discs: list[_Seg], degen: frozenset[int], spacing) -> tuple[Level, ...]:
    out = []
    for i, name in enumerate(BODY_NAMES):
        b = bodies[i]
        out.append(Level(name, "body", b.y / spacing[1], b.z / spacing[2]))
        if i < len(DISC_NAMES):
            d = discs[i]
            out.append(Level(DISC_NAMES[i], "disc", d.y / spacing[1], d.z / spacing[2], i in degen))
    return tuple(out)


def _reorient(vols: dict[str, Volume], rng: np.random.Generator) -> dict[str, Volume]:
    """Store the canonical arrays in a random axis order with flips; the affine keeps the world geometry."""
    perm = rng.permutation(3)
    flips = rng.integers(0, 2, 3).astype(bool)  # per canonical axis
    out = {}
    for k, vol in vols.items():
        can = vol.data
        n = can.shape
        flipped = np.flip(can, axis=tuple(int(a) for a in np.flatnonzero(flips))) if flips.any() else can
        data = np.ascontiguousarray(np.transpose(flipped, perm))
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for j, c in enumerate(perm):  # file axis j holds canonical axis c
            m[c, j] = -1.0 if flips[c] else 1.0
            m[c, 3] = n[c] - 1 if flips[c] else 0.0
        out[k] = Volume(data, vol.affine @ m, kind=vol.kind, meta=dict(vol.meta))
    return out


def make_phantom_dataset(n: int, seed: int = 0, **kwargs) -> Iterator[Phantom]:
    """``n`` varied phantoms for training: T2w/T1w alternating, 0-2 degenerated discs, varied noise/bias.

    Keyword arguments go to :func:`make_phantom` and override the drawn values.
    """
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        r = np.random.default_rng(child)
        params = dict(
            contrast=("T2w", "T1w")[i % 2],
            degenerated=int(r.integers(0, 3)),
            noise=float(r.uniform(0.01, 0.05)),
            bias=float(r.uniform(0.05, 0.3)),
        )
        params.update(kwargs)
        yield make_phantom(int(child.generate_state(1)[0]), **params)
