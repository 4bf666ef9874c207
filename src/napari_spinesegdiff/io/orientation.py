"""Sagittal orientation worked out from a voxel-to-world affine (never from the array order).

The rest of the package sees one canonical sagittal view of every volume:

* axis 0 -- slices from patient left to patient right (world +x in RAS+),
* axis 1 -- rows from superior to inferior,
* axis 2 -- columns from anterior to posterior.

So ``canonical[k]`` is a sagittal image with superior at the top and anterior on the left, the way
radiologists read lumbar MRI.  :class:`SagittalOrientation` holds the exact permutation and flips, and the
inverse that puts an array back into the file's own voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio

#: Orientation codes of the canonical sagittal array (see module docstring).
CANONICAL_AXCODES = ("R", "I", "P")


@dataclass(frozen=True)
class SagittalOrientation:
    """Maps a 3-D voxel array with a given affine to and from the canonical sagittal view."""

    affine: np.ndarray  # 4x4 voxel (file order) -> RAS+ mm
    shape: tuple[int, int, int]  # file-order spatial shape

    @property
    def _ornt(self) -> np.ndarray:
        return nio.io_orientation(self.affine)

    @property
    def _to_canonical(self) -> np.ndarray:
        return nio.ornt_transform(self._ornt, nio.axcodes2ornt(CANONICAL_AXCODES))

    @property
    def _from_canonical(self) -> np.ndarray:
        return nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), self._ornt)

    @property
    def file_axcodes(self) -> tuple[str, str, str]:
        """Orientation codes of the file's array axes, e.g. ``('I', 'P', 'R')``."""
        return tuple(nio.ornt2axcodes(self._ornt))  # type: ignore[return-value]

    @property
    def sagittal_axis(self) -> int:
        """Index of the file-order axis that runs left-right (the slice axis of sagittal images)."""
        return int(np.flatnonzero(self._ornt[:, 0] == 0)[0])

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for src_axis, (dst_axis, _flip) in enumerate(self._to_canonical):
            out[int(dst_axis)] = self.shape[src_axis]
        return tuple(out)  # type: ignore[return-value]

    @property
    def canonical_affine(self) -> np.ndarray:
        """Affine of the canonical array: canonical voxel index -> RAS+ mm."""
        return self.affine @ nio.inv_ornt_aff(self._to_canonical, self.shape)

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the canonical axes (LR, SI, AP)."""
        return tuple(float(v) for v in np.linalg.norm(self.canonical_affine[:3, :3], axis=0))  # type: ignore[return-value]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """File-order array (3-D, or 3-D plus trailing axes) -> canonical sagittal array (a view where possible)."""
        self._check(array.shape[:3], self.shape, "file-order")
        return nio.apply_orientation(array, self._to_canonical)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical sagittal array -> the file's own array order (exact inverse of :meth:`to_canonical`)."""
        self._check(array.shape[:3], self.canonical_shape, "canonical")
        return nio.apply_orientation(array, self._from_canonical)

    @staticmethod
    def _check(got, want, what: str) -> None:
        if tuple(got) != tuple(want):
            raise ValueError(f"Expected a {what} array of shape {tuple(want)}, got {tuple(got)}.")


def napari_geometry(orientation: SagittalOrientation) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(scale, translate)`` in mm for a napari layer showing the canonical array.

    The displayed world axes are (x, -z, -y) in RAS+ mm: left->right, superior->inferior and
    anterior->posterior, so napari's default view shows sagittal slices with superior up.  For an oblique
    acquisition this is the nearest axis-aligned frame; the exact affine travels in the layer metadata.
    """
    aff = orientation.canonical_affine
    origin = aff[:3, 3]
    translate = (float(origin[0]), float(-origin[2]), float(-origin[1]))
    return orientation.canonical_spacing, translate
