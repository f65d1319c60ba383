"""S3Diff's degradation estimator (``DEResNet``, de_net.pth): two independent ResNet branches, one for blur
and one for noise, each ending in a sigmoid degree in (0, 1).

    branch i:  f = body_i(conv_first_i(x));  d_i = σ(W₂ · ReLU(W₁ · mean_hw(f) + b₁) + b₂)
    body_i = 6 × ResBlock(64), Conv 64→128 stride 2, 2 × ResBlock(128);  ResBlock(x) = x + conv2(ReLU(conv1(x)))

x: (B, 3, h, w) in [0, 1] (the low-resolution input, not upsampled) -> (B, 2) = [blur, noise].
Keys as in the released file: ``conv_first.{i}``, ``body.{i}.{j}.conv1/conv2`` (j = 0..5, 7, 8),
``body.{i}.6`` (the strided conv), ``fc_degree.{i}.0`` and ``fc_degree.{i}.2``.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Conv2d, Linear


class ResidualBlockNoBN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


def _branch_body() -> nn.Sequential:
    blocks = [ResidualBlockNoBN(64) for _ in range(6)]
    blocks.append(Conv2d(64, 128, 3, 2, 1))
    blocks.extend(ResidualBlockNoBN(128) for _ in range(2))
    return nn.Sequential(*blocks)


class DegradationHead(nn.Module):
    """Linear(128, 512) - ReLU - Linear(512, 1) - Sigmoid with the released indices 0 and 2."""

    def __init__(self, features: int = 128, hidden: int = 512):
        super().__init__()
        self.add_module("0", Linear(features, hidden))
        self.add_module("2", Linear(hidden, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(getattr(self, "2")(torch.relu(getattr(self, "0")(pooled))))


class DEResNet(nn.Module):
    """See the module docstring."""

    def __init__(self, in_channels: int = 3, num_degradations: int = 2):
        super().__init__()
        self.conv_first = nn.ModuleList(Conv2d(in_channels, 64, 3, 1, 1) for _ in range(num_degradations))
        self.body = nn.ModuleList(_branch_body() for _ in range(num_degradations))
        self.fc_degree = nn.ModuleList(DegradationHead() for _ in range(num_degradations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        degrees = []
        for conv_first, body, head in zip(self.conv_first, self.body, self.fc_degree):
            features = body(conv_first(x))
            degrees.append(head(features.mean(dim=(2, 3))).squeeze(-1))
        return torch.stack(degrees, dim=1)
