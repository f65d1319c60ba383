"""The LoRA branch in Triton: device helpers shared by the GEMMs, and the feature-map epilogue of conv2d.

With A = ``down`` (r, Cin[, kh, kw]), B = ``up`` (Cout, r), M = ``mix`` (none, (r, r) shared or
(Batch, r, r) per sample) and t = A x the rank-r activations, the branch adds

    delta_b = scale · B · M_bᵀ · t_b                                      (Cout × r) · (r × pixels)

to the base output. :func:`mixed_up_tile` builds the (BLOCK_OUT, r) slice U = scale · B · M_bᵀ inside
a program (BLOCK_OUT·r² multiply-adds, negligible next to the tile's work), so no per-sample matrix
is ever built in memory. :func:`add_lora_to_feature_map` is one pass over a conv output: every
output element gets an r-long dot, which keeps the pass bandwidth-bound.

Dots: fp32 inputs (and everything under the interpreter) use exact fp32 products
(``input_precision="ieee"``); fp16/bf16 inputs use tensor-core dots in their own dtype with fp32
accumulation. The rank is padded to ``rank_block(r)`` = max(16, next power of two) because a dot
needs every side >= 16; the padding is masked to zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ...ops.lora import LoRA


def rank_block(rank: int) -> int:
    """The padded rank of the in-kernel LoRA dots: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(rank))


def fp32_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels use exact fp32 dots: fp32 data, or any data under the interpreter."""
    return dtype == torch.float32 or interpreting()


def mix_arguments(lora: LoRA, fallback: torch.Tensor):
    """(mix tensor, batch stride, row stride, column stride) for the kernels; stride 0 shares one M.

    ``fallback`` stands in for the pointer when there is no mix (the kernel never reads it).
    """
    mix = lora.mix
    if mix is None:
        return fallback, 0, 0, 0
    if mix.dim() == 2:
        return mix, 0, mix.stride(0), mix.stride(1)
    return mix, mix.stride(0), mix.stride(1), mix.stride(2)


@triton.jit
def lora_dot(a, b, acc, FP32_DOTS: tl.constexpr):
    """acc + a (M, K) · b (K, N), acc fp32; exact fp32 products when FP32_DOTS, else a and b must
    already hold the low-precision dtype and the product runs on tensor cores."""
    if FP32_DOTS:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def mixed_up_tile(up_ptr, mix_ptr, offs_out, out_mask, rank, scale,
                  stride_up_out, stride_up_r, stride_mix_row, stride_mix_col,
                  HAS_MIX: tl.constexpr, BLOCK_R: tl.constexpr):
    """U = scale · B[offs_out] · Mᵀ as an fp32 (BLOCK_OUT, BLOCK_R) tile; columns >= rank are zero.

    ``mix_ptr`` already points at this sample's M (or the shared one).
    """
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    # up: (BLOCK_OUT, BLOCK_R) = B[offs_out, :r]
    up = tl.load(up_ptr + offs_out[:, None] * stride_up_out + offs_r[None, :] * stride_up_r,
                 mask=out_mask[:, None] & r_mask[None, :], other=0.0)
    if HAS_MIX:
        # mix_t: (BLOCK_R, BLOCK_R), mix_t[j, k] = M[k, j]
        mix_t = tl.load(mix_ptr + offs_r[None, :] * stride_mix_row + offs_r[:, None] * stride_mix_col,
                        mask=r_mask[:, None] & r_mask[None, :], other=0.0)
        # NOTE: B·Mᵀ is a tiny (BLOCK_OUT × r × r) product: exact fp32 keeps the mix from adding a
        # rounding before U is rounded once to the data's dtype for the big dot.
        u = tl.dot(up.to(tl.float32), mix_t.to(tl.float32), input_precision="ieee")
    else:
        u = up.to(tl.float32)
    return u * scale


@triton.jit
def _lora_feature_map_kernel(
    base_ptr, t_ptr, y_ptr, up_ptr, mix_ptr,
    channels, pixels, rank, scale,
    stride_base_b, stride_base_c, stride_base_p,
    stride_t_b, stride_t_r, stride_t_p,
    stride_y_b, stride_y_c, stride_y_p,
    stride_up_c, stride_up_r,
    stride_mix_b, stride_mix_row, stride_mix_col,
    HAS_MIX: tl.constexpr, FP32_DOTS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[b, c, p] = base[b, c, p] + Σ_k U_b[c, k] · t[b, k, p],  U_b = scale · B · M_bᵀ.

    Grid: (cdiv(channels, BLOCK_C) · cdiv(pixels, BLOCK_P), Batch); the channel block varies
    fastest so that the programs sharing a t tile run together and find it in L2.
    """
    pid = tl.program_id(0)
    num_c_blocks = tl.cdiv(channels, BLOCK_C)
    pid_c = pid % num_c_blocks
    pid_p = pid // num_c_blocks
    pid_b = tl.program_id(1).to(tl.int64)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    c_mask = offs_c < channels
    p_mask = offs_p < pixels

    # u: (BLOCK_C, BLOCK_R)
    u = mixed_up_tile(up_ptr, mix_ptr + pid_b * stride_mix_b, offs_c, c_mask, rank, scale,
                      stride_up_c, stride_up_r, stride_mix_row, stride_mix_col, HAS_MIX, BLOCK_R)
    # t: (BLOCK_R, BLOCK_P)
    t = tl.load(t_ptr + pid_b * stride_t_b + offs_r[:, None] * stride_t_r + offs_p[None, :] * stride_t_p,
                mask=(offs_r < rank)[:, None] & p_mask[None, :], other=0.0)
    tile_mask = c_mask[:, None] & p_mask[None, :]
    base = tl.load(base_ptr + pid_b * stride_base_b + offs_c[:, None] * stride_base_c + offs_p[None, :] * stride_base_p,
                   mask=tile_mask, other=0.0).to(tl.float32)
    if FP32_DOTS:
        out = lora_dot(u, t, base, FP32_DOTS)
    else:
        out = lora_dot(u.to(t.dtype), t, base, FP32_DOTS)
    tl.store(y_ptr + pid_b * stride_y_b + offs_c[:, None] * stride_y_c + offs_p[None, :] * stride_y_p,
             out.to(y_ptr.dtype.element_ty), mask=tile_mask)


