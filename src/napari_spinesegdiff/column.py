"""The spine column of a label map, and how far each predicted structure lies from it (numpy and SciPy only).

A model that has learned what a disc looks like may draw one wherever the image resembles a disc: in an
empty corner of the field of view, in the bowel, in a lateral muscle.  Such a structure is far from the
chain of vertebrae, discs and canal that every real one belongs to.  This module finds that chain and
measures, in millimetres and in 3-D, how far every other structure lies from it; the pipeline drops the
far ones (:func:`drop_strays`, ``SegmentationConfig.column_margin_mm``) and the evaluation reports the
farthest (:func:`farthest_structure_mm`).

The chain, robustly:

1. Structures are the 3-D connected pieces of the foreground (every label together, 26-connected), so a
   vertebra touching its disc, and the canal touching both, are one piece.
2. The large pieces (at least ``anchor_share`` of the largest) are the candidates for the column.  A smooth
   curve is fitted through them along superior-inferior: in 10 mm bins of each candidate, the centroid
   (left-right, anterior-posterior); polynomials of degree up to 3 in the superior-inferior position,
   weighted by voxel count, refitted with Tukey weights so a large stray piece far from the others does not
   pull the curve.  Beyond the column's superior and inferior ends the curve keeps its end point.
3. The core is the candidates that the curve passes within ``margin_mm`` of.
4. A piece's distance from the column is the smallest, over its voxels, of the in-plane distance to the
   curve at that voxel's superior-inferior position (a level above or below a gap, still aligned with the
   chain) and the 3-D distance to the core's voxels (a posterior arch beside the canal that the label map
   does not join to its body, a piece of sacrum).  The core is at 0.

Arrays are canonical (left-right slices, rows superior to inferior, columns anterior to posterior) with
the canonical spacing in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: A piece at least this share of the largest is a candidate for the column.
ANCHOR_SHARE = 0.25
#: Superior-inferior bin (mm) of the centroids the curve is fitted through.
BIN_MM = 10.0


@dataclass(frozen=True)
class ColumnCurve:
    """The column's centre line: left-right and anterior-posterior position (mm) as polynomials of the
    superior-inferior position (mm), valid between ``si_range`` (constant beyond)."""

    lr: np.ndarray  # polynomial coefficients, highest power first (np.polyval)
    ap: np.ndarray
    si_range: tuple[float, float]

    def at(self, si_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(left-right, anterior-posterior) of the centre line at superior-inferior positions (mm)."""
        s = np.clip(np.asarray(si_mm, np.float64), *self.si_range)
        return np.polyval(self.lr, s), np.polyval(self.ap, s)

    def distance(self, points_mm: np.ndarray) -> np.ndarray:
        """In-plane distance (mm) of points (N, 3: left-right, superior-inferior, anterior-posterior) from
        the centre line at their own superior-inferior position."""
        lr, ap = self.at(points_mm[:, 1])
        return np.hypot(points_mm[:, 0] - lr, points_mm[:, 2] - ap)


@dataclass(frozen=True)
class ColumnPieces:
    """The foreground's 3-D pieces (``pieces``: 0 background, 1..n) with each one's distance (mm) from the
    column (``distance_mm[k - 1]`` for piece ``k``; 0 for the core) and the fitted curve (None when the
    labels are empty)."""

    pieces: np.ndarray
    distance_mm: np.ndarray
    curve: ColumnCurve | None


def _fit_curve(points: np.ndarray, weights: np.ndarray, margin_mm: float, iterations: int = 4) -> ColumnCurve:
    """Weighted polynomial fit of left-right and anterior-posterior against superior-inferior through
    centroids ``points`` (N, 3), refitted with Tukey biweights of scale ``2 * margin_mm``."""
    si = points[:, 1]
    degree = int(min(3, np.unique(np.round(si, 3)).size - 1))
    w = weights.astype(np.float64)
    scale = max(2.0 * margin_mm, 1.0)
    curve = None
    for _ in range(iterations + 1):
        if degree == 0 or not np.any(w > 0):
            use = w if np.any(w > 0) else weights.astype(np.float64)
            lr = np.array([np.average(points[:, 0], weights=use)])
            ap = np.array([np.average(points[:, 2], weights=use)])
        else:
            sw = np.sqrt(w)  # np.polyfit weights the residuals, so sqrt gives count-weighted least squares
            lr = np.polyfit(si, points[:, 0], degree, w=sw)
            ap = np.polyfit(si, points[:, 2], degree, w=sw)
        curve = ColumnCurve(lr, ap, (float(si.min()), float(si.max())))
        r = curve.distance(points) / scale
        new = weights * np.where(r < 1.0, (1.0 - r ** 2) ** 2, 0.0)
        if np.count_nonzero(new) <= degree:  # too few points left to fit: keep the last curve
            break
        w = new
    return curve


