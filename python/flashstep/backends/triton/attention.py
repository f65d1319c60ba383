"""attention as a flash-style Triton kernel: online softmax in fp32, the N×M scores never stored.

    out[b, h] = softmax(scale · q[b, h] · k[b, h]ᵀ) · v[b, h]

q: (B, H, N, D), k and v: (B, H, M, D), out: (B, H, N, D) in q's dtype; D from 1 to 512, N != M
allowed, any strides (every stride is a kernel argument, so no input is ever copied).

Per query block of BLOCK_M rows the kernel walks the keys in blocks of BLOCK_N and keeps, per row,
the running maximum m, the running denominator l and the unnormalised output acc (all fp32)::

    s     = scale · log2(e) · q · kᵀ                          (BLOCK_M, BLOCK_N), padded keys -> -inf
    m'    = max(m, rowmax(s))
    l     = l · 2^(m - m') + rowsum(2^(s - m'))
    acc   = acc · 2^(m - m') + 2^(s - m') · v
    out   = acc / l                                           after the last key block

(FlashAttention-2, Dao 2023; the exp2 form follows Triton's fused-attention tutorial.) The head dim
is padded to BLOCK_D = next power of two >= max(16, D) with masked loads: SD's 40, 80 and 160 run
as 64, 128 and 256, the VAE's single head of 512 as 512.

Grid: one program per (query block, batch·head), flattened on axis 0 with the query block fastest,
so that programs running together share one head's K and V in L2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting, tensors_on_supported_device
from ._utils import device_guard, dot_input_precision, dot_operands_in_fp32, next_power_of_2

MAX_HEAD_DIM = 512
LOG2_E = 1.4426950408889634

# Shared memory a block may use on an H100 is 227 KB; the tiles below keep Q and the staged K and V
# tiles under this, leaving the rest for the layout conversions Triton adds around the dots.
SHARED_MEMORY_BUDGET = 160 * 1024


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, num_queries, num_keys, num_query_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One (query block, batch·head): out rows [BLOCK_M·i, BLOCK_M·(i+1)) of one head.

    qk_scale = scale · log2(e), so that the softmax runs on exp2.
    """
    pid = tl.program_id(0)
    query_block = pid % num_query_blocks
    batch_head = pid // num_query_blocks
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key rows within a key block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim lanes, padded past HEAD_DIM
    m_mask = offs_m < num_queries
    d_mask = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)

    q_ptrs = q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        keys = start_n + offs_n
        n_mask = keys < num_keys
        # kᵀ is loaded transposed, (BLOCK_D, BLOCK_N), so that the score dot needs no permute.
        key_rows = keys.to(tl.int64)
        k_t_ptrs = k_base + offs_d[:, None] * stride_kd + key_rows[None, :] * stride_kn
        k_t = tl.load(k_t_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
        scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        scores = tl.where(n_mask[None, :], scores, float("-inf"))

        # NOTE: key 0 lies in the first block, so new_max is finite from the first step on and
        # 2^(-inf - new_max) = 0 discards the empty initial state.
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, 1)

        v_ptrs = v_base + key_rows[:, None] * stride_vn + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * correction[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch settings of :func:`attention_fwd`."""

    block_m: int  # query rows per program
    block_n: int  # key rows per step of the inner loop
    num_warps: int
    num_stages: int

    def shared_memory_bytes(self, block_d: int, element_size: int) -> int:
        """Q once, K and V once per pipeline stage: the shared memory the dots' operands take."""
        return (self.block_m * block_d + 2 * self.num_stages * self.block_n * block_d) * element_size


# (bytes per element, BLOCK_D) -> tiles. NOTE: chosen from Triton 3.8's compile for sm_90a and `ptxas -v`
# (register use, spills and shared memory at compile time, not timings: no GPU has run them yet), for
# contiguous inputs (unit head-dim stride, 16-aligned rows, so K and V stream through cp.async) and for
# strided views. fp16/bf16 dots run on wgmma: 128×64 up to D = 128 (112 / 163 registers, 64 / 96 KB),
# 64×32 at 256 (150, 96 KB), 64×16 with 16 warps at 512 (128, 128 KB), where the fp32 accumulator
# alone is 128 registers a thread at 8 warps and 64×32 spills. fp32 dots ("ieee") run on FMA units:
# 64×32 at D <= 64, 64×16 at 128, 32×16 above (at most 216 registers, 100 KB). None spills on
# contiguous inputs; strided views lose cp.async and spill a little at D = 512.
GPU_BLOCKS = {
    (2, 64): AttentionBlocks(128, 64, num_warps=8, num_stages=3),
    (2, 128): AttentionBlocks(128, 64, num_warps=8, num_stages=2),
    (2, 256): AttentionBlocks(64, 32, num_warps=8, num_stages=2),
    (2, 512): AttentionBlocks(64, 16, num_warps=16, num_stages=2),
    (4, 64): AttentionBlocks(64, 32, num_warps=8, num_stages=3),
    (4, 128): AttentionBlocks(64, 16, num_warps=8, num_stages=2),
    (4, 256): AttentionBlocks(32, 16, num_warps=8, num_stages=2),
    (4, 512): AttentionBlocks(32, 16, num_warps=8, num_stages=1),
}


def gpu_blocks(block_d: int, element_size: int) -> AttentionBlocks:
    """Tiles for a GPU launch from the padded head dim (16..512) and the input's bytes per element."""
    return GPU_BLOCKS[(element_size, max(64, block_d))]


def interpreter_blocks(num_queries: int) -> AttentionBlocks:
    """Small tiles for the interpreter: few programs, and key loops that cross block tails."""
    return AttentionBlocks(min(32, max(16, next_power_of_2(num_queries))), 32, num_warps=4, num_stages=1)


def head_dim_block(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def default_blocks(q: torch.Tensor) -> AttentionBlocks:
    if interpreting():
        return interpreter_blocks(q.shape[2])
    return gpu_blocks(head_dim_block(q.shape[3]), q.element_size())


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, blocks: AttentionBlocks) -> torch.Tensor:
    """Launch the kernel with the given tiles; out (B, H, N, D) keeps q's layout when q is dense."""
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    # NOTE: empty_like keeps q's strides for a dense q, so a (B, N, H, D) buffer viewed as
    # (B, H, N, D) gives an output that reshapes back to (B, N, H·D) without a copy.
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    num_query_blocks = triton.cdiv(num_queries, blocks.block_m)
    grid = (num_query_blocks * batch * heads,)
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, out,
            scale * LOG2_E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, num_queries, num_keys, num_query_blocks,
            HEAD_DIM=head_dim,
            BLOCK_D=head_dim_block(head_dim),
            BLOCK_M=blocks.block_m,
            BLOCK_N=blocks.block_n,
            DOT_FP32=dot_operands_in_fp32(q.dtype),
            INPUT_PRECISION=dot_input_precision(q.dtype),
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )
    return out


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None) -> torch.Tensor:
    """softmax(scale · q·kᵀ)·v; q (B, H, N, D), k/v (B, H, M, D) -> (B, H, N, D) in q's dtype."""
    return attention_fwd(q, k, v, scale, default_blocks(q))


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None):
    reason = tensors_on_supported_device(q, k, v)
    if reason is not None:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None
