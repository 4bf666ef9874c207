"""SpineSegDiff network: an image encoder plus a time-conditioned denoising BasicUNet (Diff-UNet style).

With the ``midl2025`` preset the ``state_dict()`` keys and shapes are exactly those of the official
SpineSegDiff checkpoint (``embed_model.*`` and ``model.*``, 144 tensors, 13,784,067 values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# MONAI's blocks are imported where a network is built, not at import: importing monai loads all of its
# submodules (about 3.5 s), which a run served from the ONNX cache (model.engine) never needs.

#: Spatial sizes are padded internally to a multiple of this (four 2x poolings) ...
SIZE_MULTIPLE = 16
#: ... and to at least this, so the 1/16 bottleneck keeps 2x2 pixels for instance norm.
MIN_PADDED_SIZE = 32


def _default_act() -> tuple:
    return ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


def _default_norm() -> tuple:
    return ("instance", {"affine": True})


def _tupleize(value: Any) -> Any:
    """JSON lists back to the tuples MONAI's factories expect (``["a", {...}]`` -> ``("a", {...})``)."""
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a SpineSegDiff (or baseline) network; ``features`` follow MONAI's BasicUNet (6 numbers)."""

    in_channels: int = 1
    num_classes: int = 3
    features: tuple[int, ...] = (64, 64, 128, 256, 512, 64)
    temb_dim: int = 512
    sinusoidal_dim: int = 128
    act: tuple = field(default_factory=_default_act)
    norm: tuple = field(default_factory=_default_norm)
    upsample: str = "deconv"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "act", _tupleize(self.act))
        object.__setattr__(self, "norm", _tupleize(self.norm))
        if len(self.features) != 6:
            raise ValueError(f"features must have 6 entries (BasicUNet layout), got {len(self.features)}.")
        if self.sinusoidal_dim % 2:
            raise ValueError(f"sinusoidal_dim must be even, got {self.sinusoidal_dim}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return json_ready(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetworkConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused with one sentence."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown network settings {sorted(unknown)}; known are {sorted(names)}.")
        return cls(**d)


def json_ready(value: Any) -> Any:
    """Tuples -> lists, recursively (for JSON)."""
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


PRESETS: dict[str, NetworkConfig] = {
    "midl2025": NetworkConfig(features=(64, 64, 128, 256, 512, 64)),
    "small": NetworkConfig(features=(16, 16, 32, 64, 128, 16)),
    "medium": NetworkConfig(features=(32, 32, 64, 128, 256, 32)),  # a presegmenter widened from "small"
    "tiny": NetworkConfig(features=(8, 8, 16, 32, 64, 8)),
}


def preset(name: str) -> NetworkConfig:
    """The named :data:`PRESETS` entry (one clear sentence for an unknown name)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown network preset {name!r}; choose one of {sorted(PRESETS)}.") from None


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, dim): [sin | cos]."""
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _conv(cfg: NetworkConfig, cin: int, cout: int) -> nn.Module:
    from monai.networks.blocks import Convolution

    return Convolution(2, cin, cout, act=cfg.act, norm=cfg.norm, dropout=cfg.dropout, bias=True, padding=1)


class TimestepEmbed(nn.Module):
    """``dense[0]`` (sinusoidal -> temb) then swish then ``dense[1]``."""

    def __init__(self, sinusoidal_dim: int, temb_dim: int) -> None:
        super().__init__()
        self.sinusoidal_dim = sinusoidal_dim
        self.dense = nn.ModuleList([nn.Linear(sinusoidal_dim, temb_dim), nn.Linear(temb_dim, temb_dim)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.dense[0](timestep_embedding(t, self.sinusoidal_dim))
        return self.dense[1](F.silu(h))


class TimeTwoConv(nn.Module):
    """Two conv blocks; ``temb_proj(swish(temb))`` is added after the first one."""

    def __init__(self, cfg: NetworkConfig, cin: int, cout: int) -> None:
        super().__init__()
        self.temb_proj = nn.Linear(cfg.temb_dim, cout)
        self.conv_0 = _conv(cfg, cin, cout)
        self.conv_1 = _conv(cfg, cout, cout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.conv_0(x)
        x = x + self.temb_proj(F.silu(temb))[:, :, None, None]
        return self.conv_1(x)


class TimeDown(nn.Module):
    """2x max pooling then :class:`TimeTwoConv`."""

    def __init__(self, cfg: NetworkConfig, cin: int, cout: int) -> None:
        super().__init__()
        self.max_pooling = nn.MaxPool2d(kernel_size=2)
        self.convs = TimeTwoConv(cfg, cin, cout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.convs(self.max_pooling(x), temb)


class TimeUpCat(nn.Module):
    """Transposed-conv upsampling, concat [skip, up], :class:`TimeTwoConv`."""

    def __init__(self, cfg: NetworkConfig, cin: int, cat: int, cout: int, halves: bool = True) -> None:
        from monai.networks.blocks import UpSample

        super().__init__()
        up = cin // 2 if halves else cin
        self.upsample = UpSample(2, cin, up, 2, mode=cfg.upsample)
        self.convs = TimeTwoConv(cfg, cat + up, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:  # cannot happen on padded inputs; kept for direct use of the block
            x = F.pad(x, (0, dw, 0, dh), mode="replicate")
        return self.convs(torch.cat([skip, x], dim=1), temb)


class ImageEncoder(nn.Module):
    """BasicUNet encoder half: returns the five stage features (full, 1/2, 1/4, 1/8, 1/16 resolution)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        from monai.networks.nets.basic_unet import Down, TwoConv

        super().__init__()
        f, a, n, d = cfg.features, cfg.act, cfg.norm, cfg.dropout
        self.conv_0 = TwoConv(2, cfg.in_channels, f[0], a, n, True, d)
        self.down_1 = Down(2, f[0], f[1], a, n, True, d)
        self.down_2 = Down(2, f[1], f[2], a, n, True, d)
        self.down_3 = Down(2, f[2], f[3], a, n, True, d)
        self.down_4 = Down(2, f[3], f[4], a, n, True, d)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.conv_0(image)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        return [x0, x1, x2, x3, self.down_4(x3)]


class DenoisingUNet(nn.Module):
    """Time-conditioned BasicUNet; encoder features are added after each of its five encoder stages."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        f = cfg.features
        self.temb = TimestepEmbed(cfg.sinusoidal_dim, cfg.temb_dim)
        self.conv_0 = TimeTwoConv(cfg, cfg.in_channels + cfg.num_classes, f[0])
        self.down_1 = TimeDown(cfg, f[0], f[1])
        self.down_2 = TimeDown(cfg, f[1], f[2])
        self.down_3 = TimeDown(cfg, f[2], f[3])
        self.down_4 = TimeDown(cfg, f[3], f[4])
        self.upcat_4 = TimeUpCat(cfg, f[4], f[3], f[3])
        self.upcat_3 = TimeUpCat(cfg, f[3], f[2], f[2])
        self.upcat_2 = TimeUpCat(cfg, f[2], f[1], f[1])
        self.upcat_1 = TimeUpCat(cfg, f[1], f[0], f[5], halves=False)
        self.final_conv = nn.Conv2d(f[5], cfg.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        temb = self.temb(t)
        x0 = self.conv_0(x, temb) + embeddings[0]
        x1 = self.down_1(x0, temb) + embeddings[1]
        x2 = self.down_2(x1, temb) + embeddings[2]
        x3 = self.down_3(x2, temb) + embeddings[3]
        x4 = self.down_4(x3, temb) + embeddings[4]
        u = self.upcat_4(x4, x3, temb)
        u = self.upcat_3(u, x2, temb)
        u = self.upcat_2(u, x1, temb)
        u = self.upcat_1(u, x0, temb)
        return self.final_conv(u)


def pad_amounts(h: int, w: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding to a multiple (at least ``MIN_PADDED_SIZE``), split evenly."""
    ph, pw = max((-h) % multiple, MIN_PADDED_SIZE - h), max((-w) % multiple, MIN_PADDED_SIZE - w)
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad the last two axes to a multiple; returns (padded, pads) for :func:`crop_padding`."""
    pads = pad_amounts(x.shape[-2], x.shape[-1], multiple)
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    return x, pads


def crop_padding(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`."""
    left, right, top, bottom = pads
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


class SpineSegDiffNet(nn.Module):
    """Image encoder (``embed_model``) + time-conditioned denoiser (``model``) predicting x0 logits.

    Any H, W works: inputs are replicate-padded to a multiple of 16 (at least 32) and the logits
    cropped back; sizes that already fit (e.g. 320 x 320) are not padded.
    """

    def __init__(self, config: NetworkConfig | str = "midl2025") -> None:
        super().__init__()
        self.config = preset(config) if isinstance(config, str) else config
        self.embed_model = ImageEncoder(self.config)
        self.model = DenoisingUNet(self.config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of the (internally padded) image; reuse them across steps and samples."""
        check_image(self.config, image)
        padded, _ = pad_to_multiple(image)
        return self.embed_model(padded)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        image: torch.Tensor,
        embeddings: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_classes, H, W) of x0 from the noisy mask ``x_t`` at integer timesteps ``t``.

        ``embeddings`` (from :meth:`encode`, batch matching ``x_t``) skip the encoder pass.
        """
        x, t, pads = denoiser_input(self.config, x_t, t, image, embeddings)
        if embeddings is None:
            embeddings = self.embed_model(x[:, : self.config.in_channels])
        return crop_padding(self.model(x, t, embeddings), pads)


def check_image(config: NetworkConfig, image: torch.Tensor) -> None:
    """``image`` must be (B, in_channels, H, W) (one sentence otherwise)."""
    if image.ndim != 4 or image.shape[1] != config.in_channels:
        raise ValueError(f"image must be (B, {config.in_channels}, H, W), got {tuple(image.shape)}.")


def denoiser_input(
    config: NetworkConfig,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    image: torch.Tensor,
    embeddings: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The checked, padded denoiser input ``[image | x_t]``, timesteps as a (B,) tensor and the pads; shared by
    :class:`SpineSegDiffNet` and the ONNX Runtime engine (``model.engine``)."""
    check_image(config, image)
    c = config.num_classes
    if x_t.shape[1] != c or x_t.shape[0] != image.shape[0] or x_t.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"x_t must be (B, {c}, H, W) matching image {tuple(image.shape)}, got {tuple(x_t.shape)}."
        )
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    x, pads = pad_to_multiple(torch.cat([image, x_t.to(image.dtype)], dim=1))
    if embeddings is not None and (
        embeddings[0].shape[0] != x.shape[0] or embeddings[0].shape[-2:] != x.shape[-2:]
    ):
        raise ValueError(
            f"embeddings are for shape {tuple(embeddings[0].shape)}, but the padded input is "
            f"{tuple(x.shape)}; compute them with encode() on the same (repeated) image."
        )
    return x, t, pads


def build_network(config: NetworkConfig | str = "midl2025") -> SpineSegDiffNet:
    """A freshly initialised :class:`SpineSegDiffNet` for a config or preset name."""
    return SpineSegDiffNet(config)
