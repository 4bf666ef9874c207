"""spinesegdiff: diffusion segmentation of lumbar spine MRI with live denoising and uncertainty for napari.

Importing this package is cheap: torch and MONAI load only when a model is used.
"""

__version__ = "0.1.0"

#: Product label values and names (0 is background).
CLASS_NAMES = {1: "spinal canal", 2: "vertebrae", 3: "intervertebral disc"}
