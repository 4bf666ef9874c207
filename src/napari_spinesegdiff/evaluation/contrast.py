"""The contrast suite's transforms: a scan as another protocol would have shown it, with its truth.

Each transform takes an evaluation case and returns a new one (:class:`.evaluate.EvalCase`) whose image is
changed and whose truth is the same anatomy on the new image's grid, deterministically for a seed (each
case and transform draws from its own stream, ``(seed, transform, case name)``, so a subset of cases or
transforms gives the same scans):

* ``none``: the scan unchanged.
* ``inverted``: fluid dark, fat and marrow bright or the reverse, as T1-weighted against T2-weighted: the
  intensities inside the body (:func:`body_mask`) mirrored about the middle of their range; the air stays
  dark, as in every real scan.
* ``curve``: a random non-monotone look-up table (six knots over the body's range) inside the body.
* ``gamma``: ``x ** g`` with ``g`` in 0.4-0.7 or 1.5-2.5.
* ``bias``: a smooth multiplicative field (a 4 x 4 x 4 random grid interpolated cubically over the field of
  view) from 1 / (1 + a) to 1 + a, ``a`` in 0.3-0.5.
* ``noise``: Rician noise, sigma 5 % of the scan's 99.5th percentile.
* ``thick``: 3.6 mm slices: each new slice the mean of the old ones over 3.6 mm (a box profile, partial
  slices weighted by their overlap), one every 3.6 mm, one centred on the middle slice; the truth is the
  old slice nearest each new centre.
* ``coarse``: 1.2 mm pixels in plane (Gaussian anti-aliasing to a 1.2 mm box, then linear sampling at the
  new pixel centres); the truth is the old pixel nearest each new centre.  A scan already that coarse is
  unchanged.

Intensities are worked on the pipeline's own scale (0.5 and 99.5 percentiles of the scan -> 0 and 1,
clipped) and written back to the scan's range as float32, so the pipeline's normalisation sees what a scan
of that kind would give it.  The geometry transforms keep the world: every new voxel's centre is where the
affine says it is.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from ..io.volume import Volume

#: The suite's transforms, in report order.
TRANSFORMS = ("none", "inverted", "curve", "gamma", "bias", "noise", "thick", "coarse")
THICK_MM = 3.6
COARSE_MM = 1.2
NOISE_SHARE = 0.05


def _stream(seed: int, transform: str, case: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), TRANSFORMS.index(transform), zlib.crc32(case.encode())])


def _scaled(canonical: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(intensities on [0, 1] by the 0.5 and 99.5 percentiles, clipped; the two percentiles)."""
    arr = np.asarray(canonical, np.float32)
    lo, hi = (float(v) for v in np.percentile(arr, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0), lo, hi


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1.0 - w0), 1e-12)
    return float(centres[int(np.argmax(between))])


def body_mask(canonical: np.ndarray, spacing) -> np.ndarray:
    """The patient's body in a canonical scan: tissue is the smoothed scan (2 mm in plane) above half its
    Otsu threshold, opened by 2 mm in plane (bright lines at the edge of a field of view go) and without
    specks (3-D pieces under 5 % of the largest); on every row of every sagittal
    slice the body runs from the first tissue column to the last (a sagittal section of the trunk is one
    run from the abdominal wall to the skin of the back), so dark tissue inside it (fluid on a T1-weighted
    scan, cortical bone, ligaments, gas in the bowel) is inside and the air around it is not."""
    from scipy import ndimage

    x, _, _ = _scaled(canonical)
    sigma = (0.0, 2.0 / float(spacing[1]), 2.0 / float(spacing[2]))
    smooth = ndimage.gaussian_filter(x, sigma)
    tissue = smooth > 0.5 * _otsu(smooth)
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = True
    tissue = ndimage.binary_opening(tissue, plane, iterations=max(1, int(round(2.0 / float(spacing[1])))))
    pieces, n = ndimage.label(tissue)
    if n > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        tissue = (sizes >= 0.05 * sizes.max())[pieces]
    cols = np.arange(tissue.shape[2])
    first = np.where(tissue.any(axis=2), np.argmax(tissue, axis=2), tissue.shape[2])
    last = tissue.shape[2] - 1 - np.argmax(tissue[:, :, ::-1], axis=2)
    return (cols >= first[..., None]) & (cols <= last[..., None])


