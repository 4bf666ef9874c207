"""Volumes, uncertainty, level counts and QA flags of one segmented scan (:func:`measure`), the results
table's per-scan numbers.

Flags (columns ``qa_flags`` and ``qa_pass``):

* ``missing:<structure>``: no voxel of a structure on the segmented slices;
* ``volume:<structure>``: total volume outside :data:`PLAUSIBLE_ML` (checked only when every slice was
  segmented, since a partial run measures partial volumes);
* ``canal_pieces:<n>``: the spinal canal is more than one 3-D component of at least
  :data:`CANAL_PIECE_SHARE` of the largest (with the default
  ``single_canal`` the pipeline keeps the largest piece, so a break shows as ``canal_short`` instead);
* ``canal_short``: the canal covers less than :data:`CANAL_MIN_COVER` of the superior-inferior span of
  the discs;
* ``levels:discs=<n>`` / ``levels:vertebrae=<n>`` / ``levels:mismatch``: the number of discs or vertebral
  bodies (face-connected 3-D components at least :data:`LEVEL_MIN_SHARE` of the largest of their class; with whole
  vertebrae, the part of label 2 anterior to the canal) is outside :data:`EXPECTED_DISCS` /
  :data:`EXPECTED_VERTEBRAE`, or they differ by more than :data:`MAX_LEVEL_MISMATCH`.

``uncertainty_score``: the mean of the uncertainty map (0 to 1/e) over a band of voxels within
:data:`BAND_MM` mm in-plane of any label boundary (between structures or with the background) on the
segmented slices: where the model's doubt matters for the result, independent of the field of view.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

#: Written label value -> column prefix (label 2 is the whole vertebra, or the body with ``vertebrae=split``).
STRUCTURES = {1: "canal", 2: "vertebra", 3: "disc", 4: "posterior"}
#: Plausible total volume (mL) of each structure in a lumbar sagittal scan; wide on purpose, to catch gross
#: failures only (phantoms: canal 53-57, whole vertebrae 300, bodies 205, posterior elements 92, discs 81-98;
#: real lumbar masks: 5 bodies 180-230, 7 bodies 210-265, 5 discs 30; SPIDER mid-line slabs 13-25 slices:
#: canal 22-50, whole vertebrae 68-143, discs 19-47).
PLAUSIBLE_ML = {"canal": (5.0, 200.0), "vertebra": (30.0, 1200.0), "disc": (5.0, 300.0),
                "posterior": (5.0, 800.0)}
#: Expected number of discs and of vertebral bodies in a lumbar field of view (at least L1/L2-L5/S1 is
#: in view and rarely more than from T10; phantoms: 6 discs, 7 bodies; 26 SPIDER slabs: 6-9 and 6-9).
EXPECTED_DISCS = (4, 10)
EXPECTED_VERTEBRAE = (4, 11)
MAX_LEVEL_MISMATCH = 2
#: A 3-D component counts as a level when its volume is at least this share of the largest one of its class.
LEVEL_MIN_SHARE = 0.2
#: The canal must cover at least this share of the rows between the highest and the lowest disc (the
#: thecal sac may end above the lowest disc in view: SPIDER truth 0.63-1.0).
CANAL_MIN_COVER = 0.6
#: Pieces of the canal count when they are at least this share of the largest (specks do not).
CANAL_PIECE_SHARE = 0.05
#: Half-width (mm, in-plane) of the band around label boundaries for ``uncertainty_score``.
BAND_MM = 2.0


def _count(mask: np.ndarray, share: float, full: bool) -> int:
    """3-D components (face- or fully-connected) at least ``share`` of the largest one."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool) if full else None)
    if n == 0:
        return 0
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes >= share * sizes.max()).sum())


def _levels(mask: np.ndarray) -> int:
    """Face-connected 3-D components at least :data:`LEVEL_MIN_SHARE` of the largest one (neighbouring
    discs or bodies may touch at a corner, not across a face)."""
    return _count(mask, LEVEL_MIN_SHARE, full=False)


def _anterior_of_canal(labels: np.ndarray) -> np.ndarray | None:
    """Per row (superior-inferior) and column (anterior-posterior): in front of the canal's anterior edge
    (its union over slices), interpolated over rows without canal; None without a canal."""
    canal = (labels == 1).any(axis=0)
    rows = np.nonzero(canal.any(axis=1))[0]
    if rows.size == 0:
        return None
    front = np.array([np.argmax(canal[r]) for r in rows], float)  # canonical columns run anterior -> posterior
    edge = np.interp(np.arange(labels.shape[1]), rows, front)
    return np.arange(labels.shape[2])[None, :] < edge[:, None]


