"""Pick the torch device for a run and say which, in one sentence."""

from __future__ import annotations

import torch


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> tuple[torch.device, str]:
    """``"auto"`` (cuda, then mps, then cpu) | ``"cpu"`` | ``"cuda"`` | ``"mps"`` -> (device, sentence).

    Asking for an accelerator that is not available raises ``RuntimeError`` with one sentence.
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
            raise RuntimeError(
                "Device 'cuda' was requested but this PyTorch build sees no CUDA GPU; use 'cpu' or 'auto'."
            )
        return torch.device("cuda"), f"Using the GPU ({torch.cuda.get_device_name(0)})."
    if name == "mps":
        if not _mps_available():
            raise RuntimeError(
                "Device 'mps' was requested but no Apple GPU (mps) is available; use 'cpu' or 'auto'."
            )
        return torch.device("mps"), "Using the Apple GPU (mps)."
    raise ValueError(f"device must be auto, cpu, cuda or mps, got {name!r}.")
