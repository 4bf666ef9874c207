"""From a canonical sagittal volume to the model's grid and back (shared by training and inference).

The model works on 2-D sagittal slices at a fixed in-plane spacing (``spacing_mm`` in the checkpoint) with
intensities normalised per volume.  These functions are the single place where that mapping lives, so that
training, the pipeline and the benchmarks see exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_INTENSITY: dict[str, Any] = {"method": "percentile", "low": 0.5, "high": 99.5}


def normalize_intensity(volume: np.ndarray, spec: dict[str, Any] | None = None) -> np.ndarray:
    """Per-volume intensity normalisation to about [0, 1] (float32).

    ``{"method": "percentile", "low": 0.5, "high": 99.5}`` maps the low/high percentiles of the whole
    volume to 0 and 1 and clips to [0, 1.5] (bright CSF and fat keep some headroom); ``{"method": "none"}``
    keeps raw intensities (what the reference code feeds its network).
    """
    spec = {**DEFAULT_INTENSITY, **(spec or {})}
    if spec["method"] not in ("percentile", "none"):
        raise ValueError(f"Unknown intensity normalisation {spec['method']!r}.")
    arr = np.asarray(volume, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("The scan contains NaN or infinite values; clean it before segmenting.")
    if spec["method"] == "none":  # official reference checkpoints: raw intensities
        return arr
    lo, hi = np.percentile(arr, [spec["low"], spec["high"]])
    if hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.5).astype(np.float32)


@dataclass(frozen=True)
class SliceGrid:
    """How canonical sagittal slices of ``shape`` (rows, cols) at ``spacing`` mm map to the model grid."""

    shape: tuple[int, int]
    spacing: tuple[float, float]
    target_spacing: tuple[float, float]

    @property
    def model_shape(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            max(1, int(round(n * s / t))) for n, s, t in zip(self.shape, self.spacing, self.target_spacing)
        )

    @property
    def identity(self) -> bool:
        return self.model_shape == tuple(self.shape)

    def to_model(self, slices, mode: str = "bilinear"):
        """``(N, C, rows, cols)`` tensor on the scan grid -> ``(N, C, H, W)`` on the model grid."""
        return _resize(slices, self.model_shape, mode, self.identity)

    def to_scan(self, slices, mode: str = "bilinear"):
        """``(N, C, H, W)`` tensor on the model grid -> ``(N, C, rows, cols)`` on the scan grid."""
        return _resize(slices, tuple(self.shape), mode, self.identity)


def _resize(x, size: tuple[int, int], mode: str, identity: bool):
    import torch.nn.functional as F

    if identity or tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def context_offset(slice_mm: float, context_mm: float) -> int:
    """How many slices away a network's neighbouring input slices lie: the slice nearest ``context_mm``
    away, at least the adjacent one (1 mm slices and 2 mm context: 2; 3.3 mm slices: 1)."""
    if not slice_mm > 0 or not np.isfinite(slice_mm):
        return 1
    return max(1, int(round(context_mm / float(slice_mm))))


def context_stack(image: np.ndarray, index, channels: int, slice_mm: float, context_mm: float) -> np.ndarray:
    """The input of a 2.5-D network: for each slice in ``index`` (canonical axis 0 of ``image`` (N, H, W)),
    ``channels`` slices centred on it (odd; the centre channel is the slice itself) spaced by
    :func:`context_offset`; a neighbour past either end of the scan repeats the end slice.  Returns
    (len(index), channels, H, W); ``channels == 1`` is the slices themselves."""
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f"A network's image channels must be an odd number of slices, got {channels}.")
    idx = np.asarray(list(index), dtype=int).reshape(-1)
    half = channels // 2
    step = context_offset(slice_mm, context_mm) if half else 0
    offsets = np.arange(-half, half + 1) * step
    rows = np.clip(idx[:, None] + offsets[None, :], 0, image.shape[0] - 1)
    return np.ascontiguousarray(image[rows])
