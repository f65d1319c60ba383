"""Timestep embeddings of the SD UNet: the sinusoidal projection and the two-layer MLP after it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                         max_period: float = 10000.0) -> torch.Tensor:
    """diffusers ``get_timestep_embedding`` in fp32: timesteps (N,) -> (N, dim).

        f_i = exp(-ln(max_period) · i / (dim/2 - freq_shift)),   i < dim/2
        e   = [sin(t·f), cos(t·f)]   ([cos, sin] when flip_sin_to_cos), zero-padded to an odd dim
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = timesteps.float()[:, None] * freqs[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_2(silu(linear_1(x))): (B, in) -> (B, out); diffusers ``TimestepEmbedding`` key names."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = Linear(in_features, out_features)
        self.linear_2 = Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
