"""Attention and feed-forward layers of the SD UNet transformer and the VAE mid block (diffusers key names)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from .layers import GroupNorm, Linear


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·D) -> (B, heads, N, D), a view."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, D) -> (B, N, heads·D); a view when the kernel wrote (B, N, heads, D) memory."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def residual_add(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x + out in x's memory format; out may be an NCHW view of token-major (channels_last) data.

    NOTE: an elementwise op takes its output layout from the first operand whose strides decide it, so
    x goes first and the sum comes out NCHW-contiguous without a separate copy of out.
    """
    return x + out


class Attention(nn.Module):
    """Multi-head attention, self or cross: to_out(softmax(q·kᵀ/√D)·v).

        q = x·Wqᵀ,  k = c·Wkᵀ,  v = c·Wvᵀ  (c = context, or x for self-attention)

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim). :func:`flashstep.ops.attention`
    forms the scores and the softmax in fp32 (flash formulation), which is what diffusers'
    ``upcast_attention`` asks for, so that flag needs nothing here.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # (B, h, N, D)
        k = split_heads(self.to_k(context), self.heads)  # (B, h, M, D)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out[0](merge_heads(ops.attention(q, k, v)))


class GEGLU(nn.Module):
    """``proj`` (in -> 2·inner) with the gate fused: h · gelu(g), [h, g] = proj(x); (..., in) -> (..., inner)."""

    def __init__(self, in_features: int, inner_features: int):
        super().__init__()
        self.proj = GEGLUProjection(in_features, 2 * inner_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GEGLUProjection(Linear):
    """The Linear of a GEGLU whose forward is :func:`flashstep.ops.geglu` (a LoRA host like any Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.geglu(x, self.weight, self.bias, lora=self.active_lora())


class FeedForward(nn.Module):
    """net.2(GEGLU(x)) with inner = mult · dim: (B, N, dim) -> (B, N, dim).

    ``net`` keeps diffusers' indices: 0 the GEGLU, 1 its (inference no-op) dropout, 2 the output Linear.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: one head over all pixels, GroupNorm first, residual after.

        t = group_norm(x) as tokens (B, H·W, C)
        y = x + to_out(softmax(q·kᵀ/√C)·v),  q, k, v = t·Wᵀ + b

    x: (B, C, H, W) -> (B, C, H, W). The single head of C = 512 is why ops.attention takes head dims to 512.
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # NOTE: one copy to token-major rows here; the three projections would each copy the strided view.
        tokens = self.group_norm(x).flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        q = self.to_q(tokens).unsqueeze(1)  # (B, 1, HW, C)
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = self.to_out[0](ops.attention(q, k, v).squeeze(1))  # (B, HW, C)
        return residual_add(x, out.transpose(1, 2).view(batch, channels, height, width))
