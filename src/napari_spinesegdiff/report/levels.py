"""From labels to the levels table: instances, measurements, ensemble intervals, table rows.

:func:`levels_for_result` serves ``spinesegdiff segment --levels`` (a pipeline result with its ensemble
members); :func:`levels_for_labels` serves ``spinesegdiff measure`` (any label map: the project's schemes,
SPIDER's instance scheme, a manual segmentation), with the same code and columns and no intervals, so that
predictions and manual masks are compared like for like.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .intervals import Calibration, apply_intervals, load_calibration, member_measurements
from .measure import measure_structures
from .table import levels_rows


def levels_for_instances(inst, *, classes: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
                         members: np.ndarray | None = None,
                         calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Table rows of an :class:`~.instances.Instances`: every measurement; with ``members`` (S, slices, rows,
    cols class maps of the ensemble) and a calibration (default the shipped one), their intervals."""
    final = measure_structures(inst.canonical, inst.spacing, inst.structures, classes=classes)
    bounds = None
    if members is not None and len(members):
        rows = member_measurements(inst.canonical, inst.spacing, inst.structures, final, members, classes)
        bounds = apply_intervals(final, rows, calibration or load_calibration(), len(members))
    return levels_rows(inst.structures, final, instance_map=inst.canonical, spacing=inst.spacing,
                       uncertainty=uncertainty, intervals=bounds)


def levels_for_result(result, vertebrae: str = "whole", shift: int = 0,
                      calibration: Calibration | None = None, instances=None) -> list[dict[str, Any]]:
    """The levels table of a :class:`~..pipeline.SegmentationResult` (its ensemble members when it kept them:
    ``segment(keep_samples=True)``); ``instances``: the result's instances when the caller already split
    them (:func:`~.instances.find_instances`)."""
    from .instances import find_instances

    spacing = result.labels.orientation.canonical_spacing
    inst = instances or find_instances(result.canonical_labels, spacing, vertebrae=vertebrae, shift=shift)
    return levels_for_instances(inst, classes=result.canonical_labels, uncertainty=result.canonical_uncertainty,
                                members=result.canonical_sample_labels, calibration=calibration)


def levels_for_labels(labels, image=None) -> list[dict[str, Any]]:
    """The levels table of a labels :class:`~..io.volume.Volume` (any scheme :func:`~.instances.read_any_labels`
    knows), no intervals; ``image``: the scan the labels belong to, whose geometry then wins (a mask saved
    without its scan's header)."""
    from .instances import read_any_labels

    geometry = image if image is not None else labels
    if image is not None and image.orientation.canonical_shape != labels.orientation.canonical_shape:
        raise ValueError(f"The labels have shape {labels.shape} but the scan {image.shape}; they do not belong "
                         "to one another.")
    array = labels.canonical() if image is None else _on_scan_grid(labels, image)
    inst = read_any_labels(array, geometry.orientation.canonical_spacing)
    classes = getattr(inst, "classes", None)
    return levels_for_instances(inst, classes=classes)


def _on_scan_grid(labels, image) -> np.ndarray:
    """The labels' array in the scan's canonical frame: the labels' own canonical view when both have the same
    axes, else the file arrays taken as one grid (a mask written without the scan's header)."""
    if labels.orientation.file_axcodes == image.orientation.file_axcodes:
        return labels.canonical()
    if labels.data.shape != image.data.shape:
        raise ValueError(f"The labels have shape {labels.data.shape} but the scan {image.data.shape}; they do "
                         "not belong to one another.")
    return image.with_data(labels.data).canonical()
