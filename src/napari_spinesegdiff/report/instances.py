"""From a class map to named structures: each vertebra, each disc and the canal, named by level, in 3-D.

**Splitting** (:func:`find_instances`, canonical frame, millimetres of ``spacing``):

* discs: the 3-D components of label 3; components under :data:`MIN_DISC_FRACTION` of the largest are
  dropped, fragments closer along the column than :data:`MERGE_FRACTION` of the median disc spacing are
  merged into one disc.  Each disc gets a plane: its centroid and its normal, the disc's own minor principal
  axis in the sagittal plane (the bisector of its endplates), or the chain's direction (the line through its
  neighbours' centroids) where the disc is not flat enough or leans more than :data:`MAX_NORMAL_DEG` from it;
* vertebrae: every bone voxel (label 2, and 4 with ``vertebrae="split"``) in front of the canal (the body)
  belongs to the segment between two consecutive disc planes (the sign of its distance to each plane); the
  posterior elements, which touch their neighbours at the facets, are grown from their own body through the
  bone (a geodesic flood: the pedicle reaches its own arch before the neighbour's), and the bone the flood
  does not reach goes by the planes.  A gap between two discs of about twice the median spacing is a
  missing disc: a virtual plane halfway splits the two vertebrae it joins;
* canal: label 1, one structure.

**Naming**, counted upward from an anchor (the ordinal ``o``: S1 = 0, L5 = 1, L4 = 2, ... T12 = 6 ...):

* anchor ``"sacrum"``: the segment below the lowest disc is the sacrum when it reaches more than
  :data:`SACRUM_LENGTH` median disc spacings below that disc or holds more than :data:`SACRUM_VOLUME`
  median vertebrae (S1 and the fused segments below it; an L5 is one spacing long);
* else anchor ``"lowest disc"``: the lowest disc is assumed to be L5-S1, said so in :attr:`Instances.anchor`
  and the scan flag ``sacrum_out_of_view``; the segment below it, when any, is named S1;
* discs by the two vertebrae they join (``L4-L5``); five lumbar vertebrae unless ``lumbar=6`` (sagittal
  lumbar MRI rarely shows the ribs that would tell T12 from L1, so six lumbar vertebrae are never assumed
  from the count alone: a reviewer renumbers, :meth:`Instances.renumbered`);
* confidence: :data:`CONFIDENCE_SACRUM` from a sacrum, :data:`CONFIDENCE_LOWEST_DISC` from the lowest
  disc, times :data:`DECAY_PER_LEVEL` per level away from the anchor, lowered by irregular disc spacing
  (its coefficient of variation), a missing disc below the level, or an extra disc;
* scan flags: ``sacrum_out_of_view``, ``missing_disc:<name>``, ``extra_disc:<where>``, ``sacral_disc``
  (a small disc below the sacrum's top: the S1-S2 remnant, kept out of the count), ``transitional?`` (the
  L5-S1 disc much thinner than the others: a sacralised L5 or lumbarised S1 may shift the names),
  ``lumbar:6`` when six lumbar vertebrae were asked for, ``renumbered:+1`` after a reviewer's shift.
  Structure flags: ``cut_by_fov`` (touches the in-plane border of the volume), the same level flags.

**SPIDER's instance values** (van der Graaf et al., Sci Data 11:264, 2024, https://doi.org/10.1038/s41597-024-03090-w):
the SPIDER baseline's documentation on grand-challenge (https://grand-challenge.org/algorithms/spider-baseline-iis/)
and the dataset card of the SPIDER copy on HuggingFace (https://huggingface.co/datasets/cdoswald/SPIDER) give
``1-25`` vertebrae numbered from the bottom (L5 = 1), ``100`` spinal canal, ``101-125`` partially visible
vertebrae, ``201-225`` discs numbered from the bottom (L5/S1 = 201).  So vertebra value = its ordinal
(L5 1, L4 2, ... L1 5, T12 6, ... C1 24) and a disc's value = 200 + the ordinal of the vertebra above it
(L5-S1 201, L4-L5 202, T12-L1 206).  The 26 SPIDER slabs in ``../shared/data`` label no sacrum beyond a sliver
(their bone ends at the lowest disc), which fits L5 = 1.  Assumptions (not documented there): the sacrum is written as
:data:`SACRUM_VALUE` (25, the one value L5..C1 leave free); with six lumbar vertebrae the values stay
positional from the bottom (L6 1, L5 2).  Reading (:func:`instances_from_spider`) accepts both that and
the other convention seen in SPIDER masks, the sacrum as vertebra 1 (then L5 = 2): a vertebra 1 that lies
below disc 201 is taken as the sacrum.  numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..column import foreground_box

CANAL_VALUE = 100
DISC_BASE = 200
PARTIAL_BASE = 100  # SPIDER: 101-125 partially visible vertebrae
SACRUM_VALUE = 25
MAX_ORDINAL = 25
MIN_DISC_FRACTION = 0.1  # a disc component under this fraction of the largest is noise
MIN_DISC_MM3 = 100.0
MERGE_FRACTION = 0.4  # disc fragments closer than this many median spacings are one disc
MISSING_GAP = 1.6  # a gap over this many median spacings hides a disc
EXTRA_GAP = 0.6  # a disc closer than this to both neighbours is extra
SMALL_DISC = 0.35  # a lowest disc under this fraction of the median volume below the sacrum's top: remnant
MAX_NORMAL_DEG = 40.0
FLAT = 0.6  # a disc whose minor/major spread ratio is above this is not flat enough for its own normal
SACRUM_LENGTH = 1.2
SACRUM_VOLUME = 1.4
THIN_DISC = 0.35  # L5-S1 thinner than this fraction of the other discs: transitional?
BODY_MARGIN_MM = 2.0  # bone this far in front of the canal's front is body (seeds the arches)
MIN_SEGMENT_FRACTION = 0.03
CONFIDENCE_SACRUM, CONFIDENCE_LOWEST_DISC, CONFIDENCE_SPIDER = 0.95, 0.6, 1.0
DECAY_PER_LEVEL = 0.985
LUMBAR = 5


class InstancesError(ValueError):
    """A label map that cannot be split into named structures (one sentence)."""


# --------------------------------------------------------------------------------------------- names
def level_name(ordinal: int, lumbar: int = LUMBAR) -> str:
    """The vertebra with ``ordinal`` (S1 = 0, the lowest lumbar = 1, counted upward): S1, L5 ... L1, T12 ...
    T1, C7 ... C1; below S1: S2, S3 ...; beyond C1: ``"?"``."""
    if ordinal <= 0:
        return f"S{1 - ordinal}"
    if ordinal <= lumbar:
        return f"L{lumbar + 1 - ordinal}"
    t = ordinal - lumbar
    if t <= 12:
        return f"T{13 - t}"
    c = t - 12
    return f"C{8 - c}" if c <= 7 else "?"


def disc_name(ordinal_above: int, lumbar: int = LUMBAR) -> str:
    """The disc below the vertebra with ``ordinal_above``: ``"L4-L5"``, ``"L5-S1"``, ``"T12-L1"``."""
    return f"{level_name(ordinal_above, lumbar)}-{level_name(ordinal_above - 1, lumbar)}"


def vertebra_value(ordinal: int) -> int | None:
    """SPIDER's value of a vertebra (see the module docstring); None where it has none (below S1)."""
    if ordinal == 0:
        return SACRUM_VALUE
    return ordinal if 1 <= ordinal < SACRUM_VALUE else None


