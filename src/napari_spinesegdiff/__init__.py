"""spinesegdiff: diffusion segmentation of lumbar spine MRI with live denoising and uncertainty for napari.

Importing this package is cheap: torch and MONAI load only when a model is used.
"""

__version__ = "0.1.0"

#: Written label values and names (0 is background; see ``labelscheme``): 2 is the whole vertebra, or the
#: vertebral body when vertebrae are split, and 4 then holds the posterior elements.
CLASS_NAMES = {1: "spinal canal", 2: "vertebra", 3: "intervertebral disc", 4: "posterior elements"}

#: Label colours of every spine labels layer: canal yellow, vertebrae blue, discs coral, posterior elements
#: green, background clear.
CLASS_COLORS: dict[int | None, str] = {None: "transparent", 0: "transparent", 1: "yellow", 2: "#4da6ff",
                                       3: "#ff6f61", 4: "#5fd38d"}
