"""Random training batches of sagittal crops with MONAI augmentation and per-pixel label availability."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..preprocess import context_stack
from .data import NUM_CLASSES, TrainCase
from .randomize import ContrastRandomizer


def build_augment(crop: tuple[int, int], seed: int, soft_targets: bool = False):
    """MONAI dictionary transforms: affine jitter (rotation, scale, shear), elastic-free; intensity,
    contrast (gamma), bias, noise and blur.  No flips: in a sagittal slice anterior/posterior and
    superior/inferior are anatomical directions, and a left-right flip does not change a 2-D slice (for a
    2.5-D input it only reverses the neighbours: ``SliceBatches(mirror=True)``).
    Targets are warped by nearest neighbour, or bilinearly when they are partial-volume (``soft_targets``)."""
    from monai import transforms as mt

    keys = ["image", "target", "known"]
    aug = mt.Compose(
        [
            mt.RandAffined(
                keys=keys, prob=0.8, rotate_range=0.2, scale_range=(0.15, 0.15), shear_range=(0.05, 0.05),
                translate_range=(8, 8), spatial_size=crop,
                mode=("bilinear", "bilinear" if soft_targets else "nearest", "nearest"),
                padding_mode="zeros",
            ),
            mt.RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
            mt.RandAdjustContrastd(keys="image", gamma=(0.6, 1.6), prob=0.5),
            mt.RandBiasFieldd(keys="image", coeff_range=(0.0, 0.25), prob=0.3),
            mt.RandGaussianSmoothd(keys="image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), prob=0.2),
            mt.RandGaussianNoised(keys="image", std=0.04, prob=0.4),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


class SliceBatches:
    """Draws crops from cases: a case (weighted), a slice (labelled slices preferred), a crop centre (on
    labelled structure 70 % of the time), then augmentation.

    ``randomize``: the share of crops given a random contrast (:class:`~.randomize.ContrastRandomizer`).

    Each batch is ``image (B,channels,H,W)`` float32 (a 2.5-D input: the slice in the centre channel, its
    neighbours around it, :func:`~..preprocess.context_stack`), ``target (B,C,H,W)`` float32 and ``known (B,C,H,W)``
    float32 (1 where the loss may look).
    """

    def __init__(self, cases: Sequence[TrainCase], crop=(160, 160), batch_size=8, seed=0,
                 case_weights: Sequence[float] | None = None, augment: bool = True, channels: int = 1,
                 context_mm: float = 2.0, mirror: bool = False, randomize: float = 0.0):
        if not cases:
            raise ValueError("No training cases: check the data paths and the split.")
        self.cases = list(cases)
        self.crop = tuple(int(c) for c in crop)
        self.batch_size = batch_size
        self.channels, self.context_mm = int(channels), float(context_mm)  # 2.5-D: a slice and its neighbours
        self.mirror = bool(mirror)  # half the 2.5-D crops with the neighbours reversed (the patient mirrored)
        self.rng = np.random.default_rng(seed)
        w = np.ones(len(cases)) if case_weights is None else np.asarray(case_weights, float)
        self.case_p = w / w.sum()
        soft = any(np.asarray(c.target).dtype.kind == "f" for c in self.cases)
        self.augment = build_augment(self.crop, seed, soft) if augment else None
        # new contrasts in a share ``randomize`` of the crops (training.randomize), from a stream of their own:
        # the cases, slices, crops and MONAI augmentation stay those of the same seed without it
        self.randomizer = ContrastRandomizer(randomize) if randomize > 0 else None
        self.contrast_rng = np.random.default_rng((int(seed), 35)) if randomize > 0 else None

    def _crop(self, case: TrainCase):
        k = int(self.rng.choice(len(case.image), p=case.slice_weights))
        img = context_stack(case.image, [k], self.channels, case.slice_mm, self.context_mm)[0]  # (channels, H, W)
        if self.randomizer is not None:
            labels = context_stack(case.target, [k], self.channels, case.slice_mm, self.context_mm)[0]
            img = self.randomizer(img, labels, case.known, self.contrast_rng)
        if self.mirror and self.channels > 1 and self.rng.random() < 0.5:
            img = np.ascontiguousarray(img[::-1])  # left and right neighbours swapped; the slice stays centred
        tgt = case.target[k]
        known = case.known_mask(k)
        # not ``if self.augment``: len() of a MONAI Compose builds a flattened copy, whose constructor
        # re-seeds the shared transforms from OS entropy (seeded runs would differ)
        ch, cw = (int(round(c * 1.25)) for c in self.crop) if self.augment is not None else self.crop
        H, W = img.shape[-2:]
        fg = np.argwhere(tgt[case.known].any(axis=0)) if case.known.any() else np.zeros((0, 2))
        if len(fg) and self.rng.random() < 0.7:
            cy, cx = fg[self.rng.integers(len(fg))]
        else:
            cy, cx = self.rng.integers(H), self.rng.integers(W)
        y0, x0 = int(cy) - ch // 2, int(cx) - cw // 2
        out = [np.zeros((c, ch, cw), a.dtype)
               for c, a in ((self.channels, img), (NUM_CLASSES, tgt), (NUM_CLASSES, known))]
        ys, xs = slice(max(y0, 0), min(y0 + ch, H)), slice(max(x0, 0), min(x0 + cw, W))
        dy, dx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        out[0][:, dy, dx] = img[:, ys, xs]
        out[1][:, dy, dx] = tgt[:, ys, xs]
        out[2][:, dy, dx] = known[:, ys, xs]  # padding outside the slice is unknown
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(self.batch_size):
            case = self.cases[int(self.rng.choice(len(self.cases), p=self.case_p))]
            img, tgt, known = self._crop(case)
            d = {"image": img.astype(np.float32), "target": tgt.astype(np.float32),
                 "known": known.astype(np.float32)}
            if self.augment is not None:
                d = self.augment(d)
            items.append({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in d.items()})
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
