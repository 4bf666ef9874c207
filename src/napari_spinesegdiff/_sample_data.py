"""napari sample data: synthetic lumbar spines (see :mod:`napari_spinesegdiff.phantom`) with their truth.

Plain layer-data tuples; no napari import.  Layers hold canonical sagittal arrays placed in millimetres
like the reader's layers (``scale``/``translate`` from :func:`napari_geometry`, exact affines in metadata).
"""

from __future__ import annotations

from typing import Any

from . import CLASS_COLORS
from .io import napari_geometry
from .phantom import Phantom, make_phantom

#: Label colours of the truth/prediction layers (one table for the whole package).
LABEL_COLORS = CLASS_COLORS

LayerData = tuple[Any, dict[str, Any], str]


def phantom_layers(phantom: Phantom, name: str) -> list[LayerData]:
    """The image and truth layers of a phantom, placed in mm."""
    orient = phantom.image.orientation
    scale, translate = napari_geometry(orient)
    geometry = {"scale": scale, "translate": translate}
    meta = {
        "affine": phantom.image.affine.copy(),
        "canonical_affine": orient.canonical_affine.copy(),
        "source": None,
        "contrast": phantom.contrast,
        "levels": phantom.levels,
    }
    image = (
        phantom.image.canonical(),
        {"name": name, "colormap": "gray", "metadata": meta, **geometry},
        "image",
    )
    labels = (
        phantom.truth("whole").canonical(),  # SPIDER's scheme: 2 = the whole vertebra
        {
            "name": "phantom truth",
            "colormap": dict(LABEL_COLORS),
            "opacity": 0.5,
            "metadata": {**meta, "source_image": name},
            **geometry,
        },
        "labels",
    )
    return [image, labels]


def phantom_t2w() -> list[LayerData]:
    """Synthetic T2-weighted lumbar spine with its ground truth."""
    return phantom_layers(make_phantom(0, contrast="T2w"), "phantom T2w")


def phantom_t1w() -> list[LayerData]:
    """Synthetic T1-weighted lumbar spine with its ground truth."""
    return phantom_layers(make_phantom(0, contrast="T1w"), "phantom T1w")


def phantom_degenerated() -> list[LayerData]:
    """Synthetic T2-weighted lumbar spine with degenerated L4/L5 and L5/S1 discs."""
    return phantom_layers(
        make_phantom(1, contrast="T2w", degenerated=("L4/L5", "L5/S1")), "phantom T2w degenerated"
    )