def disc_value(ordinal_above: int) -> int | None:
    return DISC_BASE + ordinal_above if 1 <= ordinal_above <= MAX_ORDINAL else None


# --------------------------------------------------------------------------------------------- API types
@dataclass(frozen=True)
class Structure:
    """One named structure of an instance map."""

    value: int | None  # its value in the instance map (SPIDER scheme): vertebra 1-25, disc 201-225, canal 100
    structure: str  # "vertebra" | "disc" | "canal"
    level: str  # "L4", "L4-L5", "S1", "T12-L1", or "canal"
    level_confidence: float  # in [0, 1]
    flags: tuple[str, ...]
    n_voxels: int
    centroid: tuple[float, float, float]  # canonical voxel coordinates
    ordinal: int | None = None  # vertebra: S1 = 0, L5 = 1 ...; disc: the vertebra above's; canal: None


@dataclass(frozen=True)
class Instances:
    """Named structures of one scan, in the canonical frame (see the module docstring)."""

    canonical: np.ndarray  # uint16 instance map, SPIDER values, 0 background
    structures: tuple[Structure, ...]  # vertebrae top->bottom, then discs top->bottom, then canal
    spacing: tuple[float, float, float]
    anchor: str  # "sacrum", "lowest disc" or "spider" (names read from SPIDER values)
    flags: tuple[str, ...]
    shift: int = 0  # reviewer's renumbering: +1 = every name one level down (L4 -> L5)
    classes: np.ndarray | None = field(default=None, repr=False, compare=False)  # the class map named
    lumbar: int = LUMBAR
    origin: "Instances | None" = field(default=None, repr=False, compare=False)  # the naming before any shift

    def renumbered(self, shift: int) -> "Instances":
        """The same structures with every name ``shift`` levels down from the automatic naming (+1: L4 -> L5;
        absolute: ``renumbered(0)`` restores it); SPIDER values follow the names (a name without a SPIDER
        value, S2 and below, is left out of the map and flagged ``no_spider_value``)."""
        shift = int(shift)
        src = self.origin or self
        delta = shift - src.shift
        if shift == self.shift:
            return self
        if delta == 0:
            return src
        lut = np.zeros(max(int(src.canonical.max(initial=0)), CANAL_VALUE) + 1, np.uint16)
        lut[CANAL_VALUE] = CANAL_VALUE
        out = []
        for s in src.structures:
            if s.ordinal is None:
                out.append(s)
                continue
            o = s.ordinal - delta
            if s.structure == "vertebra":
                value, level = vertebra_value(o), level_name(o, self.lumbar)
            else:
                value, level = disc_value(o), disc_name(o, self.lumbar)
            flags = tuple(f for f in s.flags if f != "no_spider_value") + (() if value else ("no_spider_value",))
            if s.value is not None and value is not None:
                lut[s.value] = value
            out.append(replace(s, value=value, level=level, ordinal=o, flags=flags))
        canonical = lut[src.canonical]
        flags = tuple(f for f in src.flags if not f.startswith("renumbered:"))
        if shift:
            flags += (f"renumbered:{shift:+d}",)
        return replace(src, canonical=canonical, structures=tuple(out), flags=flags, shift=shift, origin=src)

    def by_value(self, value: int) -> Structure:
        for s in self.structures:
            if s.value == value:
                return s
        raise KeyError(f"No structure has the value {value}.")

    def by_level(self, level: str) -> Structure:
        """The structure named ``level`` (``"L3"``, ``"L4-L5"``, ``"canal"``; ``/`` is read as ``-``)."""
        level = level.replace("/", "-")
        for s in self.structures:
            if s.level == level:
                return s
        raise KeyError(f"No structure is named {level}.")

    def mask(self, value: int) -> np.ndarray:
        """Boolean canonical mask of the structure with ``value``."""
        return self.canonical == value


