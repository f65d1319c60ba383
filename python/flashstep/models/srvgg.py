"""SRVGGNetCompact, Real-ESRGAN's compact net (realesr-general-x4v3, realesr-animevideov3).

    f = PReLU_0(conv_0(x));  f = PReLU_i(conv_i(f)) for i = 1 … num_conv
    y = pixel_shuffle_s(conv_last(f)) + nearest×s(x)

x: (B, C, H, W) -> y: (B, C, H·s, W·s); every conv is 3×3, stride 1, padding 1; conv_last has C·s² outputs.
The last conv, the shuffle and the residual run as one :func:`flashstep.ops.conv2d_pixel_shuffle`.
Keys ``body.{2i}.weight/bias`` (convs) and ``body.{2i+1}.weight`` (PReLU slopes, one per channel), as
in the released files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import Conv2d
from .sr_base import SRNet


@dataclass(frozen=True)
class SRVGGConfig:
    """Hyper-parameters; the nearest-upsampled input is the residual, so output channels = input channels."""

    in_channels: int = 3
    num_feat: int = 64
    num_conv: int = 16
    scale: int = 4

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_feat", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"SRVGGConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_conv < 0:
            raise ValueError(f"SRVGGConfig.num_conv must be >= 0, got {self.num_conv}")


PRESETS = {
    "realesr-general-x4v3": SRVGGConfig(num_conv=32),
    "realesr-animevideov3": SRVGGConfig(num_conv=16),
}


class SRVGGNetCompact(SRNet):
    """See the module docstring."""

    supports_fp16 = True
    supports_bf16 = True

    def __init__(self, config: SRVGGConfig = SRVGGConfig()):
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.input_channels = self.output_channels = config.in_channels
        feat = config.num_feat
        layers = [Conv2d(config.in_channels, feat, 3, 1, 1), nn.PReLU(feat)]
        for _ in range(config.num_conv):
            layers += [Conv2d(feat, feat, 3, 1, 1), nn.PReLU(feat)]
        layers.append(Conv2d(feat, config.in_channels * config.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        feat = x
        for layer in self.body[:-1]:
            feat = layer(feat)  # (B, nf, H, W)
        residual = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (B, C, H·s, W·s)
        last = self.body[-1]
        return ops.conv2d_pixel_shuffle(feat, last.weight, last.bias, self.scale, residual=residual)
