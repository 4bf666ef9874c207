"""Checkpoints: our single-file ``.safetensors`` format, and the official SpineSegDiff raw files.

Our format: the network's tensors plus ``metadata={"spinesegdiff": <json of CheckpointConfig>}``.
Official files (``.pt``/``.pth``/``.bin``/...): ``torch.load(weights_only=True)`` (a pickle that would run
code is refused); accepted layouts are a raw state dict, ``{"module": state_dict}`` and keys prefixed
``module.``.  The network shape is read from the tensors (the official file gives the ``midl2025``
preset) and loaded with ``strict=True``.  Reference defaults for official files: ``x0_mode="clamp"``,
crop 320x320, intensity ``{"method": "none"}`` (the reference loader does no normalisation) and, as the
training spacing is not published, the SPIDER median in-plane spacing ``[0.625, 0.625]`` mm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .network import NetworkConfig, SpineSegDiffNet, json_ready
from .network import preset as get_preset

METADATA_KEY = "spinesegdiff"
CLASS_NAMES = ["spinal canal", "vertebrae", "intervertebral disc"]
OFFICIAL_SPACING_MM = [0.625, 0.625]
OFFICIAL_CROP = [320, 320]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one sentence."""


def _default_intensity() -> dict[str, Any]:
    return {"method": "percentile", "low": 0.5, "high": 99.5}


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything needed to use a checkpoint besides its weights."""

    kind: str = "diffusion"  # "diffusion" | "baseline"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "T": 1000})
    x0_mode: str = "sigmoid"
    spacing_mm: list[float] = field(default_factory=lambda: [1.0, 1.0])
    crop: list[int] = field(default_factory=lambda: [160, 160])
    intensity: dict[str, Any] = field(default_factory=_default_intensity)
    # a 2.5-D network (network.in_channels = 3, 5, ...) sees the slices about this far away on each side
    # (preprocess.context_stack); unused when the network takes one slice
    context_mm: float = 2.0
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("diffusion", "baseline"):
            raise CheckpointError(f"checkpoint kind must be 'diffusion' or 'baseline', got {self.kind!r}.")
        if self.x0_mode not in ("sigmoid", "clamp"):
            raise CheckpointError(f"x0_mode must be 'sigmoid' or 'clamp', got {self.x0_mode!r}.")
        if not (isinstance(self.context_mm, (int, float)) and 0 < float(self.context_mm) < 100):
            raise CheckpointError(f"context_mm must be a distance in mm between 0 and 100, got {self.context_mm!r}.")
        if len(self.class_names) != self.network.num_classes:
            raise CheckpointError(
                f"{len(self.class_names)} class names for a network with {self.network.num_classes} classes."
            )

    def replace(self, **changes: Any) -> "CheckpointConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["network"] = self.network.to_dict()
        return json_ready(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointConfig":
        """Inverse of :meth:`to_dict`; unknown top-level keys are ignored (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "network" in kwargs and not isinstance(kwargs["network"], NetworkConfig):
            kwargs["network"] = NetworkConfig.from_dict(dict(kwargs["network"]))
        return cls(**kwargs)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_module(config: CheckpointConfig) -> nn.Module:
    """A fresh network for a checkpoint config (diffusion or baseline)."""
    if config.kind == "baseline":
        from .baseline import BaselineNet

        return BaselineNet(config.network)
    return SpineSegDiffNet(config.network)


def save_checkpoint(path: str | os.PathLike, module: nn.Module, config: CheckpointConfig) -> Path:
    """Write ``module``'s weights and ``config`` to one ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    own = getattr(module, "config", None)
    if isinstance(own, NetworkConfig) and own != config.network:
        raise CheckpointError("The module's network config differs from the one in the checkpoint config.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: config.to_json()})
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_config(path: str | os.PathLike) -> CheckpointConfig | None:
    """The config stored in one of our ``.safetensors`` files, without loading weights (``None``: none)."""
    from safetensors import safe_open

    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"Cannot read {Path(path).name} as a safetensors file ({exc}).") from None
    if METADATA_KEY not in meta:
        return None
    try:
        stored = json.loads(meta[METADATA_KEY])
        if not isinstance(stored, Mapping):
            raise TypeError("it is not a JSON object")
        return CheckpointConfig.from_dict(stored)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
        reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        raise CheckpointError(f"The configuration stored in {Path(path).name} is invalid: {reason}.") from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a ``.safetensors`` file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(int(n) for n in fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"Cannot read the tensor list of {path.name} ({exc}).") from None


def declared_shapes(config: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    """The shapes the network a config declares must have for its size-setting tensors.

    These tensors fix every width of the network (input channels, classes, the six ``features``, the
    time-embedding sizes), so a file whose tensors have these shapes cannot make :func:`build_module`
    build a network larger than its own weights.
    """
    net = config.network
    f, cin, nc = net.features, net.in_channels, net.num_classes
    if config.kind == "baseline":
        shapes = {"unet.conv_0.conv_0.conv.weight": (f[0], cin, 3, 3)}
        shapes.update({f"unet.down_{i}.convs.conv_0.conv.weight": (f[i], f[i - 1], 3, 3) for i in range(1, 5)})
        shapes["unet.upcat_1.convs.conv_0.conv.weight"] = (f[5], f[0] + f[1], 3, 3)
        shapes["unet.final_conv.weight"] = (nc, f[5], 1, 1)
        return shapes
    shapes = {"embed_model.conv_0.conv_0.conv.weight": (f[0], cin, 3, 3)}
    shapes.update({f"embed_model.down_{i}.convs.conv_0.conv.weight": (f[i], f[i - 1], 3, 3) for i in range(1, 5)})
    shapes["model.conv_0.conv_0.conv.weight"] = (f[0], cin + nc, 3, 3)
    shapes.update({f"model.down_{i}.convs.conv_0.conv.weight": (f[i], f[i - 1], 3, 3) for i in range(1, 5)})
    shapes["model.temb.dense.0.weight"] = (net.temb_dim, net.sinusoidal_dim)
    shapes["model.temb.dense.1.weight"] = (net.temb_dim, net.temb_dim)
    shapes["model.upcat_1.convs.conv_0.conv.weight"] = (f[5], f[0] + f[1], 3, 3)
    shapes["model.final_conv.weight"] = (nc, f[5], 1, 1)
    return shapes


def check_declared_network(
    config: CheckpointConfig, shapes: Mapping[str, tuple[int, ...]], name: str, declared_by: str = "its metadata"
) -> None:
    """Refuse (one sentence naming the file) a config whose declared network does not fit the tensors.

    ``shapes`` maps tensor names to shapes (from the file's header); nothing is built or allocated.
    """
    net = config.network
    what = (
        f"the {config.kind} network {declared_by} declares ({net.in_channels} input channel(s), "
        f"{net.num_classes} classes, features {list(net.features)})"
    )
    if any(int(v) <= 0 for v in (*net.features, net.in_channels, net.num_classes, net.temb_dim, net.sinusoidal_dim)):
        raise CheckpointError(f"{name} does not match {what}: every width must be positive.")
    for key, want in declared_shapes(config).items():
        have = shapes.get(key)
        if have is None:
            raise CheckpointError(f"{name} does not match {what}: its weights lack the tensor {key}.")
        if tuple(have) != tuple(want):
            raise CheckpointError(
                f"{name} does not match {what}: tensors differ in shape, for instance {key} is {tuple(have)} in the "
                f"file and {tuple(want)} in the declared network, so the network is not built."
            )


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", preset: str | None = None
) -> tuple[nn.Module, CheckpointConfig]:
    """(module in eval mode on ``map_location``, config) from our file or an official raw one.

    ``preset`` forces the network shape for files without our metadata (checked by the strict load).
    """
    _require_file(path)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        config = read_config(path)
        if config is not None:  # compare the declared network with the tensors before loading or building
            check_declared_network(config, _safetensors_shapes(path), path.name)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"Cannot read the weights in {path.name} ({exc}).") from None
        official = config is None
        if official:
            state = _unwrap(state)
            config = _official_config(path, state, preset)
    else:
        official = True
        state = _unwrap(_torch_load(path))
        config = _official_config(path, state, preset)
    if official and preset:
        check_declared_network(config, {k: tuple(v.shape) for k, v in state.items()}, path.name,
                               declared_by=f"the preset {preset!r}")
    module = build_module(config)
    _load_strict(module, state, path.name)
    return module.to(map_location).eval(), config


def load_network(path: str, map_location: str | torch.device = "cpu", preset: str | None = None) -> nn.Module:
    """Load a checkpoint (ours or an official raw file) -> network in eval mode."""
    module, _ = load_checkpoint(path, map_location=map_location, preset=preset)
    return module


def _require_file(path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise CheckpointError(f"Checkpoint file {str(path)!r} does not exist or is not a file.")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused the file
        text = str(exc)
        if "GLOBAL" in text or "reduce" in text.lower():
            raise CheckpointError(
                f"Refusing {path.name}: it is a pickle that would run code when loaded; "
                "only plain tensors are accepted."
            ) from None
        raise CheckpointError(
            f"Refusing {path.name}: it is not a plain-tensor PyTorch checkpoint (unreadable, or a pickle the safe "
            "loader cannot parse)."
        ) from None
    except Exception as exc:
        raise CheckpointError(f"Cannot read {path.name} as a PyTorch checkpoint ({type(exc).__name__}).") from None


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Raw state dict from ``sd``, ``{"module": sd}`` (or ``state_dict``/``model``), ``module.``-prefixed keys."""
    if isinstance(obj, Mapping):
        for wrapper in ("module", "state_dict", "model_state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("The checkpoint does not hold a state dict of tensors.")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _infer_network(state: Mapping[str, torch.Tensor]) -> NetworkConfig:
    """Network shape read from a SpineSegDiff state dict (``embed_model.*`` / ``model.*``)."""
    try:
        first = state["embed_model.conv_0.conv_0.conv.weight"]
        feats = [
            first.shape[0],
            *(state[f"embed_model.down_{i}.convs.conv_0.conv.weight"].shape[0] for i in range(1, 5)),
            state["model.upcat_1.convs.conv_0.conv.weight"].shape[0],
        ]
        return NetworkConfig(
            in_channels=int(first.shape[1]),
            num_classes=int(state["model.final_conv.weight"].shape[0]),
            features=tuple(int(f) for f in feats),
            temb_dim=int(state["model.temb.dense.1.weight"].shape[0]),
            sinusoidal_dim=int(state["model.temb.dense.0.weight"].shape[1]),
        )
    except KeyError as exc:
        raise CheckpointError(
            f"The weights are not a SpineSegDiff network (missing {exc.args[0]!r})."
        ) from None


def _official_config(path: Path, state: Mapping[str, torch.Tensor], preset: str | None) -> CheckpointConfig:
    network = get_preset(preset) if preset else _infer_network(state)
    names = CLASS_NAMES if network.num_classes == 3 else [f"class {i + 1}" for i in range(network.num_classes)]
    return CheckpointConfig(
        kind="diffusion",
        network=network,
        class_names=list(names),
        x0_mode="clamp",
        spacing_mm=list(OFFICIAL_SPACING_MM),
        crop=list(OFFICIAL_CROP),
        intensity={"method": "none"},
        training={
            "source": "official SpineSegDiff checkpoint (BMDS-ETH/SpineSegDiff)",
            "file": path.name,
            "sha256": file_sha256(path),
            "spacing_note": "training spacing not published; SPIDER median in-plane spacing assumed",
        },
    )


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not match the network: {len(missing)} missing keys (e.g. {missing[:2]}) and "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})."
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{name} does not match the network: {len(bad)} tensors differ in shape, e.g. {k} "
            f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}."
        )
    module.load_state_dict(state, strict=True)
