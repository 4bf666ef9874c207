"""spinesegdiff: diffusion segmentation of lumbar spine MRI with live denoising and uncertainty for napari.

Importing this package is cheap: torch and MONAI load only when a model is used.
"""

__version__ = "0.1.0"

#: Product label values and names (0 is background).
CLASS_NAMES = {1: "spinal canal", 2: "vertebrae", 3: "intervertebral disc"}

#: Label colours of every spine labels layer: canal yellow, vertebrae blue, discs coral, background clear.
CLASS_COLORS: dict[int | None, str] = {None: "transparent", 0: "transparent", 1: "yellow", 2: "#4da6ff",
                                       3: "#ff6f61"}