def _feature_map_blocks() -> tuple:
    """(BLOCK_C, BLOCK_P, num_warps): 64 × 128 tiles on a GPU, 32 × 64 under the interpreter."""
    if interpreting():
        return 32, 64, 4
    return 64, 128, 4


def add_lora_to_feature_map(base: torch.Tensor, t: torch.Tensor, lora: LoRA, out: torch.Tensor) -> torch.Tensor:
    """out = base + scale · B · M_bᵀ · t_b, one Triton pass; returns ``out``.

    base, out: (Batch, Cout, H, W) in any layout whose (H, W) flatten to one stride (NCHW,
    channels_last; ``out`` may be ``base`` for an in-place update); t: (Batch, r, H, W).
    """
    batch, channels = base.shape[:2]
    # *_flat: (Batch, C, H·W), views for NCHW and channels_last
    base_flat, t_flat, out_flat = base.flatten(2), t.flatten(2), out.flatten(2)
    if out.numel() and out_flat.data_ptr() != out.data_ptr():
        raise ValueError("the LoRA epilogue's output must flatten its (H, W) dims without a copy")
    pixels = base_flat.shape[2]
    up = lora.up
    mix, stride_mix_b, stride_mix_row, stride_mix_col = mix_arguments(lora, up)
    block_c, block_p, num_warps = _feature_map_blocks()
    grid = (triton.cdiv(channels, block_c) * triton.cdiv(pixels, block_p), batch)
    _lora_feature_map_kernel[grid](
        base_flat, t_flat, out_flat, up, mix,
        channels, pixels, lora.rank, float(lora.scale),
        *base_flat.stride(), *t_flat.stride(), *out_flat.stride(),
        up.stride(0), up.stride(1),
        stride_mix_b, stride_mix_row, stride_mix_col,
        HAS_MIX=lora.mix is not None, FP32_DOTS=fp32_dots(out.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_R=rank_block(lora.rank),
        num_warps=num_warps,
    )
    return out
