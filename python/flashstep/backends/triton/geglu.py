"""geglu: the GEGLU projection as one Triton GEMM that writes only the gated product.

    h = x · W_hᵀ + bias_h + t · U_hᵀ,   g = x · W_gᵀ + bias_g + t · U_gᵀ,   y = h · gelu(g)
    gelu(g) = g · ½ · (1 + erf(g / √2))   (exact)

x (Batch, ..., K), W (2·inner, K) with W_h = W[:inner] and W_g = W[inner:], y (Batch, ..., inner);
the LoRA (A (r, K), B (2·inner, r), M) gives t = x · Aᵀ and U = scale · B · M_bᵀ split the same way.

A program computes the same BLOCK_N columns j of h and of g (rows j and inner + j of W) from one
pass over x, with t accumulated in the same K loop, and stores only h · gelu(g): the (..., 2·inner)
projection never reaches memory. Grid and tile order as :mod:`~flashstep.backends.triton.linear`;
BLOCK_N is capped at 128 since each program holds two accumulators. One 32 × 32 × 32 config under
the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import gemm_configs, lora_arguments, prune_gemm_configs, rows_by_sample, tile_indices
from .linear import why_not as linear_why_not
from .lora_epilogue import fp32_dots, lora_dot, mixed_up_tile, rank_block

SQRT_HALF = tl.constexpr(0.7071067811865476)


@triton.jit
def _add_lora_and_bias(acc, t, bias_ptr, up_ptr, mix_ptr, offs_n, n_mask, rank, scale,
                       stride_up_n, stride_up_r, stride_mix_row, stride_mix_col,
                       HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MIX: tl.constexpr,
                       FP32_DOTS: tl.constexpr, BLOCK_R: tl.constexpr, LOW_DTYPE: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) + bias[offs_n] + t · (scale · B[offs_n] · Mᵀ)ᵀ."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        u = mixed_up_tile(up_ptr, mix_ptr, offs_n, n_mask, rank, scale,
                          stride_up_n, stride_up_r, stride_mix_row, stride_mix_col, HAS_MIX, BLOCK_R)
        if FP32_DOTS:
            acc = lora_dot(t, tl.trans(u), acc, FP32_DOTS)
        else:
            acc = lora_dot(t.to(LOW_DTYPE), tl.trans(u.to(LOW_DTYPE)), acc, FP32_DOTS)
    return acc


@triton.autotune(configs=gemm_configs(max_block_n=128), key=["T", "N", "K", "HAS_LORA", "HAS_MIX"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.jit
def _geglu_kernel(
    x_ptr, w_h_ptr, w_g_ptr, bias_h_ptr, bias_g_ptr, down_ptr, up_h_ptr, up_g_ptr, mix_ptr, y_ptr,
    T, N, K, rank, scale,
    stride_x_b, stride_x_t, stride_x_k,
    stride_w_n, stride_w_k,
    stride_down_r, stride_down_k,
    stride_up_n, stride_up_r,
    stride_mix_b, stride_mix_row, stride_mix_col,
    stride_y_b, stride_y_t, stride_y_n,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MIX: tl.constexpr, FP32_DOTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[b, t, n] = h · gelu(g) with h, g the projections through rows n and inner + n (N = inner)."""
    pid_m, pid_n = tile_indices(T, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < T
    n_mask = offs_n < N

    # x_ptrs: (BLOCK_M, BLOCK_K); w_*_ptrs: (BLOCK_K, BLOCK_N) = W_*ᵀ; down_ptrs: (BLOCK_K, BLOCK_R) = Aᵀ
    x_ptrs = x_ptr + pid_b * stride_x_b + offs_m[:, None] * stride_x_t + offs_k[None, :] * stride_x_k
    w_offsets = offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    w_h_ptrs = w_h_ptr + w_offsets
    w_g_ptrs = w_g_ptr + w_offsets
    down_ptrs = down_ptr + offs_r[None, :] * stride_down_r + offs_k[:, None] * stride_down_k
    hidden = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        w_mask = k_mask[:, None] & n_mask[None, :]
        x_tile = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        hidden = lora_dot(x_tile, tl.load(w_h_ptrs, mask=w_mask, other=0.0), hidden, FP32_DOTS)
        gate = lora_dot(x_tile, tl.load(w_g_ptrs, mask=w_mask, other=0.0), gate, FP32_DOTS)
        if HAS_LORA:
            down_tile = tl.load(down_ptrs, mask=k_mask[:, None] & (offs_r < rank)[None, :], other=0.0)
            t = lora_dot(x_tile, down_tile, t, FP32_DOTS)
        x_ptrs += BLOCK_K * stride_x_k
        w_h_ptrs += BLOCK_K * stride_w_k
        w_g_ptrs += BLOCK_K * stride_w_k
        down_ptrs += BLOCK_K * stride_down_k

    low = y_ptr.dtype.element_ty
    mix_b_ptr = mix_ptr + pid_b * stride_mix_b
    hidden = _add_lora_and_bias(hidden, t, bias_h_ptr, up_h_ptr, mix_b_ptr, offs_n, n_mask, rank, scale,
                                stride_up_n, stride_up_r, stride_mix_row, stride_mix_col,
                                HAS_BIAS, HAS_LORA, HAS_MIX, FP32_DOTS, BLOCK_R, low)
    gate = _add_lora_and_bias(gate, t, bias_g_ptr, up_g_ptr, mix_b_ptr, offs_n, n_mask, rank, scale,
                              stride_up_n, stride_up_r, stride_mix_row, stride_mix_col,
                              HAS_BIAS, HAS_LORA, HAS_MIX, FP32_DOTS, BLOCK_R, low)
    out = hidden * (0.5 * gate * (1.0 + tl.erf(gate * SQRT_HALF)))

    y_ptrs = y_ptr + pid_b * stride_y_b + offs_m[:, None] * stride_y_t + offs_n[None, :] * stride_y_n
    tl.store(y_ptrs, out.to(low), mask=m_mask[:, None] & n_mask[None, :])


def why_not(x, weight, bias, lora):
    return linear_why_not(x, weight, bias, lora)


def forward(x, weight, bias, lora):
    inner, in_features = weight.shape[0] // 2, weight.shape[1]
    y = torch.empty(x.shape[:-1] + (inner,), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    per_sample = lora is not None and lora.per_sample
    # x3: (Batch or 1, T, K); y3: (Batch or 1, T, inner)
    x3, y3 = rows_by_sample(x, per_sample), rows_by_sample(y, per_sample)
    down, up, mix, rank, scale, down_strides, up_strides, mix_strides = lora_arguments(lora, weight)
    bias_h, bias_g = (weight, weight) if bias is None else (bias[:inner], bias[inner:])
    tokens = x3.shape[1]

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]) * triton.cdiv(inner, meta["BLOCK_N"]), x3.shape[0])

    _geglu_kernel[grid](
        x3, weight[:inner], weight[inner:], bias_h, bias_g, down, up[:inner], up[inner:], mix, y3,
        tokens, inner, in_features, rank, scale,
        *x3.stride(), *weight.stride(), *down_strides, *up_strides, *mix_strides, *y3.stride(),
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None, HAS_MIX=lora is not None and lora.mix is not None,
        FP32_DOTS=fp32_dots(x.dtype), BLOCK_R=rank_block(rank),
    )
    return y
