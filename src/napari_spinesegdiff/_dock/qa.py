"""Uncertainty QA and live-stream helpers of the dock: plain numpy, no Qt, no torch.

* :func:`structure_table` -- one row per connected component of the labels (class, level from superior to
  inferior, volume in mL, mean/max uncertainty, centre), most uncertain first.
* :func:`slice_table` -- one row per segmented sagittal slice, most uncertain first.
* :func:`uncertain_mask` -- the "uncertain boundary" overlay (uncertainty above a threshold).
* :func:`probability_rgb`, :func:`classes_from_probabilities`, :func:`frame_slot` -- the live denoising view.

All arrays are canonical sagittal arrays (slices, rows superior->inferior, columns anterior->posterior).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Largest value of ``-p log p`` (at ``p = 1/e``): the top of the uncertainty colour scale.
MAX_UNCERTAINTY = float(1.0 / math.e)

#: RGB colours of the written labels (the same as the labels layers, ``CLASS_COLORS``): canal, vertebra (or
#: vertebral body), disc, posterior elements.
CLASS_RGB: dict[int, tuple[int, int, int]] = {1: (255, 255, 0), 2: (77, 166, 255), 3: (255, 111, 97),
                                              4: (95, 211, 141)}

#: Cap on the rows shown in the structure table (noise components of a poor model must not flood it).
MAX_STRUCTURE_ROWS = 300


@dataclass(frozen=True)
class Structure:
    """One connected component of one class."""

    label: int  # written label value (1 canal, 2 vertebra or vertebral body, 3 disc, 4 posterior elements)
    class_name: str
    level: int  # 1 = most superior component of its class
    voxels: int
    volume_ml: float
    mean_uncertainty: float
    max_uncertainty: float
    centroid: tuple[float, float, float]  # canonical voxel coordinates (slice, row, column)
    slices: tuple[int, int]  # first and last canonical slice holding the component

    @property
    def slice_index(self) -> int:
        """The slice to show for this structure: its centroid's, inside its own slice range."""
        return int(np.clip(round(self.centroid[0]), self.slices[0], self.slices[1]))


@dataclass(frozen=True)
class SliceStat:
    """Uncertainty of one segmented sagittal slice."""

    index: int  # canonical slice index
    mean_uncertainty: float  # over the labelled voxels of the slice (0 when none)
    max_uncertainty: float  # over the whole slice
    labelled_voxels: int
    centroid: tuple[float, float]  # (row, column) of the labelled voxels, the slice centre when none


def voxel_volume_ml(scale: Sequence[float]) -> float:
    """Volume of one voxel in millilitres from a layer scale in millimetres (last three axes)."""
    return float(abs(np.prod([float(s) for s in list(scale)[-3:]]))) / 1000.0


def structure_table(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    scale: Sequence[float],
    class_names: Mapping[int, str] | Sequence[str],
    slices: Iterable[int] | None = None,
) -> list[Structure]:
    """Connected components (26-connected, in 3-D) of each class, sorted by mean uncertainty (highest first).

    ``class_names`` maps a class value to its name (a sequence is read as classes 1, 2, ...).  With
    ``slices`` only those canonical slices are looked at (the ones a run segmented).
    """
    labels = np.asarray(labels)
    uncertainty = np.asarray(uncertainty, dtype=np.float32)
    if labels.shape != uncertainty.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and uncertainty {uncertainty.shape} must be one 3-D grid.")
    names = _names(class_names)
    keep = _slice_mask(labels.shape[0], slices)
    vml = voxel_volume_ml(scale)
    rows: list[Structure] = []
    for value in (int(v) for v in np.unique(labels[keep]) if v != 0):
        rows.extend(_class_components(labels, uncertainty, keep, value, names.get(value, f"class {value}"), vml))
    rows.sort(key=lambda s: (-s.mean_uncertainty, -s.max_uncertainty, s.label, s.level))
    return rows[:MAX_STRUCTURE_ROWS]


