"""Intensity domain randomisation: training images in contrasts no scanner gave, so that the networks learn
the shape of the spine, not one contrast (issue 35: v4.11 scores 0.44 Dice on inverted T2 slabs).

A :class:`ContrastRandomizer` acts on one crop's whole slice stack (``(channels, H, W)``: the slice and, for a
2.5-D input, its neighbours) before it is cropped and before the MONAI augmentation of
:func:`~.batches.build_augment`; with probability ``p`` it replaces the image by one of

* a random contrast curve (:class:`RandContrastCurve`): an inversion, or a non-monotone piecewise-linear
  look-up table over the intensity range;
* a SynthSeg-style resampling (:class:`RandStructureIntensity`): every labelled structure (canal, disc,
  vertebral body, posterior elements or whole vertebra, as far as the case labels them) and every intensity
  cluster of the rest gets a random mean, its texture kept by a random scaling about its own mean;

then corrupts it (:class:`RandBiasField`, :class:`RandBlur`, :class:`RandSliceThickness`,
:class:`RandRicianNoise`) and normalises it again as a scan is normalised for the networks
(:func:`~..preprocess.normalize_intensity`: 0.5 / 99.5 percentiles to 0 / 1, clipped to [0, 1.5]).  The
label maps are read, never changed.  Every random number comes from the generator passed in, so a seeded
:class:`~.batches.SliceBatches` draws the same batches every time; with ``p = 0`` nothing is drawn at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..preprocess import normalize_intensity
from .data import BODY_CH, CANAL_CH, DISC_CH, WHOLE_CH


def structure_maps(target: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Soft membership maps ``(S, channels, H, W)`` float32 of the labelled structures of a target stack
    ``(channels, C, H, W)`` (uint8 or partial-volume float): canal and disc; body and posterior elements where
    both the body and the whole vertebra are labelled (phantoms), else the whole vertebra (SPIDER) or the body
    (``lumbar`` VB) alone.  Where memberships overlap they are scaled to sum to 1; ``S`` may be 0."""
    t = np.asarray(target, np.float32)
    maps = [t[:, c] for c in (CANAL_CH, DISC_CH) if known[c]]
    if known[BODY_CH] and known[WHOLE_CH]:
        maps += [t[:, BODY_CH], np.clip(t[:, WHOLE_CH] - t[:, BODY_CH], 0.0, 1.0)]
    elif known[WHOLE_CH]:
        maps.append(t[:, WHOLE_CH])
    elif known[BODY_CH]:
        maps.append(t[:, BODY_CH])
    maps = [m for m in maps if m.any()]
    if not maps:
        return np.zeros((0, *t.shape[:1], *t.shape[2:]), np.float32)
    out = np.stack(maps)
    total = out.sum(axis=0)
    return out / np.maximum(total, 1.0)


@dataclass(frozen=True)
class RandContrastCurve:
    """An inversion (``invert_prob``) or a random look-up table: ``knots`` equally spaced intensities over the
    image's range, each mapped to a uniform random value, linear in between (so the curve is non-monotone:
    fluid may become darker than fat, bone brighter than disc)."""

    invert_prob: float = 0.35
    knots: tuple[int, int] = (3, 7)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = float(img.min()), float(img.max())
        if rng.random() < self.invert_prob:
            return (hi + lo - img).astype(np.float32)
        n = int(rng.integers(self.knots[0], self.knots[1] + 1))
        xs = np.linspace(lo, hi if hi > lo else lo + 1.0, n)
        return np.interp(img, xs, rng.uniform(0.0, 1.0, n)).astype(np.float32)


