"""Pick the torch device for a run and say which, in one sentence."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that cannot be used on this machine; the message is one sentence (the CLI exits 2 with it)."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_missing() -> str:
    """Why ``cuda`` cannot be used: a PyTorch built without CUDA, or no GPU that this process can see."""
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support (a CPU-only build)"
    return "PyTorch finds no CUDA GPU on this machine (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"


def resolve_device(name: str = "auto") -> tuple[torch.device, str]:
    """``"auto"`` (cuda, then mps, then cpu) | ``"cpu"`` | ``"cuda"`` | ``"mps"`` -> (device, sentence).

    An accelerator that is not available, or a name that is none of these, raises :class:`DeviceError`
    with one sentence, before any model is built.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"Using the GPU ({torch.cuda.get_device_name(0)})."
        if _mps_available():
            return torch.device("mps"), "Using the Apple GPU (mps)."
        return torch.device("cpu"), "Using the CPU (no GPU found)."
    if name == "cpu":
        return torch.device("cpu"), "Using the CPU."
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"Device cuda was asked for, but {_cuda_missing()}; use device cpu or auto.")
        return torch.device("cuda"), f"Using the GPU ({torch.cuda.get_device_name(0)})."
    if name == "mps":
        if not _mps_available():
            raise DeviceError("Device mps was asked for, but no Apple GPU (mps) is available here; use device cpu "
                              "or auto.")
        return torch.device("mps"), "Using the Apple GPU (mps)."
    raise DeviceError(f"Device must be auto, cpu, cuda or mps, not {name!r}.")


#: glibc ``mallopt`` parameters (malloc.h) and the values CPU inference runs with: keep freed memory in the
#: process instead of returning every large activation buffer to the kernel.  Without this, each denoiser
#: pass maps and unmaps its activations and the kernel zero-fills their pages again: about 2.4 million page
#: faults and a fifth of the run as system time on a 4-slice run (benchmarks/bench_cli.py).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 2**30))
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for repeated large CPU tensors (once per process; True when applied).

    Buffers up to 32 MiB come from the heap instead of fresh ``mmap`` pages, and the heap is not trimmed
    after every free.  A no-op (False) off glibc (macOS, Windows, musl) or when ``SPINESEGDIFF_MALLOC=0``.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    import os
    import sys

    _allocator_tuned = False
    if not sys.platform.startswith("linux") or os.environ.get("SPINESEGDIFF_MALLOC", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = all(libc.mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)
    except (OSError, AttributeError):
        _allocator_tuned = False
    return _allocator_tuned
