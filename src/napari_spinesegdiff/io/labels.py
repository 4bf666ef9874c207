"""Label value maps: SPIDER masks -> product classes (1 canal, 2 vertebrae, 3 disc), integer dtypes."""

from __future__ import annotations

from typing import Literal

import numpy as np

#: Product classes (0 is background).
CANAL, VERTEBRA, DISC = 1, 2, 3

#: SPIDER value ranges: vertebrae 1-25, spinal canal 100, discs 201-225.
SPIDER_VERTEBRAE = range(1, 26)
SPIDER_CANAL = 100
SPIDER_DISCS = range(201, 226)

LabelScheme = Literal["auto", "spider", "keep"]


def smallest_label_dtype(arr: np.ndarray) -> np.dtype:
    """uint8 / uint16 when the values fit, else int32 (int64 beyond that)."""
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    if lo >= -(2**31) and hi < 2**31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def is_integral(arr: np.ndarray) -> bool:
    """True for integer arrays and for float arrays whose values are all finite whole numbers."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iub":
        return True
    if arr.dtype.kind != "f":
        return False
    return bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))


def as_label_array(arr: np.ndarray) -> np.ndarray:
    """Integral values as the smallest fitting integer array (uint8, uint16 or int32)."""
    arr = np.asarray(arr)
    if not is_integral(arr):
        raise ValueError("A label array must hold whole numbers only.")
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    return arr.astype(smallest_label_dtype(arr), copy=False)


def _spider_values() -> np.ndarray:
    return np.array([0, *SPIDER_VERTEBRAE, SPIDER_CANAL, *SPIDER_DISCS])


def is_spider_mask(arr: np.ndarray) -> bool:
    """Heuristic: values within {0, 1..25, 100, 201..225} and the canal (100) or a disc (>200) present.

    Masks with only small values (1..25) are ordinary instance masks, not SPIDER, because nothing in
    them tells vertebrae from other structures.
    """
    arr = np.asarray(arr)
    if not is_integral(arr) or arr.size == 0:
        return False
    values = np.unique(arr)
    if not np.isin(values, _spider_values()).all():
        return False
    return bool(np.any(values == SPIDER_CANAL) or np.any(values > 200))


def spider_to_classes(arr: np.ndarray) -> np.ndarray:
    """SPIDER values -> product classes as uint8: 1-25 -> 2, 100 -> 1, 201-225 -> 3, anything else 0."""
    arr = np.asarray(arr)
    out = np.zeros(arr.shape, dtype=np.uint8)
    out[(arr >= 1) & (arr <= 25)] = VERTEBRA
    out[arr == SPIDER_CANAL] = CANAL
    out[(arr >= 201) & (arr <= 225)] = DISC
    return out


def to_classes(arr: np.ndarray, scheme: LabelScheme = "auto") -> np.ndarray:
    """Map a mask to the values the product shows.

    ``"spider"`` always applies the SPIDER map; ``"auto"`` applies it when :func:`is_spider_mask` says
    so; otherwise (and for ``"keep"``) the integer values are kept, in the smallest fitting dtype.
    """
    if scheme not in ("auto", "spider", "keep"):
        raise ValueError(f"Unknown label scheme {scheme!r}; use 'auto', 'spider' or 'keep'.")
    if scheme == "spider" or (scheme == "auto" and is_spider_mask(arr)):
        return spider_to_classes(arr)
    return as_label_array(arr)