def _names(class_names: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    if isinstance(class_names, Mapping):
        return {int(k): str(v) for k, v in class_names.items()}
    return {i + 1: str(n) for i, n in enumerate(class_names)}


def _slice_mask(n: int, slices: Iterable[int] | None) -> np.ndarray:
    keep = np.zeros(n, dtype=bool)
    if slices is None:
        keep[:] = True
    else:
        idx = [int(s) for s in slices if 0 <= int(s) < n]
        keep[idx] = True
    return keep


def _class_components(labels: np.ndarray, unc: np.ndarray, keep: np.ndarray, value: int, name: str,
                      vml: float) -> list[Structure]:
    from scipy import ndimage

    mask = labels == value
    mask[~keep] = False
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    # over the labelled voxels only (a small share of the grid; np.maximum.at over all of it took 0.4 s a class)
    where = np.flatnonzero(comp)
    flat = comp.ravel()[where]
    counts = np.bincount(flat, minlength=n + 1)[1:]
    u = unc.ravel()[where]
    mean_u = np.bincount(flat, weights=u, minlength=n + 1)[1:] / np.maximum(counts, 1)
    max_u = np.asarray(ndimage.maximum(u, flat, np.arange(1, n + 1)), dtype=np.float64)
    cen = [np.bincount(flat, weights=g, minlength=n + 1)[1:] / counts for g in np.unravel_index(where, labels.shape)]
    ranges = ndimage.find_objects(comp)
    order = np.argsort(cen[1], kind="stable")  # superior (small row) first
    level = np.empty(n, dtype=int)
    level[order] = np.arange(1, n + 1)
    return [
        Structure(value, name, int(level[i]), int(counts[i]), float(counts[i] * vml), float(mean_u[i]),
                  float(max_u[i]), (float(cen[0][i]), float(cen[1][i]), float(cen[2][i])),
                  (int(ranges[i][0].start), int(ranges[i][0].stop - 1)))
        for i in range(n)
    ]


def slice_table(labels: np.ndarray, uncertainty: np.ndarray, slices: Iterable[int] | None = None) -> list[SliceStat]:
    """Per canonical slice (all, or ``slices``): mean uncertainty over its labelled voxels and the maximum,
    sorted by mean uncertainty (highest first)."""
    labels = np.asarray(labels)
    uncertainty = np.asarray(uncertainty, dtype=np.float32)
    if labels.shape != uncertainty.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and uncertainty {uncertainty.shape} must be one 3-D grid.")
    keep = np.flatnonzero(_slice_mask(labels.shape[0], slices))
    out = []
    for k in keep:
        fg = labels[k] > 0
        n = int(fg.sum())
        u = uncertainty[k]
        if n:
            rr, cc = np.nonzero(fg)
            centre = (float(rr.mean()), float(cc.mean()))
        else:
            centre = ((u.shape[0] - 1) / 2.0, (u.shape[1] - 1) / 2.0)
        out.append(SliceStat(int(k), float(u[fg].mean()) if n else 0.0, float(u.max()) if u.size else 0.0,
                             n, centre))
    out.sort(key=lambda s: (-s.mean_uncertainty, -s.max_uncertainty, s.index))
    return out


def uncertain_mask(uncertainty: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 mask (1 where the uncertainty is above ``threshold``) for the "uncertain boundary" overlay."""
    return (np.asarray(uncertainty) > float(threshold)).astype(np.uint8)


# ------------------------------------------------------------------------------------------ live stream


def classes_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(n, C, rows, cols) probabilities -> (n, rows, cols) uint8 classes with the pipeline's rule: the most
    probable class among those above 0.5, else background (the first channel wins a tie).  The running
    maximum over the channels, not an ``argmax`` over a masked copy: about a third of the time, per streamed
    step of the live view."""
    p = np.asarray(probabilities)
    best_value = np.array(p[:, 0], dtype=np.float32, copy=True)
    best = np.zeros(best_value.shape, np.uint8)
    for k in range(1, p.shape[1]):
        channel = p[:, k]
        np.copyto(best, np.uint8(k), where=channel > best_value)
        np.maximum(best_value, channel, out=best_value)
    best += 1
    np.copyto(best, np.uint8(0), where=~(best_value > 0.5))
    return best


def probability_rgb(probabilities: np.ndarray, colors: Mapping[int, tuple[int, int, int]] = CLASS_RGB) -> np.ndarray:
    """(n, C, rows, cols) probabilities -> (n, rows, cols, 3) uint8: each class's colour weighted by its
    probability (summed and clipped), for an additive overlay on the scan."""
    p = np.asarray(probabilities, dtype=np.float32)
    c = p.shape[1]
    palette = np.array([colors.get(k + 1, (255, 255, 255)) for k in range(c)], dtype=np.float32)  # (C, 3)
    # a multiply-add per class into one contiguous colour plane at a time, not a BLAS call: OpenBLAS's threads
    # spin after each call and took the cores from the inference engine's threads (the streamed run was 1.5x
    # the unstreamed one)
    rgb = np.empty((p.shape[0], *p.shape[2:], 3), dtype=np.uint8)
    plane = np.empty((p.shape[0], *p.shape[2:]), dtype=np.float32)
    for j in range(3):
        plane.fill(0.0)
        for k in range(c):
            if palette[k, j]:
                plane += palette[k, j] * p[:, k]
        np.clip(plane, 0, 255, out=plane)
        rgb[..., j] = plane
    return rgb


def streamed_steps(total_steps: int, stream_every: int) -> list[int]:
    """The 1-based steps of one batch that the pipeline streams (every ``stream_every`` and the last)."""
    if stream_every <= 0 or total_steps <= 0:
        return []
    return sorted({s for s in range(stream_every, total_steps + 1, stream_every)} | {total_steps})


def frame_slot(i: int, n_streamed: int, n_frames: int) -> int:
    """Where the ``i``-th (0-based) streamed step of a batch goes in a trajectory of ``n_frames`` frames;
    when fewer frames than streamed steps fit the memory budget, steps are spread evenly and the last
    streamed step always lands in the last frame."""
    if n_frames <= 0:
        raise ValueError("a trajectory needs at least one frame.")
    if n_streamed <= n_frames:
        return min(i, n_frames - 1)
    return ((i + 1) * n_frames - 1) // n_streamed


def trajectory_frames(n_streamed: int, volume_shape: Sequence[int], budget_bytes: int) -> int:
    """How many uint8 frames of ``volume_shape`` fit in ``budget_bytes`` (at least one, at most ``n_streamed``)."""
    per = int(np.prod([int(s) for s in volume_shape]))
    return max(1, min(int(n_streamed), int(budget_bytes) // max(per, 1)))
