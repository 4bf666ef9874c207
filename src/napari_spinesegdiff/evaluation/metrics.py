"""Segmentation and uncertainty metrics on numpy arrays (product labels 0..C)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Dice of two boolean arrays (inside ``mask`` if given); 1.0 when both are empty."""
    if mask is not None:
        pred, truth = pred & mask, truth & mask
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                   mask: np.ndarray | None = None) -> list[float]:
    """3-D Dice for classes 1..num_classes."""
    return [dice(pred == c, truth == c, mask) for c in range(1, num_classes + 1)]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm (MONAI); nan when either mask is empty."""
    if not pred.any() or not truth.any():
        return float("nan")
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance

    p = torch.as_tensor(pred[None, None].astype(np.float32))
    t = torch.as_tensor(truth[None, None].astype(np.float32))
    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument its own code passes
        warnings.simplefilter("ignore", FutureWarning)
        return float(compute_hausdorff_distance(p, t, percentile=95, spacing=list(spacing))[0, 0])


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (rank formula, ties averaged)."""
    scores = np.asarray(scores, np.float64).ravel()
    positives = np.asarray(positives, bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability(probabilities: np.ndarray, truth: np.ndarray,
                bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability curve: per probability bin, the mean predicted probability, the observed frequency and
    the count."""
    p = np.asarray(probabilities, np.float64).ravel()
    y = np.asarray(truth, bool).ravel()
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean_p = np.bincount(idx, weights=p, minlength=bins) / np.maximum(count, 1)
    freq = np.bincount(idx, weights=y, minlength=bins) / np.maximum(count, 1)
    return mean_p, freq, count


def band_mask(pred: np.ndarray, truth: np.ndarray, width: int = 5) -> np.ndarray:
    """Voxels within ``width`` voxels (in-plane, per sagittal slice along axis 0; chessboard distance) of
    ``pred`` or ``truth``: where a reviewer looks at a structure, without the far background."""
    from scipy import ndimage

    fg = np.asarray(pred, bool) | np.asarray(truth, bool)
    if width <= 0 or not fg.any():
        return fg
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connected in the slice, nothing across slices
    return ndimage.binary_dilation(fg, structure=structure, iterations=int(width))
