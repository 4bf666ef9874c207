"""The one in-memory volume type shared by the CLI, the model pipeline and the napari edge."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .orientation import SagittalOrientation

VolumeKind = Literal["image", "labels"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D scan or mask with its geometry.

    ``data`` is in the file's own voxel order ``(i, j, k)`` such that
    ``world_RAS_mm = affine @ (i, j, k, 1)``.  For SimpleITK-read files that is the transpose of
    ``sitk.GetArrayFromImage`` (ITK index order).  ``meta`` keeps the source's header facts that a writer
    needs to write back into the same geometry (``format``, ``nifti_header``, ``sitk_*`` ...).
    """

    data: np.ndarray
    affine: np.ndarray
    kind: VolumeKind = "image"
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"A volume must be 3-D; got an array of shape {self.data.shape}.")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise ValueError("A volume's affine must be a finite 4x4 matrix.")
        object.__setattr__(self, "affine", aff)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the file-order axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> SagittalOrientation:
        return SagittalOrientation(self.affine, self.shape)

    def canonical(self) -> np.ndarray:
        """The data as a canonical sagittal array (LR slices, rows S->I, columns A->P)."""
        return self.orientation.to_canonical(self.data)

    def with_data(self, data: np.ndarray, kind: VolumeKind | None = None, **meta: Any) -> "Volume":
        """A volume on the same grid with other voxels (file order), e.g. labels predicted for a scan."""
        if tuple(data.shape) != self.shape:
            raise ValueError(f"Data of shape {tuple(data.shape)} does not fit a volume of shape {self.shape}.")
        return replace(self, data=data, kind=kind or self.kind, meta={**self.meta, **meta})

    def with_canonical(self, canonical: np.ndarray, kind: VolumeKind | None = None, **meta: Any) -> "Volume":
        """Like :meth:`with_data` but from an array in the canonical sagittal view."""
        return self.with_data(self.orientation.from_canonical(canonical), kind=kind, **meta)

    @classmethod
    def from_canonical(
        cls,
        canonical: np.ndarray,
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        kind: VolumeKind = "image",
        **meta: Any,
    ) -> "Volume":
        """Build a volume whose array *is* the canonical view (axes R, I, P) with the given spacing (mm)."""
        sx, si, sp = (float(s) for s in spacing)
        aff = np.array(
            [[sx, 0, 0, origin[0]], [0, 0, -sp, origin[1]], [0, -si, 0, origin[2]], [0, 0, 0, 1.0]]
        )
        return cls(np.asarray(canonical), aff, kind=kind, meta=dict(meta))
