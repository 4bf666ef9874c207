"""The manifest's widget entry point (``napari.yaml``: ``napari_spinesegdiff._widget:SpineSegDiffWidget``).

The dock itself is the :mod:`napari_spinesegdiff._dock` package (one module per job).
"""

from ._dock import SpineSegDiffWidget

__all__ = ["SpineSegDiffWidget"]
