"""The down, mid and up blocks of the SD UNet (diffusers class and key names).

Every block takes ``temb_act`` = silu(time embedding), (B, temb_channels). Down blocks return their
output and the skip tensors they emit (one per resnet, plus one after the downsampler); up blocks consume
as many skips, last first, concatenating each onto the channels before their resnet. Blocks without
attention take ``context`` too and ignore it, so the UNet drives every block alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer_2d import Transformer2DModel


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one UNet shares: time embedding width, norm groups and eps, attention layout."""

    temb_channels: int
    groups: int
    eps: float
    context_dim: int
    linear_projection: bool

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock2D:
        return ResnetBlock2D(in_channels, out_channels, self.temb_channels, self.groups, self.eps)

    def transformer(self, channels: int, heads: int, depth: int) -> Transformer2DModel:
        return Transformer2DModel(channels, heads, self.context_dim, depth, self.groups, self.linear_projection)


class DownBlock2D(nn.Module):
    """``layers`` resnets, then a stride-2 conv unless it is the last level: (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, layers: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [spec.resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=1)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb_act)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(nn.Module):
    """Like :class:`DownBlock2D` with a spatial transformer after every resnet."""

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, layers: int, add_downsample: bool,
                 heads: int, depth: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [spec.resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(layers)]
        )
        self.attentions = nn.ModuleList([spec.transformer(out_channels, heads, depth) for _ in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=1)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(x, temb_act), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, spatial transformer, resnet at the lowest resolution: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, spec: BlockSpec, channels: int, heads: int, depth: int):
        super().__init__()
        self.resnets = nn.ModuleList([spec.resnet(channels, channels), spec.resnet(channels, channels)])
        self.attentions = nn.ModuleList([spec.transformer(channels, heads, depth)])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb_act)
        return self.resnets[1](self.attentions[0](x, context), temb_act)


def _up_resnets(spec: BlockSpec, in_channels: int, prev_channels: int, out_channels: int, layers: int) -> nn.ModuleList:
    """Resnet i takes the running tensor (prev_channels for i = 0, else out) plus skip channels."""
    return nn.ModuleList(
        [
            spec.resnet((prev_channels if i == 0 else out_channels) + (in_channels if i == layers - 1 else out_channels),
                        out_channels)
            for i in range(layers)
        ]
    )


class UpBlock2D(nn.Module):
    """``layers`` resnets on [x, skip] concatenations, then nearest 2× + conv unless it is the last level."""

    def __init__(self, spec: BlockSpec, in_channels: int, prev_channels: int, out_channels: int, layers: int,
                 add_upsample: bool):
        super().__init__()
        self.resnets = _up_resnets(spec, in_channels, prev_channels, out_channels, layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor], temb_act: torch.Tensor,
                context: Optional[torch.Tensor] = None, upsample_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb_act)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """Like :class:`UpBlock2D` with a spatial transformer after every resnet."""

    def __init__(self, spec: BlockSpec, in_channels: int, prev_channels: int, out_channels: int, layers: int,
                 add_upsample: bool, heads: int, depth: int):
        super().__init__()
        self.resnets = _up_resnets(spec, in_channels, prev_channels, out_channels, layers)
        self.attentions = nn.ModuleList([spec.transformer(out_channels, heads, depth) for _ in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor], temb_act: torch.Tensor,
                context: torch.Tensor, upsample_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(torch.cat([x, skips.pop()], dim=1), temb_act), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
