"""The SpineSegDiff loss (Dice + BCE + MSE on sigmoid outputs, 1:1:1), masked per channel and pixel.

Pixels where ``known == 0`` (an unlabelled class, or rows outside the labelled level range) contribute
nothing to any term, so their gradient is exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor,
                     smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice per channel over the batch ("batch Dice"), averaged over channels with known pixels."""
    p = torch.sigmoid(logits) * known
    t = target * known
    dims = (0, 2, 3)
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    has = known.sum(dims) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    dice = (2 * inter + smooth) / (denom + smooth)
    return (1 - dice)[has].mean()


def _masked_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    return (values * known).sum() / known.sum().clamp_min(1.0)


def segdiff_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None,
                 weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """``{"loss", "dice", "bce", "mse"}``; ``weights`` = (dice, bce, mse). Baselines use mse weight 0."""
    if known is None:
        known = torch.ones_like(target)
    dice = masked_dice_loss(logits, target, known)
    bce = _masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), known)
    mse = _masked_mean((torch.sigmoid(logits) - target) ** 2, known)
    loss = weights[0] * dice + weights[1] * bce + weights[2] * mse
    return {"loss": loss, "dice": dice.detach(), "bce": bce.detach(), "mse": mse.detach()}