def _boundary_band(labels: np.ndarray, spacing_rc: tuple[float, float], band_mm: float) -> np.ndarray:
    """Voxels within ``band_mm`` in-plane of a label boundary, slice by slice."""
    from scipy import ndimage

    out = np.zeros(labels.shape, bool)
    for k in range(labels.shape[0]):
        s = labels[k]
        edge = np.zeros(s.shape, bool)
        d0 = s[1:, :] != s[:-1, :]
        d1 = s[:, 1:] != s[:, :-1]
        edge[1:, :] |= d0
        edge[:-1, :] |= d0
        edge[:, 1:] |= d1
        edge[:, :-1] |= d1
        if edge.any():
            out[k] = ndimage.distance_transform_edt(~edge, sampling=spacing_rc) <= band_mm
    return out


def measure(labels: np.ndarray, uncertainty: np.ndarray, spacing: tuple[float, float, float],
            slices: Iterable[int], vertebrae: str = "whole") -> dict[str, Any]:
    """Volumes, uncertainty, level counts and QA flags of canonical labels (see the module docstring).

    ``labels`` and ``uncertainty`` are canonical (LR, SI, AP) arrays of the whole scan, ``spacing`` their
    voxel size in mm and ``slices`` the segmented canonical slices.
    """
    idx = sorted(set(int(s) for s in slices))
    n = labels.shape[0]
    lab = np.asarray(labels)[idx]
    unc = np.asarray(uncertainty, dtype=np.float32)[idx]
    ml_per_voxel = float(np.prod(spacing)) / 1000.0
    full = len(idx) == n
    row: dict[str, Any] = {}
    flags: list[str] = []
    present = [1, 2, 3] + ([4] if vertebrae == "split" else [])
    for value, name in STRUCTURES.items():
        if value not in present:
            row.update({f"{name}_ml": None, f"{name}_unc_mean": None, f"{name}_unc_max": None})
            continue
        m = lab == value
        count = int(m.sum())
        ml = count * ml_per_voxel
        row[f"{name}_ml"] = round(ml, 3)
        row[f"{name}_unc_mean"] = round(float(unc[m].mean()), 5) if count else None
        row[f"{name}_unc_max"] = round(float(unc[m].max()), 5) if count else None
        if count == 0:
            flags.append(f"missing:{name}")
        elif full:
            lo, hi = PLAUSIBLE_ML[name]
            if not lo <= ml <= hi:
                flags.append(f"volume:{name}")
    row["canal_pieces"] = _count(lab == 1, CANAL_PIECE_SHARE, full=True)
    if row["canal_pieces"] > 1:
        flags.append(f"canal_pieces:{row['canal_pieces']}")
    discs = lab == 3
    row["disc_levels"] = _levels(discs)
    if vertebrae == "split":
        bodies = lab == 2
    else:
        front = _anterior_of_canal(lab)
        bodies = (lab == 2) & front[None] if front is not None else lab == 2
    row["vertebra_levels"] = _levels(bodies)
    if discs.any():
        disc_rows = np.nonzero(discs.any(axis=(0, 2)))[0]
        span = np.zeros(lab.shape[1], bool)
        span[disc_rows.min():disc_rows.max() + 1] = True
        canal_rows = (lab == 1).any(axis=(0, 2))
        if (lab == 1).any() and (canal_rows & span).sum() < CANAL_MIN_COVER * span.sum():
            flags.append("canal_short")
        lo, hi = EXPECTED_DISCS
        if not lo <= row["disc_levels"] <= hi:
            flags.append(f"levels:discs={row['disc_levels']}")
    if bodies.any():
        lo, hi = EXPECTED_VERTEBRAE
        if not lo <= row["vertebra_levels"] <= hi:
            flags.append(f"levels:vertebrae={row['vertebra_levels']}")
    if discs.any() and bodies.any() and abs(row["vertebra_levels"] - row["disc_levels"]) > MAX_LEVEL_MISMATCH:
        flags.append("levels:mismatch")
    band = _boundary_band(lab, (spacing[1], spacing[2]), BAND_MM)
    row["uncertainty_score"] = round(float(unc[band].mean()), 5) if band.any() else None
    row["qa_flags"] = ";".join(flags)
    row["qa_pass"] = not flags
    return row
