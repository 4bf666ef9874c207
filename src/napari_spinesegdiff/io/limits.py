"""What a scan may measure, and whether a run on it fits in the memory this process can still get.

A header can be valid and still describe no scan of a body: voxels of 1e9 mm, or a 3000 x 3000 slice at
1 mm (3 m across).  Such files used to reach the model and end in a library's traceback (a tensor size that
overflows, a failed allocation).  Two refusals, each one sentence naming the file, stop them first:

* :func:`physical_size_problem`, applied by every reader before a voxel is read: each voxel size within
  :data:`VOXEL_MM_RANGE` and each axis at most :data:`MAX_EXTENT_MM` long.
* :func:`check_run_memory`, applied by the pipeline once the networks are loaded and before any slice is
  resampled: the memory a run needs (:func:`estimate_run_bytes`, for the scan's grid resampled to the model's
  spacing) against what the machine, the address-space limit (``ulimit -v``) and the container's memory
  limit leave (:func:`available_memory`).
"""

from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .guard import VolumeReadError

#: Voxel sizes (mm) a scan can have; outside them the header's spacing or its unit is wrong (a micrometre is
#: far finer than any MRI or CT, 10 cm coarser than any slice).
VOXEL_MM_RANGE = (0.001, 100.0)
#: Longest extent (mm) along any voxel axis: 2 m, more than a whole-body scan covers.
MAX_EXTENT_MM = 2000.0

#: Peak memory of a run beyond the loaded networks, measured with the shipped v4.11 networks (2026-12-07,
#: peak RSS of whole runs on 1-40 slices of 256-768 pixels at 1 mm, the denoiser on the whole slice): bytes
#: per model-grid pixel of each slice in a batch (the presegmenter and the image encoder) and of each
#: ensemble sample (the denoiser), per engine.  The OpenVINO figures held within 10 % from 1 to 4 slices per
#: batch; the denoiser usually refines a smaller box around the spine, so these are upper bounds.
ENGINE_PIXEL_BYTES = {"torch": (600, 780), "openvino": (1300, 300), "onnxruntime": (1800, 810)}
#: Bytes per voxel of the scan's own grid (the image, four class probabilities and uncertainties, the labels,
#: the results in file order): 145 measured for 40 slices of 512 x 512, with four classes.
SCAN_VOXEL_BYTES_PER_CLASS = 40
#: The networks the per-pixel figures were measured with (sum of their feature widths); wider networks
#: scale them up.
MEASURED_FEATURES = {"presegmenter": 544, "denoiser": 272}

_GIB = 2**30


def _num(value: float) -> str:
    return f"{value:.4g}"


def physical_size_problem(sizes_mm: Sequence[float], shape: Sequence[int]) -> str | None:
    """The reason (one clause) why voxels of ``sizes_mm`` on a grid of ``shape`` are no scan, or ``None``.

    Sizes that are not finite and positive are left to the other checks (they refuse them on their own).
    """
    sizes = [float(s) for s in sizes_mm]
    if not sizes or not all(math.isfinite(s) and s > 0 for s in sizes):
        return None
    low, high = VOXEL_MM_RANGE
    shown = " x ".join(_num(s) for s in sizes)
    if min(sizes) < low or max(sizes) > high:
        return (f"its voxels measure {shown} mm, and a scan's voxels measure {_num(low)} to {_num(high)} mm, "
                "so its header's spacing or unit is wrong")
    extent = [int(n) * s for n, s in zip(shape, sizes)]
    if max(extent) > MAX_EXTENT_MM:
        return (f"its {' x '.join(str(int(n)) for n in shape)} voxels of {shown} mm span "
                f"{' x '.join(f'{e:.0f}' for e in extent)} mm, more than the {MAX_EXTENT_MM:.0f} mm a scan of "
                "a body spans along any axis")
    return None


# --------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class RunMemory:
    """The memory a run needs beyond the loaded networks, in bytes, and the grids it was worked out for."""

    bytes: int
    model_shape: tuple[int, int]  # (rows, cols) of one slice on the model grid
    slices: int  # slices segmented
    batch: int  # slices in one batch
    ensemble: int


