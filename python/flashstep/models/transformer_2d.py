"""The spatial transformer of the SD UNet: diffusers ``Transformer2DModel`` with ``BasicTransformerBlock``s."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, FeedForward, residual_add
from .layers import Conv2d, GroupNorm, Linear


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward, each residual.

        x = x + attn1(norm1(x));  x = x + attn2(norm2(x), context);  x = x + ff(norm3(x))

    x: (B, N, dim), context: (B, M, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in, ``depth`` transformer blocks over the H·W tokens, proj_out, + x.

    proj_in / proj_out are Linears (``use_linear_projection``, SD 2.x / XL) or 1×1 convs (SD 1.x).
    x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W), with C = heads · head_dim.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int, linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        projection = (lambda: Linear(channels, channels)) if linear_projection else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = projection()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = projection()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if self.linear_projection:
            tokens = self.proj_in(h.permute(0, 2, 3, 1).reshape(batch, height * width, channels))
        else:
            tokens = self.proj_in(h).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, HW, C)
        if self.linear_projection:
            out = self.proj_out(tokens).view(batch, height, width, channels).permute(0, 3, 1, 2)
        else:
            # NOTE: the 1×1 conv reads the tokens as a channels_last view; no NCHW copy is made first.
            out = self.proj_out(tokens.view(batch, height, width, channels).permute(0, 3, 1, 2))
        return residual_add(x, out)

