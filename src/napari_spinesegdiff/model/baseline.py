"""Baseline segmenter (the presegmentation prior): a plain 2-D MONAI BasicUNet with sigmoid outputs."""

from __future__ import annotations

import torch
from torch import nn

from .network import NetworkConfig, crop_padding, pad_to_multiple, preset


class BaselineNet(nn.Module):
    """``forward(image) -> logits`` (B, num_classes, H, W); any H, W (padded inside like the diffusion net).

    Multi-label like the diffusion model: one sigmoid per class.  Saved with ``kind="baseline"``.
    """

    def __init__(self, config: NetworkConfig | str = "small") -> None:
        from monai.networks.nets import BasicUNet

        super().__init__()
        self.config = preset(config) if isinstance(config, str) else config
        c = self.config
        self.unet = BasicUNet(
            spatial_dims=2,
            in_channels=c.in_channels,
            out_channels=c.num_classes,
            features=c.features,
            act=c.act,
            norm=c.norm,
            dropout=c.dropout,
            upsample=c.upsample,
        )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"image must be (B, {self.config.in_channels}, H, W), got {tuple(image.shape)}.")
        padded, pads = pad_to_multiple(image)
        return crop_padding(self.unet(padded), pads)


def predict_prior(baseline: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, C, H, W) = sigmoid(baseline(image)), without autograd."""
    with torch.inference_mode():
        return torch.sigmoid(baseline(image))