def model_grid(rows_cols: Sequence[int], spacing_mm: Sequence[float], model_mm: Sequence[float]) -> tuple[int, int]:
    """The size of one slice resampled to the model's spacing (as :class:`~..preprocess.SliceGrid` does)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(rows_cols, spacing_mm, model_mm))  # type: ignore


def estimate_run_bytes(
    canonical_shape: Sequence[int],
    canonical_spacing: Sequence[float],
    model_mm: Sequence[float],
    *,
    chosen: int,
    batch_slices: int,
    ensemble: int,
    classes: int,
    engine: str = "torch",
    on_cpu: bool = True,
    presegmenter_mm: Sequence[float] | None = None,
    features: tuple[int, int] | None = None,
) -> RunMemory:
    """The peak memory of one run beyond the loaded networks (bytes), from the measured figures above.

    ``canonical_shape`` (slices, rows, cols) and ``canonical_spacing`` (mm) are the scan's canonical sagittal
    grid, ``model_mm`` the denoiser's spacing and ``presegmenter_mm`` the presegmenter's (``None``: no
    presegmenter); ``chosen`` slices are segmented, ``batch_slices`` at a time with ``ensemble`` samples.
    ``features`` are the sums of the presegmenter's and the denoiser's feature widths.  Off the CPU
    (``on_cpu`` false) the networks' activations live on the accelerator and only the scan's arrays count.
    Python integers, so an absurd grid gives a huge number rather than an overflow.
    """
    n, rows, cols = (int(v) for v in canonical_shape)
    in_plane = (float(canonical_spacing[1]), float(canonical_spacing[2]))
    shape = model_grid((rows, cols), in_plane, model_mm)
    pixels = shape[0] * shape[1]
    if presegmenter_mm is not None:
        pre = model_grid((rows, cols), in_plane, presegmenter_mm)
        pre_pixels = max(pixels, pre[0] * pre[1])
    else:
        pre_pixels = pixels
    batch = max(1, min(int(batch_slices), int(chosen)))
    per_slice, per_sample = ENGINE_PIXEL_BYTES.get(engine, ENGINE_PIXEL_BYTES["torch"])
    pre_width, den_width = features or (MEASURED_FEATURES["presegmenter"], MEASURED_FEATURES["denoiser"])
    per_slice = per_slice * max(1.0, pre_width / MEASURED_FEATURES["presegmenter"])
    per_sample = per_sample * max(1.0, den_width / MEASURED_FEATURES["denoiser"])
    total = n * rows * cols * SCAN_VOXEL_BYTES_PER_CLASS * max(int(classes), 1)
    if on_cpu:
        total += int(batch * (per_slice * pre_pixels + per_sample * int(ensemble) * pixels))
    return RunMemory(int(total), shape, int(chosen), batch, int(ensemble))


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    if match:
        return int(match.group(1)) * 1024
    try:  # other systems: free physical pages
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _vm_size() -> int:
    try:
        match = re.search(r"^VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def _cgroup_left() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), or ``None`` without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit_text = (folder / names[0]).read_text().strip()
            used = int((folder / names[1]).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:
            continue
        return max(int(limit_text) - used, 0)
    return None


def available_memory() -> tuple[int, str] | None:
    """The bytes this process can still allocate and what limits them, or ``None`` where nothing says.

    The least of the machine's available memory, the address space left under ``RLIMIT_AS`` (``ulimit -v``)
    and what the container's cgroup memory limit leaves.
    """
    found: list[tuple[int, str]] = []
    free = _meminfo_available()
    if free is not None:
        found.append((free, "the memory the machine has available"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((max(int(soft) - _vm_size(), 0), "the address space left under this process's limit"))
    cgroup = _cgroup_left()
    if cgroup is not None:
        found.append((cgroup, "what the container's memory limit leaves"))
    return min(found) if found else None


def check_run_memory(name: object, canonical_shape: Sequence[int], canonical_spacing: Sequence[float],
                     need: RunMemory, model_mm: Sequence[float],
                     available: tuple[int, str] | None = None) -> None:
    """Refuse, in one sentence, a run that needs more memory than :func:`available_memory` leaves.

    ``name`` names the scan (its path); ``need`` is :func:`estimate_run_bytes` for the run.
    """
    available = available if available is not None else available_memory()
    if available is None or need.bytes <= available[0]:
        return
    _, rows, cols = (int(v) for v in canonical_shape)
    rows_mm, cols_mm = rows * float(canonical_spacing[1]), cols * float(canonical_spacing[2])
    h, w = need.model_shape
    model = " x ".join(_num(float(t)) for t in model_mm)
    run = f"{need.slices} slice{'s' if need.slices != 1 else ''}, {need.batch} at a time, {need.ensemble} samples each"
    raise VolumeReadError(
        f"Cannot segment {name}: its slices of {rows} x {cols} voxels ({rows_mm:.0f} x {cols_mm:.0f} mm) are "
        f"{h} x {w} pixels at the model's {model} mm, and a run on them ({run}) needs about "
        f"{need.bytes / _GIB:.1f} GiB of memory, more than the {available[0] / _GIB:.1f} GiB of {available[1]}."
    )
