"""The blocks of the SD VAE encoder and decoder (diffusers class and key names); no time embedding.

Norms are GroupNorm(32, eps 1e-6) everywhere, each a :class:`flashstep.models.layers.GroupNorm`, whose
weights :class:`flashstep.runner.vae_tiling.TiledVAE` applies with whole-image statistics.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialSelfAttention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

VAE_NORM_EPS = 1e-6


class DownEncoderBlock2D(nn.Module):
    """``layers`` resnets, then pad (0, 1, 0, 1) + stride-2 conv unless last: (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, VAE_NORM_EPS)
             for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, single-head self-attention over all pixels, resnet: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, groups, VAE_NORM_EPS) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, VAE_NORM_EPS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpDecoderBlock2D(nn.Module):
    """``layers`` resnets, then nearest 2× + conv unless last: (B, Cin, h, w) -> (B, Cout, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, VAE_NORM_EPS)
             for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