def _non_monotone_curve(rng: np.random.Generator, knots: int = 6) -> np.ndarray:
    """Knot values of a look-up table on evenly spaced knots over [0, 1] that rises and falls, spanning at
    least half the range."""
    while True:
        values = rng.uniform(0.0, 1.0, knots)
        steps = np.diff(values)
        if (steps > 0).any() and (steps < 0).any() and np.ptp(values) >= 0.5:
            return values


def _bias_field(shape, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth field from 1 / (1 + amplitude) to 1 + amplitude over an array of ``shape``."""
    from scipy import ndimage

    coarse = rng.standard_normal((4, 4, 4))
    field = ndimage.zoom(coarse, [s / 4 for s in shape], order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    field /= max(float(np.abs(field).max()), 1e-6)
    return np.exp(np.log1p(amplitude) * field).astype(np.float32)


def intensity_transform(canonical: np.ndarray, spacing, name: str,
                        rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One of the intensity transforms on a canonical scan: (new canonical scan, float32; its parameters)."""
    x, lo, hi = _scaled(canonical)
    if name == "inverted":
        body = body_mask(canonical, spacing)
        out, params = np.where(body, 1.0 - x, x), f"body {body.mean():.0%} of the field of view"
    elif name == "curve":
        knots = _non_monotone_curve(rng)
        body = body_mask(canonical, spacing)
        out = np.where(body, np.interp(x, np.linspace(0.0, 1.0, knots.size), knots), x)
        params = "knots " + " ".join(f"{v:.2f}" for v in knots)
    elif name == "gamma":
        g = float(rng.uniform(0.4, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.5))
        out, params = x ** g, f"gamma {g:.2f}"
    elif name == "bias":
        amplitude = float(rng.uniform(0.3, 0.5))
        field = _bias_field(x.shape, rng, amplitude)
        return (np.asarray(canonical, np.float32) * field), f"field {field.min():.2f}-{field.max():.2f}"
    elif name == "noise":
        sigma = NOISE_SHARE * hi
        v = np.asarray(canonical, np.float32)
        noisy = np.hypot(v + sigma * rng.standard_normal(v.shape, np.float32),
                         sigma * rng.standard_normal(v.shape, np.float32))
        return noisy.astype(np.float32), f"Rician sigma {sigma:.3g}"
    else:
        raise ValueError(f"{name!r} is not an intensity transform.")
    return (lo + (hi - lo) * out).astype(np.float32), params


def thick_slices(canonical: np.ndarray, slice_mm: float, thick_mm: float = THICK_MM
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New sagittal slices ``thick_mm`` thick, one every ``thick_mm``, one centred on slice ``n // 2``:
    (the new slices, their centres in old slice indices, the weights (new, old) that made them)."""
    n = canonical.shape[0]
    step = thick_mm / slice_mm
    mid = n // 2
    j = np.arange(-int(np.floor(mid / step)), int(np.floor((n - 1 - mid) / step)) + 1)
    centres = mid + j * step
    lo = centres[:, None] - step / 2
    hi = centres[:, None] + step / 2
    old = np.arange(n)[None, :]
    weights = np.clip(np.minimum(hi, old + 0.5) - np.maximum(lo, old - 0.5), 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.tensordot(weights, np.asarray(canonical, np.float32), axes=(1, 0))
    return out.astype(np.float32), centres, weights


def _coarse_axis(n: int, pixel_mm: float, target_mm: float) -> tuple[int, float]:
    """(new pixel count, old pixels per new pixel) along one in-plane axis."""
    m = max(1, int(round(n * pixel_mm / target_mm)))
    return m, n / m


def coarse_pixels(canonical: np.ndarray, spacing, target_mm: float = COARSE_MM) -> tuple[np.ndarray, list]:
    """Each sagittal slice resampled to ``target_mm`` pixels (anti-aliased): (new scan, [(new count, old
    pixels per new pixel) per in-plane axis]); axes already that coarse are kept."""
    from scipy import ndimage

    axes = [_coarse_axis(canonical.shape[a], float(spacing[a]), target_mm) if spacing[a] < target_mm
            else (canonical.shape[a], 1.0) for a in (1, 2)]
    sigma = [0.0] + [np.sqrt(max(f ** 2 - 1.0, 0.0) / 12.0) for _, f in axes]
    arr = ndimage.gaussian_filter(np.asarray(canonical, np.float32), sigma)
    shape = (canonical.shape[0], axes[0][0], axes[1][0])
    out = ndimage.zoom(arr, [s / o for s, o in zip(shape, canonical.shape)], order=1, grid_mode=True,
                       mode="nearest")
    return out.astype(np.float32), axes


def _resampled_volume(image: Volume, canonical: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> Volume:
    """A volume whose canonical voxel ``i`` sits at the old canonical position ``offset + scale * i``."""
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = offset
    return Volume(canonical, image.orientation.canonical_affine @ step, kind="image")


def _take(arr: np.ndarray | None, axis: int, index: np.ndarray) -> np.ndarray | None:
    return None if arr is None else np.take(arr, index, axis=axis)


def transform_case(case, name: str, seed: int = 0):
    """``case`` (an :class:`.evaluate.EvalCase`) under transform ``name``: (the new case, its parameters)."""
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown contrast-suite transform {name!r}; choose from {', '.join(TRANSFORMS)}.")
    if name == "none":
        return case, ""
    canonical = case.image.canonical()
    spacing = case.image.orientation.canonical_spacing
    if name == "thick":
        if spacing[0] >= THICK_MM:
            return case, f"slices already {spacing[0]:.2f} mm"
        data, centres, _ = thick_slices(canonical, spacing[0])
        nearest = np.clip(np.rint(centres).astype(int), 0, canonical.shape[0] - 1)
        step = THICK_MM / spacing[0]
        image = _resampled_volume(case.image, data, np.array([step, 1.0, 1.0]), np.array([centres[0], 0, 0]))
        return dataclasses.replace(case, image=image, truth=case.truth[nearest],
                                   in_range=_take(case.in_range, 0, nearest),
                                   degenerated_discs=_take(case.degenerated_discs, 0, nearest)), \
            f"{len(centres)} slices of {THICK_MM} mm (from {canonical.shape[0]} of {spacing[0]:.2f} mm)"
    if name == "coarse":
        data, axes = coarse_pixels(canonical, spacing)
        truth, in_range, deg = case.truth, case.in_range, case.degenerated_discs
        for a, (m, f) in zip((1, 2), axes):
            nearest = np.clip(np.floor((np.arange(m) + 0.5) * f).astype(int), 0, canonical.shape[a] - 1)
            truth, in_range, deg = (_take(v, a, nearest) for v in (truth, in_range, deg))
        scale = np.array([1.0, axes[0][1], axes[1][1]])
        image = _resampled_volume(case.image, data, scale, (scale - 1.0) / 2 * np.array([0, 1, 1]))
        return dataclasses.replace(case, image=image, truth=truth, in_range=in_range, degenerated_discs=deg), \
            "pixels " + " x ".join(f"{spacing[a] * f:.2f}" for a, (_, f) in zip((1, 2), axes)) + " mm"
    data, params = intensity_transform(canonical, spacing, name, _stream(seed, name, case.name))
    return dataclasses.replace(case, image=case.image.with_canonical(data, kind="image")), params