@dataclass(frozen=True)
class RandStructureIntensity:
    """SynthSeg-style resampling on the real image: each structure of :func:`structure_maps` becomes
    ``m + a (x - mu)`` (``mu`` its own mean, ``m`` uniform in [0, 1], ``a`` in ``scale`` with a random sign),
    so edges between structures carry random contrast and the texture inside each is kept.  What no label
    covers is split into ``clusters`` intensity clusters (centred on its quantiles; soft Gaussian membership,
    so no new edge appears inside a tissue), each resampled the same way.  Memberships are soft, so a
    partial-volume boundary stays a blend."""

    clusters: tuple[int, int] = (2, 4)
    scale: tuple[float, float] = (0.3, 1.2)

    def __call__(self, img: np.ndarray, maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros_like(img, dtype=np.float32)
        for m in maps:
            mu = float((img * m).sum() / max(float(m.sum()), 1e-6))
            out += m * self._resample(img, mu, rng)
        background = 1.0 - maps.sum(axis=0) if len(maps) else np.ones_like(img)
        k = int(rng.integers(self.clusters[0], self.clusters[1] + 1))
        values = img[background > 0.5]
        if values.size < k:
            values = img.reshape(-1)
        centres = np.quantile(values, (np.arange(k) + 0.5) / k)
        width = max(float(np.diff(centres).min()) / 2 if k > 1 else 0.0, 0.05)
        logit = -((img[None] - centres.reshape(-1, *([1] * img.ndim))) ** 2) / (2 * width ** 2)
        member = np.exp(logit - logit.max(axis=0, keepdims=True))
        member /= member.sum(axis=0, keepdims=True)
        for w, mu in zip(member, centres):
            out += background * w * self._resample(img, float(mu), rng)
        return out

    def _resample(self, img: np.ndarray, mu: float, rng: np.random.Generator) -> np.ndarray:
        a = rng.uniform(*self.scale) * (1.0 if rng.random() < 0.5 else -1.0)
        return (rng.uniform(0.0, 1.0) + a * (img - mu)).astype(np.float32)


@dataclass(frozen=True)
class RandBiasField:
    """A smooth multiplicative field ``exp(sum c_ij P_i(y) P_j(x))`` (Legendre products up to ``degree``,
    coefficients uniform in +-``coeff``), the same on every slice of the stack (a coil's field is smooth
    across 2-6 mm)."""

    coeff: float = 0.4
    degree: int = 3

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from numpy.polynomial import legendre

        h, w = img.shape[-2:]
        n = self.degree + 1
        c = rng.uniform(-self.coeff, self.coeff, (n, n))
        c[np.add.outer(np.arange(n), np.arange(n)) > self.degree] = 0.0
        field = legendre.leggrid2d(np.linspace(-1, 1, h), np.linspace(-1, 1, w), c)
        return (img * np.exp(field - field.mean())).astype(np.float32)


@dataclass(frozen=True)
class RandBlur:
    """In-plane Gaussian blur of ``sigma`` model pixels (coarser pixels), the same on every slice."""

    sigma: tuple[float, float] = (0.4, 1.5)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy import ndimage

        s = float(rng.uniform(*self.sigma))
        return ndimage.gaussian_filter(img, (0.0, s, s), mode="nearest").astype(np.float32)


@dataclass(frozen=True)
class RandSliceThickness:
    """Thicker slices on a 2.5-D stack: each slice takes a share ``a`` (uniform in ``share``) of each of its
    neighbours in the stack (blur along the slice axis, as partial volume of a thick slice).  A one-slice
    input is returned unchanged."""

    share: tuple[float, float] = (0.1, 0.33)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if img.shape[0] < 2:
            return img
        a = float(rng.uniform(*self.share))
        padded = np.concatenate([img[:1], img, img[-1:]])
        return ((1 - 2 * a) * img + a * (padded[:-2] + padded[2:])).astype(np.float32)


@dataclass(frozen=True)
class RandRicianNoise:
    """Rician noise, as a magnitude image has: ``|x + n1 + i n2|`` with Gaussian ``n1, n2`` of standard
    deviation ``std`` (uniform in the range) times the image's 99th percentile."""

    std: tuple[float, float] = (0.01, 0.08)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = float(rng.uniform(*self.std)) * max(float(np.percentile(img, 99)), 1e-3)
        re = img + rng.normal(0.0, s, img.shape)
        im = rng.normal(0.0, s, img.shape)
        return np.sqrt(re ** 2 + im ** 2).astype(np.float32)


@dataclass(frozen=True)
class ContrastRandomizer:
    """With probability ``p`` a new contrast (a curve, or a per-structure resampling in ``structure_share`` of
    the draws when the case labels a structure on this slice), then each corruption with its probability,
    then the networks' normalisation; otherwise the image untouched.  ``p = 0`` draws no random number."""

    p: float = 0.0
    structure_share: float = 0.5
    curve: RandContrastCurve = RandContrastCurve()
    structures: RandStructureIntensity = RandStructureIntensity()
    corruptions: tuple[tuple[float, object], ...] = (
        (0.5, RandBiasField()), (0.3, RandBlur()), (0.3, RandSliceThickness()), (0.5, RandRicianNoise()),
    )

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"the share of randomised contrasts must lie in [0, 1], got {self.p}")

    def __call__(self, img: np.ndarray, target: np.ndarray, known: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """``img`` (channels, H, W) float32 as normalised; ``target`` (channels, C, H, W) its labels."""
        if self.p <= 0.0 or rng.random() >= self.p:
            return img
        maps = structure_maps(target, known)
        if len(maps) and rng.random() < self.structure_share:
            out = self.structures(img, maps, rng)
        else:
            out = self.curve(img, rng)
        for prob, transform in self.corruptions:
            if rng.random() < prob:
                out = transform(out, rng)
        return normalize_intensity(out)
