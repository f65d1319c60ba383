"""Scaled dot-product attention without a causal mask.

    out[b, h] = softmax(scale · q[b, h] · k[b, h]ᵀ) · v[b, h]

q: (B, H, N, D), k and v: (B, H, M, D), out: (B, H, N, D) in q's dtype, scale = D^-1/2 by default.
N and M may differ (cross-attention to 77 text tokens). Head dims from 32 to 512 are the kernels'
range: the SD VAE's mid-block attention is a single head of 512, which FlashAttention does not take.
Kernels use the flash (online-softmax) formulation in fp32 and never hold the N×M score matrix.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from ._checks import check_same_dtype_device, check_tensor

# The reference computes the scores in row blocks of at most this many fp32 entries (64 MB).
REFERENCE_SCORE_BLOCK = 1 << 24


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """fp32 softmax(scale·q·kᵀ)·v, a block of query rows at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[-2]
    rows = max(1, REFERENCE_SCORE_BLOCK // max(1, batch * heads * n_keys))
    keys_t = k.float().transpose(-1, -2)
    values = v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, n_queries, rows):
        scores = torch.matmul(q[..., start : start + rows, :].float(), keys_t) * scale
        out[..., start : start + rows, :] = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out.to(q.dtype)


attention_op = registry.define("attention", attention_reference)
attention_op.register_lazy("aten")
attention_op.register_lazy("triton")
attention_op.register_lazy("cuda")


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=(4,))
    check_same_dtype_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape (B, H, M, D), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q (B, H, N, D) and k (B, H, M, D) must agree on B, H and D, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k.shape[-2] == 0:
        raise ValueError("attention over zero keys (M = 0) is undefined")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, *, backend: Optional[str] = None
) -> torch.Tensor:
    """softmax(scale · q·kᵀ)·v; q (B, H, N, D), k/v (B, H, M, D) -> (B, H, N, D). See the module docstring."""
    check_attention_args(q, k, v)
    return attention_op(q, k, v, scale, backend=backend)
