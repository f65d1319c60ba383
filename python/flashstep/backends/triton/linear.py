"""linear: a Triton GEMM with the bias and the LoRA branch fused.

    y = x · Wᵀ + bias + (x · Aᵀ) · (scale · B · M_bᵀ)ᵀ

x (Batch, ..., K) -> y (Batch, ..., N); W (N, K), A (r, K), B (N, r), M none, (r, r) or (Batch, r, r).

One program owns a BLOCK_M × BLOCK_N tile of y. Its K loop accumulates x·Wᵀ and the rank-r
product t = x·Aᵀ (BLOCK_M × r) from the same x tiles, so x is read once for both; the epilogue adds
the bias and t · Uᵀ with U = scale · B[tile] · M_bᵀ (:func:`~.lora_epilogue.mixed_up_tile`).
The price of the fusion is that every N tile recomputes its rows' t: r/BLOCK_N more MMA work
(12-25 % at r = 32), against a second GEMM launch and a round trip of t through memory.

Grid: (cdiv(T, BLOCK_M) · cdiv(N, BLOCK_N), Batch) where x is viewed as (Batch, T, K): per sample
when M is per sample (so a tile never straddles two samples' M), else as one (1, Batch·..., K)
matrix. Tiles are visited in groups of GROUP_M row blocks for L2 reuse of W. Blocks: autotuned
over 64-128 × 64-256 × 32-64 tiles on a GPU; one 32 × 32 × 32 config under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, tensors_on_supported_device
from .lora_epilogue import fp32_dots, lora_dot, mix_arguments, mixed_up_tile, rank_block

MAX_GRID_BATCH = 65535


def gemm_configs(max_block_n: int = 256):
    """Autotune configs for the LoRA GEMMs (linear, geglu); one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in shapes
        if n <= max_block_n
    ]


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drop the large tiles for fp32 data: exact fp32 dots run on FMA units, where 128 × 256 tiles
    only add registers and compile time."""
    if not kwargs.get("FP32_DOTS", named_args.get("FP32_DOTS")):
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 and c.kwargs["BLOCK_K"] <= 32]
    return small or configs[-1:]


@triton.jit
def tile_indices(T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program_id(0), walking GROUP_M row blocks per column block for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.autotune(configs=gemm_configs(), key=["T", "N", "K", "HAS_LORA", "HAS_MIX"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, mix_ptr, y_ptr,
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
    """y[b, t, n] = Σ_k x[b, t, k] W[n, k] + bias[n] + Σ_j (Σ_k x[b, t, k] A[j, k]) U_b[n, j]."""
    pid_m, pid_n = tile_indices(T, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < T
    n_mask = offs_n < N

    # x_ptrs: (BLOCK_M, BLOCK_K); w_ptrs: (BLOCK_K, BLOCK_N) = Wᵀ; down_ptrs: (BLOCK_K, BLOCK_R) = Aᵀ
    x_ptrs = x_ptr + pid_b * stride_x_b + offs_m[:, None] * stride_x_t + offs_k[None, :] * stride_x_k
    w_ptrs = w_ptr + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    down_ptrs = down_ptr + offs_r[None, :] * stride_down_r + offs_k[:, None] * stride_down_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = lora_dot(x_tile, w_tile, acc, FP32_DOTS)
        if HAS_LORA:
            down_tile = tl.load(down_ptrs, mask=k_mask[:, None] & (offs_r < rank)[None, :], other=0.0)
            t = lora_dot(x_tile, down_tile, t, FP32_DOTS)
        x_ptrs += BLOCK_K * stride_x_k
        w_ptrs += BLOCK_K * stride_w_k
        down_ptrs += BLOCK_K * stride_down_k

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        # u: (BLOCK_N, BLOCK_R) = scale · B[offs_n] · M_bᵀ
        u = mixed_up_tile(up_ptr, mix_ptr + pid_b * stride_mix_b, offs_n, n_mask, rank, scale,
                          stride_up_n, stride_up_r, stride_mix_row, stride_mix_col, HAS_MIX, BLOCK_R)
        if FP32_DOTS:
            acc = lora_dot(t, tl.trans(u), acc, FP32_DOTS)
        else:
            low = y_ptr.dtype.element_ty
            acc = lora_dot(t.to(low), tl.trans(u.to(low)), acc, FP32_DOTS)

    y_ptrs = y_ptr + pid_b * stride_y_b + offs_m[:, None] * stride_y_t + offs_n[None, :] * stride_y_n
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def rows_by_sample(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """x (Batch, ..., K) as (Batch, T, K) when the LoRA mix is per sample, else as (1, rows, K)."""
    if per_sample:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return x.reshape(1, -1, x.shape[-1])


def lora_arguments(lora, weight: torch.Tensor) -> tuple:
    """(down, up, mix, rank, scale, down strides, up strides, mix strides) for the GEMM kernels;
    ``weight`` stands in for the pointers a missing LoRA leaves unread."""
    if lora is None:
        return (weight, weight, weight, 0, 0.0, (0, 0), (0, 0), (0, 0, 0))
    mix, stride_mix_b, stride_mix_row, stride_mix_col = mix_arguments(lora, lora.up)
    return (lora.down, lora.up, mix, lora.rank, float(lora.scale), lora.down.stride(), lora.up.stride(),
            (stride_mix_b, stride_mix_row, stride_mix_col))


def why_not(x, weight, bias, lora):
    tensors = (x, weight, bias) if lora is None else (x, weight, bias, lora.down, lora.up, lora.mix)
    reason = tensors_on_supported_device(*tensors)
    if reason is not None:
        return reason
    if lora is not None and lora.per_sample and x.shape[0] > MAX_GRID_BATCH:
        return f"batch {x.shape[0]} > {MAX_GRID_BATCH} with a per-sample LoRA (one grid row per sample)"
    return None


def forward(x, weight, bias, lora):
    out_features, in_features = weight.shape
    y = torch.empty(x.shape[:-1] + (out_features,), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    per_sample = lora is not None and lora.per_sample
    # x3: (Batch or 1, T, K); y3: (Batch or 1, T, N)
    x3, y3 = rows_by_sample(x, per_sample), rows_by_sample(y, per_sample)
    down, up, mix, rank, scale, down_strides, up_strides, mix_strides = lora_arguments(lora, weight)
    tokens = x3.shape[1]

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]), x3.shape[0])

    _linear_kernel[grid](
        x3, weight, weight if bias is None else bias, down, up, mix, y3,
        tokens, out_features, in_features, rank, scale,
        *x3.stride(), *weight.stride(), *down_strides, *up_strides, *mix_strides, *y3.stride(),
        HAS_BIAS=bias is not None, HAS_LORA=lora is not None, HAS_MIX=lora is not None and lora.mix is not None,
        FP32_DOTS=fp32_dots(x.dtype), BLOCK_R=rank_block(rank),
    )
    return y
