"""The residual block and the 2× resamplers shared by the SD UNet and VAE (diffusers key names)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, GroupNorm, Linear


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm, "default" time embedding, output scale 1).

        h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))[:, :, None, None]]
        y = conv2(silu(norm2(h))) + shortcut(x),   shortcut = 1×1 conv when channels change

    x: (B, Cin, H, W) -> (B, Cout, H, W). ``temb_act`` is silu(temb), (B, temb_channels): the UNet
    computes it once for all its blocks. The VAE's blocks have no time embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x, activation="silu"))
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.norm2(h, activation="silu"))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)


class Downsample2D(nn.Module):
    """3×3 conv with stride 2: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉).

    padding 1 in the UNet; padding 0 in the VAE encoder, which first pads (0, 1, 0, 1) (right and bottom).
    """

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.pad_right_bottom = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2× (or to ``size``, the skip connection's size for odd inputs), then a 3×3 conv.

    (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