# --------------------------------------------------------------------------------------------- helpers
def _check(labels, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise InstancesError(f"A label map must be 3-D (slices, rows, columns); this one has shape {arr.shape}.")
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InstancesError(f"A label map must hold whole numbers; this one is {arr.dtype}.")
    if arr.size and arr.min() < 0:
        raise InstancesError(f"A label map cannot hold negative values; this one holds {int(arr.min())}.")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InstancesError(f"The spacing must be three positive millimetre values; got {tuple(spacing)}.")
    return arr, sp  # type: ignore[return-value]


def _touches_border(idx: tuple[np.ndarray, ...], shape) -> bool:
    return bool(idx[1].min() == 0 or idx[1].max() == shape[1] - 1 or idx[2].min() == 0 or idx[2].max() == shape[2] - 1)


@dataclass
class _Plane:
    centre: np.ndarray  # (y, z) mm
    normal: np.ndarray  # unit (dy, dz), inferior-pointing
    ids: list[int]  # disc component ids (empty: a virtual plane for a missing disc)
    volume: float = 0.0
    thickness: float = 0.0  # spread (mm) along its own minor axis
    ratio: float = 0.0  # minor / major spread

    def signed(self, yz: np.ndarray) -> np.ndarray:
        return (yz[:, 0] - self.centre[0]) * self.normal[0] + (yz[:, 1] - self.centre[1]) * self.normal[1]


def _pca(yz: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Minor axis (inferior-pointing) of points (y, z) and the spreads (minor, major)."""
    if len(yz) < 3:
        return np.array([1.0, 0.0]), 0.0, 1.0
    w, v = np.linalg.eigh(np.cov((yz - yz.mean(axis=0)).T))
    n = v[:, 0] * (1 if v[0, 0] >= 0 else -1)
    return n, float(np.sqrt(max(w[0], 0))), float(np.sqrt(max(w[1], 1e-12)))


def _disc_planes(disc: np.ndarray, sp) -> tuple[list[_Plane], np.ndarray, list[str]]:
    """The chain of disc planes, top to bottom, the component map and flags about dropped/merged parts."""
    comp, n = ndimage.label(disc)
    if n == 0:
        return [], comp, []
    vox = float(np.prod(sp))
    counts = np.bincount(comp.ravel(), minlength=n + 1)[1:] * vox
    keep = [i + 1 for i in range(n) if counts[i] >= max(MIN_DISC_MM3, MIN_DISC_FRACTION * counts.max())]
    dropped = int(np.sum((counts >= max(MIN_DISC_MM3, 0.01 * counts.max())) & (counts < MIN_DISC_FRACTION * counts.max())))
    flags = [f"disc_fragments_dropped:{dropped}"] if dropped else []
    objects = ndimage.find_objects(comp)
    points: dict[int, np.ndarray] = {}
    for i in keep:
        box = objects[i - 1]
        idx = np.nonzero(comp[box] == i)
        points[i] = np.column_stack([(idx[1] + box[1].start) * sp[1], (idx[2] + box[2].start) * sp[2]])
    order = sorted(keep, key=lambda i: points[i][:, 0].mean())
    groups = [[i] for i in order]
    if len(groups) >= 3:  # merge fragments of one disc
        cents = [points[g[0]].mean(axis=0) for g in groups]
        med = float(np.median([np.hypot(*(b - a)) for a, b in zip(cents[:-1], cents[1:])]))
        merged = [groups[0]]
        for g, c_prev, c in zip(groups[1:], cents[:-1], cents[1:]):
            if np.hypot(*(c - c_prev)) < MERGE_FRACTION * med:
                merged[-1] = merged[-1] + g
            else:
                merged.append(g)
        groups = merged
    planes = []
    for g in groups:
        yz = np.concatenate([points[i] for i in g])
        n_own, minor, major = _pca(yz[:: max(1, len(yz) // 20000)])
        planes.append(_Plane(yz.mean(axis=0), n_own, g, len(yz) * vox, minor, minor / max(major, 1e-9)))
    _orient(planes)
    return planes, comp, flags


def _orient(planes: list[_Plane]) -> None:
    """Replace a disc's own normal by the chain's direction where it is not flat or leans too far from it."""
    cents = [p.centre for p in planes]
    for k, p in enumerate(planes):
        if len(planes) == 1:
            chain = np.array([1.0, 0.0])
        else:
            a, b = cents[max(k - 1, 0)], cents[min(k + 1, len(planes) - 1)]
            chain = (b - a) / max(np.hypot(*(b - a)), 1e-9)
        own = p.normal
        angle = math.degrees(math.acos(min(1.0, abs(float(own @ chain)))))
        if p.ratio > FLAT or angle > MAX_NORMAL_DEG:
            p.normal = chain if chain[0] >= 0 else -chain
        elif own[0] < 0:
            p.normal = -own


def _canal_front(canal: np.ndarray) -> np.ndarray | None:
    """Per row, the most anterior canal column over all slices (interpolated over rows without canal)."""
    rows = np.nonzero(canal.any(axis=(0, 2)))[0]
    if rows.size < 2:
        return None
    front = np.array([np.nonzero(canal[:, r].any(axis=0))[0].min() for r in rows], float)
    return np.interp(np.arange(canal.shape[1]), rows, front)


def _grow(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Flood ``seeds`` (labels > 0, inside ``mask``) through ``mask`` one face neighbour a step (breadth first):
    each voxel takes the label that reaches it first."""
    cur = np.pad(seeds, 1).ravel()
    todo = np.pad(mask, 1).ravel() & (cur == 0)  # the padding is outside the mask: no wrap-around
    n1, n2 = seeds.shape[1] + 2, seeds.shape[2] + 2
    offsets = (n1 * n2, -n1 * n2, n2, -n2, 1, -1)
    front = np.flatnonzero(cur > 0)
    while front.size:
        new = []
        for off in offsets:
            nb = front + off
            ok = todo[nb]
            if not ok.any():
                continue
            nb = nb[ok]
            cur[nb] = cur[front[ok]]
            todo[nb] = False
            new.append(nb)
        front = np.concatenate(new) if new else np.empty(0, np.intp)
    return cur.reshape(tuple(n + 2 for n in seeds.shape))[1:-1, 1:-1, 1:-1]


@dataclass
class _Chain:
    """The disc planes counted (real and virtual, top to bottom) and what was left out of the count."""

    planes: list[_Plane]
    spacing: float  # median centre-to-centre distance of consecutive discs (mm)
    extra: list[_Plane]  # discs kept out of the count (not named by position)
    flags: list[str]
    remnant: _Plane | None = None


def _gaps(planes: Sequence[_Plane]) -> np.ndarray:
    return np.array([float(np.hypot(*(b.centre - a.centre))) for a, b in zip(planes[:-1], planes[1:])])


def _chain(planes: list[_Plane]) -> _Chain:
    """Extra discs out, missing discs in (virtual planes), the sacral remnant out."""
    if len(planes) < 2:
        return _Chain(list(planes), DEFAULT_SPACING_MM, [], [])
    m = float(np.median(_gaps(planes)))
    extra, flags, remnant = [], [], None
    if len(planes) >= 3:
        vols = np.median([p.volume for p in planes])
        kept = list(planes)
        g = _gaps(kept)
        if kept[-1].volume < SMALL_DISC * vols and g[-1] < 0.85 * m:  # the S1-S2 remnant below the sacrum's top
            remnant = kept.pop()
            flags.append("sacral_disc")
        k = 1
        while k < len(kept) - 1:
            g = _gaps(kept)
            if g[k - 1] < EXTRA_GAP * m and g[k] < EXTRA_GAP * m:
                extra.append(kept.pop(k))
                continue
            k += 1
        planes = kept
        m = float(np.median(_gaps(planes))) if len(planes) >= 2 else m
    out = [planes[0]]
    for a, b, gap in zip(planes[:-1], planes[1:], _gaps(planes)):
        if len(planes) >= 3 and gap > MISSING_GAP * m:
            n = max(1, int(round(gap / m)) - 1)
            for i in range(1, n + 1):
                t = i / (n + 1)
                normal = (1 - t) * a.normal + t * b.normal
                out.append(_Plane((1 - t) * a.centre + t * b.centre, normal / np.hypot(*normal), []))
        out.append(b)
    return _Chain(out, m, extra, flags, remnant)


DEFAULT_SPACING_MM = 35.0  # a lumbar level (body and disc) where fewer than two discs give none


def find_instances(labels, spacing, *, vertebrae: str = "whole", shift: int = 0, lumbar: int = LUMBAR) -> Instances:
    """Split a canonical class map (project scheme: 1 canal, 2 vertebra or body, 3 disc, 4 posterior elements
    with ``vertebrae="split"``) into named structures (module docstring); ``spacing`` in mm per canonical
    axis; ``shift`` renumbers (:meth:`Instances.renumbered`); ``lumbar=6`` names six lumbar vertebrae.
    ``vertebrae="split"`` (or any label 4): label 2 is the bodies, which seed their arches; ``"whole"``: the
    bone in front of the canal is the bodies.  Raises :class:`InstancesError` (one sentence) on a map that is
    not 3-D, not whole numbers, negative or outside the scheme, or on a bad spacing."""
    lab, sp = _check(labels, spacing)
    if vertebrae not in ("whole", "split"):
        raise InstancesError(f"vertebrae must be 'whole' or 'split', got {vertebrae!r}.")
    if lumbar not in (5, 6):
        raise InstancesError(f"lumbar must be 5 or 6 lumbar vertebrae; got {lumbar}.")
    bad = sorted(set(np.unique(lab).tolist()) - {0, 1, 2, 3, 4})
    if bad:
        raise InstancesError(f"The class map holds {bad[0]}, which is not a class of the project's scheme "
                             "(0 background, 1 canal, 2 vertebra or body, 3 disc, 4 posterior elements).")
    rs, cs = foreground_box(lab, CROP_MARGIN)
    if rs.stop and (rs.stop - rs.start < lab.shape[1] or cs.stop - cs.start < lab.shape[2]):
        # the work on the rows and columns of the foreground (and a margin: a structure touches the cropped
        # edge only where it is the image's), the map and centroids back in the whole frame
        found = _find(lab[:, rs, cs], sp, vertebrae, lumbar)
        inst = np.zeros(lab.shape, np.uint16)
        inst[:, rs, cs] = found.canonical
        structures = tuple(replace(st, centroid=(st.centroid[0], st.centroid[1] + rs.start, st.centroid[2] + cs.start))
                           for st in found.structures)
        result = replace(found, canonical=inst, structures=structures, classes=lab)
    else:
        result = _find(lab, sp, vertebrae, lumbar)
    return result.renumbered(shift) if shift else result


#: Voxels kept around the foreground's rows and columns when structures are found.
CROP_MARGIN = 4


def _find(lab: np.ndarray, sp: tuple[float, float, float], vertebrae: str, lumbar: int) -> Instances:
    """:func:`find_instances` on a checked class map (no shift)."""
    planes, comp, disc_flags = _disc_planes(lab == 3, sp)
    chain = _chain(planes)
    seg, body = _segments(lab, chain.planes, sp, split=vertebrae == "split" or bool(np.any(lab == 4)))
    n_planes = len(chain.planes)
    flags = disc_flags + chain.flags
    vox = float(np.prod(sp))

    counts = np.bincount(seg.ravel(), minlength=n_planes + 2)[1:] * vox  # segment j at counts[j - 1]
    bodies = np.bincount(seg[body], minlength=n_planes + 2)[1:] * vox
    present = [j for j in range(1, n_planes + 2) if counts[j - 1] > 0]
    middle = [counts[j - 1] for j in range(2, n_planes + 1) if counts[j - 1] > 0]
    median_vol = float(np.median(middle)) if middle else float(max(counts.max(initial=0), 1.0))
    middle_bodies = [bodies[j - 1] for j in range(2, n_planes + 1) if bodies[j - 1] > 0]
    small = [j for j in present if counts[j - 1] < MIN_SEGMENT_FRACTION * median_vol]
    if small:
        seg[np.isin(seg, small)] = 0
        flags.append("fragment_dropped")
        present = [j for j in present if j not in small]

    sacrum = False
    bottom = n_planes + 1
    if n_planes and bottom in present:
        lowest = chain.planes[-1]
        idx = np.nonzero((seg == bottom) & body)
        yz = np.column_stack([idx[1] * sp[1], idx[2] * sp[2]])
        reach = float(np.percentile(lowest.signed(yz), 95)) if len(yz) else 0.0
        sacrum = reach > SACRUM_LENGTH * chain.spacing or (
            bool(middle_bodies) and bodies[bottom - 1] > SACRUM_VOLUME * float(np.median(middle_bodies)))
    anchor = "sacrum" if sacrum else "lowest disc"
    if not sacrum:
        flags.append("sacrum_out_of_view")
    if lumbar == 6:
        flags.append("lumbar:6")
    if chain.extra:
        flags += [f"extra_disc:{_where(p, chain.planes, lumbar)}" for p in chain.extra]
    virtual = [k for k, p in enumerate(chain.planes) if not p.ids]
    for k in virtual:
        flags.append(f"missing_disc:{disc_name(n_planes - k, lumbar)}")
    real = [p for p in chain.planes if p.ids]
    if sacrum and len(real) >= 3:
        others = np.median([p.thickness for p in real[:-1]])
        if real[-1] is chain.planes[-1] and real[-1].thickness < THIN_DISC * others:
            flags.append("transitional?")

    gaps = _gaps(chain.planes)
    cv = float(np.std(gaps) / np.mean(gaps)) if len(gaps) >= 2 else 0.0
    base = (CONFIDENCE_SACRUM if sacrum else CONFIDENCE_LOWEST_DISC) * float(np.clip(1.0 - cv, 0.5, 1.0))
    if chain.extra or chain.remnant is not None:
        base *= 0.85
    lowest_virtual_o = max((n_planes - k for k in virtual), default=None)  # the disc ordinal of a gap

    def confidence(d: float, o: int) -> float:
        c = base * DECAY_PER_LEVEL ** max(d, 0.0)
        if lowest_virtual_o is not None and o >= lowest_virtual_o:
            c *= 0.75
        return float(np.clip(c, 0.0, 1.0))

    inst = np.zeros(lab.shape, np.uint16)
    verts, discs = [], []
    for j in present:
        o = n_planes + 1 - j
        mask = seg == j
        value = vertebra_value(o)
        s = _structure(mask, value, "vertebra", level_name(o, lumbar), confidence(o, o), o, lab.shape)
        if value is not None:
            inst[mask] = value
        verts.append(s)
    for k, p in enumerate(chain.planes):
        if not p.ids:
            continue
        o = n_planes - k
        mask = np.isin(comp, p.ids)
        value = disc_value(o)
        discs.append(_structure(mask, value, "disc", disc_name(o, lumbar), confidence(o - 0.5, o), o, lab.shape))
        if value is not None:
            inst[mask] = value
    for p in chain.extra + ([chain.remnant] if chain.remnant is not None else []):
        mask = np.isin(comp, p.ids)
        level = "S1-S2" if p is chain.remnant else f"extra:{_where(p, chain.planes, lumbar)}"
        discs.append(_structure(mask, None, "disc", level, 0.0, None, lab.shape,
                                ("sacral_disc",) if p is chain.remnant else ("extra_disc",)))
    canal_mask = lab == 1
    out = verts + sorted(discs, key=lambda s: s.centroid[1])
    if canal_mask.any():
        inst[canal_mask] = CANAL_VALUE
        out.append(_structure(canal_mask, CANAL_VALUE, "canal", "canal", 1.0, None, lab.shape))
    return Instances(inst, tuple(out), sp, anchor, tuple(flags), 0, lab, lumbar)


def _where(p: _Plane, planes: Sequence[_Plane], lumbar: int) -> str:
    """The vertebra an extra disc lies in (by the planes counted)."""
    above = sum(1 for q in planes if float(q.signed(p.centre[None])[0]) < 0)
    return level_name(len(planes) - above, lumbar)


def _structure(mask: np.ndarray, value, kind: str, level: str, conf: float, ordinal, shape,
               extra_flags: tuple[str, ...] = ()) -> Structure:
    idx = np.nonzero(mask)
    flags = list(extra_flags)
    if idx[0].size and _touches_border(idx, shape):
        flags.append("cut_by_fov")
    if value is None and kind != "canal" and ordinal is not None:
        flags.append("no_spider_value")
    centroid = tuple(float(i.mean()) for i in idx) if idx[0].size else (math.nan,) * 3
    return Structure(value, kind, level, round(conf, 3), tuple(flags), int(idx[0].size), centroid, ordinal)  # type: ignore[arg-type]


def _segments(lab: np.ndarray, planes: Sequence[_Plane], sp, split: bool) -> tuple[np.ndarray, np.ndarray]:
    """Segment number per bone voxel (1 above the top plane ... len(planes) + 1 below the lowest; 0 elsewhere):
    bodies by the planes, posterior elements flooded from their own body through the bone; and the body mask
    (bone in front of the canal; with ``split`` labels label 2, the bodies)."""
    bone = (lab == 2) | (lab == 4)
    seg = np.zeros(lab.shape, np.int32)
    body_mask = np.zeros(lab.shape, bool)
    if not bone.any():
        return seg, body_mask
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(bone))
    b = bone[box]
    idx = np.nonzero(b)
    yz = np.column_stack([(idx[1] + box[1].start) * sp[1], (idx[2] + box[2].start) * sp[2]])
    by_plane = np.ones(len(yz), np.int32)
    for p in planes:
        by_plane += (p.signed(yz) > 0).astype(np.int32)
    if split:
        body = lab[box][idx] == 2
    else:
        front = _canal_front(lab == 1)
        if front is None:
            body = np.ones(len(yz), bool)
        else:
            body = yz[:, 1] < front[idx[1] + box[1].start] * sp[2] - BODY_MARGIN_MM
    seeds = np.zeros(b.shape, np.int32)
    seeds[tuple(i[body] for i in idx)] = by_plane[body]
    body_box = np.zeros(b.shape, bool)
    body_box[tuple(i[body] for i in idx)] = True
    body_mask[box] = body_box
    grown = _grow(seeds, b) if planes and (~body).any() else by_plane_map(b, idx, by_plane)
    left = b & (grown == 0)
    if left.any():
        grown[left] = by_plane[left[idx]]
    out = np.zeros(b.shape, np.int32)
    out[b] = grown[b]
    seg[box] = out
    return seg, body_mask


def by_plane_map(b: np.ndarray, idx, by_plane: np.ndarray) -> np.ndarray:
    out = np.zeros(b.shape, np.int32)
    out[idx] = by_plane
    return out


# --------------------------------------------------------------------------------------------- SPIDER
def _spider_kind(v: int) -> str | None:
    if v == CANAL_VALUE:
        return "canal"
    if 1 <= v <= MAX_ORDINAL or PARTIAL_BASE < v <= PARTIAL_BASE + MAX_ORDINAL:
        return "vertebra"
    if DISC_BASE < v <= DISC_BASE + MAX_ORDINAL:
        return "disc"
    return None


def instances_from_spider(instance_map, spacing) -> Instances:
    """An instance map in SPIDER's scheme (a manual SPIDER mask, or :attr:`Instances.canonical` written by
    ``--instances``), canonical frame: names from SPIDER's values (module docstring), confidence 1.
    Partially visible vertebrae (101-125) become their vertebra (1-25) flagged ``cut_by_fov``.  A vertebra 1
    below disc 201 is the sacrum (the sacrum-as-1 convention: every vertebra value then counts one more)."""
    arr, sp = _check(instance_map, spacing)
    values = [int(v) for v in np.unique(arr) if v]
    bad = [v for v in values if _spider_kind(v) is None]
    if bad:
        raise InstancesError(f"The instance map holds {bad[0]}, which is not a SPIDER value (100 canal, 1-25 and "
                             "101-125 vertebrae, 201-225 discs).")
    canon = arr.astype(np.uint16)
    partial = [v for v in values if PARTIAL_BASE < v <= PARTIAL_BASE + MAX_ORDINAL]
    for v in partial:
        canon[canon == v] = v - PARTIAL_BASE
    values = sorted({v - PARTIAL_BASE if v in partial else v for v in values})
    rows = ndimage.center_of_mass(np.ones(canon.shape, bool), canon, values) if values else []
    centre = {v: c for v, c in zip(values, rows)}
    sacrum_is_one = (1 in centre and DISC_BASE + 1 in centre and centre[1][1] > centre[DISC_BASE + 1][1])
    offset = 1 if sacrum_is_one else 0
    lut = np.arange(max(values, default=0) + 1, dtype=np.uint16)
    structures: list[Structure] = []
    for v in values:
        kind = _spider_kind(v)
        flags: tuple[str, ...] = ("cut_by_fov",) if v + PARTIAL_BASE in partial else ()
        if kind == "vertebra":
            o = 0 if v == SACRUM_VALUE else v - offset
            new = vertebra_value(o)
            level = level_name(o)
        elif kind == "disc":
            o = v - DISC_BASE
            new, level = v, disc_name(o)
        else:
            o, new, level = None, CANAL_VALUE, "canal"
        lut[v] = new or 0
        mask = canon == v
        s = _structure(mask, new, kind, level, CONFIDENCE_SPIDER, o, canon.shape)  # type: ignore[arg-type]
        structures.append(replace(s, flags=tuple(dict.fromkeys(s.flags + flags))))
    canon = lut[canon]
    order = {"vertebra": 0, "disc": 1, "canal": 2}
    structures.sort(key=lambda s: (order[s.structure], s.centroid[1]))
    classes = np.zeros(canon.shape, np.uint8)
    classes[canon == CANAL_VALUE] = 1
    classes[(canon >= 1) & (canon <= MAX_ORDINAL)] = 2
    classes[canon > DISC_BASE] = 3
    flags = ("spider:sacrum_as_1",) if sacrum_is_one else ()
    return Instances(canon, tuple(structures), sp, "spider", flags, 0, classes, LUMBAR)


def is_spider_scheme(array) -> bool:
    """True where ``array`` holds SPIDER instance values (any value above 4), not the project's classes."""
    arr = np.asarray(array)
    return bool(arr.size) and arr.dtype.kind in "iuf" and float(arr.max()) > 4


def read_any_labels(array, spacing) -> Instances:
    """Instances of a canonical label map in either scheme: SPIDER's instance values (any value over 4, e.g.
    100 or 201) or the project's classes (0-4; split vertebrae where 4 occurs)."""
    arr, sp = _check(array, spacing)
    if is_spider_scheme(arr):
        return instances_from_spider(arr, sp)
    return find_instances(arr, sp, vertebrae="split" if np.any(arr == 4) else "whole")
