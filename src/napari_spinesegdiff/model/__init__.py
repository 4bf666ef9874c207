"""Torch/MONAI side: network, diffusion schedule, sampler, checkpoints, baseline, device choice.

Importing this package loads torch; napari start-up modules must import it lazily.
"""

from .baseline import BaselineNet, predict_prior
from .checkpoint import (
    CheckpointConfig,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_network,
    read_config,
    save_checkpoint,
)
from .device import DeviceError, resolve_device
from .diffusion import CosineSchedule, schedule_from_dict
from .network import (
    PRESETS,
    NetworkConfig,
    SpineSegDiffNet,
    build_network,
)
from .sampler import (
    SampleResult,
    StepEvent,
    run_sampler,
    sample,
    step_uncertainty,
    step_weights,
)

__all__ = [
    "PRESETS",
    "BaselineNet",
    "CheckpointConfig",
    "CheckpointError",
    "CosineSchedule",
    "DeviceError",
    "NetworkConfig",
    "SampleResult",
    "SpineSegDiffNet",
    "StepEvent",
    "build_network",
    "file_sha256",
    "load_checkpoint",
    "load_network",
    "predict_prior",
    "read_config",
    "resolve_device",
    "run_sampler",
    "sample",
    "save_checkpoint",
    "schedule_from_dict",
    "step_uncertainty",
    "step_weights",
]
