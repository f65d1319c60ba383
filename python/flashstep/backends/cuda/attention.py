"""attention on our CUDA kernel (kernels/attention.cu): flash forward, online softmax in fp32.

    out[b, h] = softmax(scale · q[b, h] · k[b, h]ᵀ) · v[b, h]

q: (B, H, N, D), k and v: (B, H, M, D), out: (B, H, N, D) in q's dtype, scale = D^-1/2 by default;
D from 1 to 512, N != M allowed. fp16 and bf16 run on tensor cores (mma.sync, fp32 accumulation);
fp32 runs in plain fp32 FMA arithmetic (no TF32). Needs compute capability 8.0 or newer.

Layout: the kernel takes any batch, head and row strides, so permuted views such as (B, N, H, D)
storage run without a copy. It needs a contiguous last dim and, for fp16/bf16, a head dim, strides
and base addresses that are multiples of 8 elements and 16 bytes (its shared-memory tiles are filled
with 16-byte copies). An input that breaks this is copied into a fresh contiguous tensor first, its
head dim zero-padded to a multiple of 8 for fp16/bf16 (zero columns add nothing to q·kᵀ, and the
output's padded columns are dropped).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ... import _native
from . import tensors_on_cuda

# kernels/attention.cuh: kAttentionMaxHeadDim and kAttentionLowPrecisionAlignment.
MAX_HEAD_DIM = 512
LOW_PRECISION_ALIGNMENT = 8
MAX_BATCH_OR_HEADS = 65535  # grid.z and grid.y of the launch
MIN_COMPUTE_CAPABILITY = (8, 0)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> Optional[str]:
    reason = tensors_on_cuda(q, k, v)
    if reason is not None:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if max(q.shape[0], q.shape[1]) > MAX_BATCH_OR_HEADS:
        return f"batch {q.shape[0]} or heads {q.shape[1]} > {MAX_BATCH_OR_HEADS}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.0 (the kernel uses mma.sync and cp.async)"
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    low_precision = q.dtype != torch.float32
    kernel_dim = _round_up(head_dim, LOW_PRECISION_ALIGNMENT) if low_precision else head_dim
    q, k, v = (_kernel_operand(t, kernel_dim, low_precision) for t in (q, k, v))
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    out = torch.empty((batch, heads, q_len, kernel_dim), dtype=q.dtype, device=q.device)
    if out.numel() > 0:
        with torch.cuda.device(q.device):
            _native.module().attention_forward(
                q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                out.data_ptr(), _strides(out),
                batch, heads, q_len, kv_len, kernel_dim, scale,
                _native.dtype_code(q.dtype), torch.cuda.current_stream(q.device).cuda_stream,
            )
    return out if kernel_dim == head_dim else out[..., :head_dim].contiguous()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, head, row) strides in elements; 0 for a dim of size 1, whose stride is never used."""
    return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape[:3], t.stride()[:3]))


def _kernel_operand(t: torch.Tensor, kernel_dim: int, low_precision: bool) -> torch.Tensor:
    """t itself when the kernel can read it, else a fresh contiguous copy with kernel_dim columns."""
    if t.shape[-1] != kernel_dim:
        return F.pad(t, (0, kernel_dim - t.shape[-1])).contiguous()
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    if low_precision and (
        t.data_ptr() % 16 != 0 or any(stride % LOW_PRECISION_ALIGNMENT for stride in _strides(t))
    ):
        return t.clone(memory_format=torch.contiguous_format)
    return t