def column_pieces(labels: np.ndarray, spacing: Sequence[float], margin_mm: float = 20.0,
                  anchor_share: float = ANCHOR_SHARE) -> ColumnPieces:
    """The foreground's 3-D pieces of canonical ``labels`` and each piece's distance (mm) from the spine
    column (module docstring).  The work is done in the foreground's bounding box; distances on the pieces'
    surface voxels (a piece's nearest voxel to anything outside it is on its surface)."""
    from scipy import ndimage

    spacing = np.asarray(spacing, np.float64)
    pieces = np.zeros(labels.shape, np.int32)
    fg = labels > 0
    if not fg.any():
        return ColumnPieces(pieces, np.zeros(0), None)
    spans = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(span[0]), int(span[-1]) + 1) for span in spans)
    corner = np.array([b.start for b in box])
    sub, n = ndimage.label(fg[box], structure=np.ones((3, 3, 3), bool), output=np.int32)
    pieces[box] = sub
    sizes = np.bincount(sub.ravel(), minlength=n + 1)
    sizes[0] = 0
    candidate = sizes >= anchor_share * sizes.max()
    candidate[0] = False
    # centroids of each candidate piece in superior-inferior bins, and the curve through them
    idx = np.nonzero(candidate[sub])
    points = (np.stack(idx, axis=1) + corner) * spacing
    bins = np.floor(points[:, 1] / BIN_MM).astype(np.int64)
    key = sub[idx].astype(np.int64) * (bins.max() - bins.min() + 1) + (bins - bins.min())
    counts = np.bincount(key)
    used = counts > 0
    centroids = np.stack([np.bincount(key, weights=points[:, a])[used] for a in range(3)], axis=1)
    counts = counts[used]
    centroids /= counts[:, None]
    curve = _fit_curve(centroids, counts, margin_mm)
    # each piece's smallest distance from the curve and, outside the core, from the core
    surface = (sub > 0) & ~ndimage.binary_erosion(sub > 0, border_value=0)
    idx = np.nonzero(surface)
    owner = sub[idx]
    points = (np.stack(idx, axis=1) + corner) * spacing
    distance = _smallest_per_piece(curve.distance(points), owner, n)
    core = np.concatenate([[False], candidate[1:] & (distance <= margin_mm)])
    if not core.any():  # nothing the curve passes near: the largest piece stands for the column
        core[int(np.argmax(sizes))] = True
    distance[core[1:]] = 0.0
    outside = ~core[owner]
    if outside.any():
        from scipy.spatial import cKDTree

        near, _ = cKDTree(points[~outside]).query(points[outside], k=1)
        distance = np.minimum(distance, _smallest_per_piece(near, owner[outside], n))
    return ColumnPieces(pieces, distance, curve)


def _smallest_per_piece(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The smallest of ``values`` per piece 1..n (``owner`` the piece of each value; inf where none)."""
    order = np.argsort(owner, kind="stable")
    ids, starts = np.unique(owner[order], return_index=True)
    out = np.full(n, np.inf)
    if ids.size:
        out[ids - 1] = np.minimum.reduceat(values[order], starts)
    return out


def drop_strays(labels: np.ndarray, spacing: Sequence[float], margin_mm: float) -> int:
    """In place: set to background every 3-D piece of canonical ``labels`` farther than ``margin_mm`` from
    the spine column (:func:`column_pieces`); returns the number of voxels dropped.  ``margin_mm`` <= 0: off."""
    if margin_mm <= 0 or not labels.any():
        return 0
    return drop_pieces(labels, column_pieces(labels, spacing, margin_mm), margin_mm)


def drop_pieces(labels: np.ndarray, found: ColumnPieces, margin_mm: float) -> int:
    """In place: set to background the pieces of ``found`` (:func:`column_pieces` of these ``labels``)
    farther than ``margin_mm`` from the column; returns the number of voxels dropped."""
    far = np.concatenate([[False], found.distance_mm > margin_mm])
    if not far.any():
        return 0
    drop = far[found.pieces]
    labels[drop] = 0
    return int(drop.sum())


def farthest_structure_mm(labels: np.ndarray, spacing: Sequence[float], margin_mm: float = 20.0) -> float:
    """The largest distance (mm) of any 3-D piece of canonical ``labels`` from the spine column (0 when every
    piece belongs to the core, nan for empty labels)."""
    found = column_pieces(labels, spacing, margin_mm)
    return float(found.distance_mm.max()) if found.distance_mm.size else float("nan")


def foreground_box(labels: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The rows and columns (canonical, every slice) of ``labels``' foreground grown by ``margin`` voxels and
    clipped to the array; empty slices (``slice(0, 0)``) when there is no foreground.  The pipeline labels
    the ensemble members there, and the level report names and measures structures there."""
    rows, cols = np.flatnonzero(labels.any(axis=(0, 2))), np.flatnonzero(labels.any(axis=(0, 1)))
    if not rows.size:
        return slice(0, 0), slice(0, 0)
    return (slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, labels.shape[1])),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, labels.shape[2])))
