"""Where the viewer is and moving it: the canonical slice of an image under the viewer's position, going to a
canonical (slice, row, column) of an image, and showing a slice that a run segments."""

from __future__ import annotations

import numpy as np

from ..config import parse_slices


def current_slice(viewer, image) -> int:
    """The canonical slice index of ``image`` under the viewer's current position."""
    off = viewer.dims.ndim - 3
    k = int(round(float(image.world_to_data(tuple(viewer.dims.point[off:]))[0])))
    return int(np.clip(k, 0, image.data.shape[0] - 1))


def go_to(viewer, image, position, center: bool = True) -> None:
    """Move the viewer to canonical ``position`` (slice, row, column) of ``image``; centre it in view."""
    world = [float(v) for v in image.data_to_world(tuple(float(p) for p in position))]
    off = viewer.dims.ndim - 3
    viewer.dims.set_point(off, world[0])
    if center:
        full = list(viewer.dims.point)
        full[off:off + 3] = world
        viewer.scene.camera.center = tuple(full[d] for d in viewer.dims.displayed)


def jump_into_run(viewer, image, slices: str) -> None:
    """Show a slice that is being segmented (``slices``: the pipeline's spec) if the current one is not."""
    chosen = parse_slices(slices, image.data.shape[0])
    if current_slice(viewer, image) not in chosen:
        go_to(viewer, image, (chosen[0], (image.data.shape[1] - 1) / 2, (image.data.shape[2] - 1) / 2),
              center=False)
