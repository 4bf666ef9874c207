"""Inputs no spine scan is: absurd voxel sizes and extents, and paths that lead to no file.

Each maker builds its input in a folder and returns the path to open; each comes with a phrase of its
refusal.  ``read_volume`` (tests/test_io_guard.py), the napari reader (tests/test_napari_io.py) and
``spinesegdiff segment`` (tests/test_run_safety.py) must all refuse it with the same sentence.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_scan(path: Path, shape, spacing, noise: bool = True) -> Path:
    """A float32 NIfTI of noise (or zeros, small on disk) with a diagonal affine of ``spacing`` (mm)."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, shape).astype(np.float32) if noise else np.zeros(shape, np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


def spacing_1e9(d: Path) -> Path:
    return nifti_scan(d / "spacing_1e9.nii.gz", (12, 64, 64), (1e9, 1e9, 1e9))


def slice_3000_at_1mm(d: Path) -> Path:
    return nifti_scan(d / "slice_3000.nii.gz", (1, 3000, 3000), (1.0, 1.0, 1.0), noise=False)


def self_loop(d: Path) -> Path:
    (d / "loop.nii.gz").symlink_to("loop.nii.gz")
    return d / "loop.nii.gz"


def two_link_loop(d: Path) -> Path:
    (d / "a.nii.gz").symlink_to("b.nii.gz")
    (d / "b.nii.gz").symlink_to("a.nii.gz")
    return d / "a.nii.gz"


def dangling_link(d: Path) -> Path:
    (d / "gone.nii.gz").symlink_to("nowhere.nii.gz")
    return d / "gone.nii.gz"


def through_a_loop(d: Path) -> Path:
    (d / "ring").symlink_to("ring")
    return d / "ring" / "scan.nii.gz"


def through_a_file(d: Path) -> Path:
    (d / "notes.txt").write_text("a file, not a folder")
    return d / "notes.txt" / "scan.nii.gz"


def name_too_long(d: Path) -> Path:
    return d / ("x" * 300 + ".nii.gz")


ABSURD = [
    (spacing_1e9, "its voxels measure 1e+09 x 1e+09 x 1e+09 mm, and a scan's voxels measure 0.001 to 100 mm"),
    (slice_3000_at_1mm, "span 1 x 3000 x 3000 mm, more than the 2000 mm a scan of a body spans along any axis"),
    (self_loop, "it is a symbolic link in a loop of links that never reaches a file"),
    (two_link_loop, "it is a symbolic link in a loop of links that never reaches a file"),
    (dangling_link, "it is a symbolic link to 'nowhere.nii.gz', which does not exist"),
    (through_a_loop, "its path passes through a loop of symbolic links"),
    (through_a_file, "it cannot be examined (Not a directory)"),
    (name_too_long, "it cannot be examined (File name too long)"),
]
IDS = [make.__name__ for make, _ in ABSURD]


def one_sentence(message: str, path: Path) -> None:
    """``Cannot open <path>: <reason>.`` on one line, the reason one sentence."""
    prefix = f"Cannot open {path}: "
    assert message.startswith(prefix), message
    assert message.endswith(".") and "\n" not in message and ". " not in message[len(prefix):], message
