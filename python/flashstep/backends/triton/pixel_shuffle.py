"""pixel_shuffle, pixel_unshuffle and conv2d_pixel_shuffle in Triton.

Shuffles (exact copies, any input strides; the output is channels_last when the input is):

    big[b, c, h·r + i, w·r + j] = small[b, c·r² + i·r + j, h, w]
    small: (B, C·r², H, W),  big: (B, C, H·r, W·r)

One kernel moves data either way. A program owns one row of ``big`` and a BLOCK_C × BLOCK_W tile of
(channel, column) on it; the tile is long along whichever of the two is contiguous in the output.
Grid: (B · cdiv(C, BLOCK_C) · H·r · cdiv(W·r, BLOCK_W),), column blocks fastest.

conv2d_pixel_shuffle, the upscaling head:

    z[b, o, h, w] = bias[o] + Σ_{ci, dy, dx} W[o, ci, dy, dx] · x[b, ci, h + dy - kh//2, w + dx - kw//2]
    y[b, c, h·r + i, w·r + j] = act(z[b, c·r² + i·r + j, h, w]) + residual[b, c, h·r + i, w·r + j]

A direct implicit-GEMM convolution: a program owns BLOCK_P pixels × BLOCK_CO conv channels, loops
over the kh·kw taps and Cin in BLOCK_CI slices (zero padding through the load masks), and its
epilogue adds the bias, applies the activation and the residual and stores each value at its
shuffled place, so z (B, C·r², H, W) never reaches memory. Grid:
(cdiv(H·W, BLOCK_P) · cdiv(C·r², BLOCK_CO), B), channel blocks fastest so the programs that read the
same x tile run together. BLOCK_CO is C·r² rounded up to a power of two (at most 128);
BLOCK_P / BLOCK_CI / warps are autotuned on a GPU; 32 × 16 under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, tensors_on_supported_device
from ...ops._checks import same_memory_format
from .lora_epilogue import fp32_dots, lora_dot

MAX_GRID_BATCH = 65535
ACTIVATION_CODES = {None: 0, "relu": 1, "silu": 2, "leaky_relu": 3}


@triton.jit
def _shuffle_kernel(
    small_ptr, big_ptr,
    channels, big_height, big_width,
    stride_small_b, stride_small_c, stride_small_h, stride_small_w,
    stride_big_b, stride_big_c, stride_big_h, stride_big_w,
    FACTOR: tl.constexpr, TO_BIG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Copy one (BLOCK_C, BLOCK_W) tile of a ``big`` row from ``small`` (TO_BIG) or back."""
    pid = tl.program_id(0)
    num_w_blocks = tl.cdiv(big_width, BLOCK_W)
    num_c_blocks = tl.cdiv(channels, BLOCK_C)
    pid_w = pid % num_w_blocks
    big_row = ((pid // num_w_blocks) % big_height).to(tl.int64)
    pid_bc = pid // (num_w_blocks * big_height)
    pid_c = pid_bc % num_c_blocks
    batch = (pid_bc // num_c_blocks).to(tl.int64)

    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    big_col = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (offs_c < channels)[:, None] & (big_col < big_width)[None, :]
    sub_row = big_row % FACTOR
    sub_col = big_col % FACTOR
    # small_channel: (BLOCK_C, BLOCK_W) = c·r² + i·r + j
    small_channel = offs_c[:, None] * (FACTOR * FACTOR) + sub_row * FACTOR + sub_col[None, :]
    small_offsets = (batch * stride_small_b + small_channel * stride_small_c + (big_row // FACTOR) * stride_small_h
                     + (big_col // FACTOR)[None, :] * stride_small_w)
    big_offsets = (batch * stride_big_b + offs_c[:, None] * stride_big_c + big_row * stride_big_h
                   + big_col[None, :] * stride_big_w)
    if TO_BIG:
        tl.store(big_ptr + big_offsets, tl.load(small_ptr + small_offsets, mask=mask), mask=mask)
    else:
        tl.store(small_ptr + small_offsets, tl.load(big_ptr + big_offsets, mask=mask), mask=mask)


def _shuffle_blocks(big: torch.Tensor) -> tuple:
    """(BLOCK_C, BLOCK_W): ~2048-element tiles (512 interpreting), long along the output's contiguous dim."""
    channels, width = big.shape[1], big.shape[3]
    budget = 512 if interpreting() else 2048
    if big.stride(1) == 1 and channels > 1:
        block_c = min(triton.next_power_of_2(channels), budget)
        return block_c, max(1, min(triton.next_power_of_2(width), budget // block_c))
    block_w = min(triton.next_power_of_2(width), budget)
    return max(1, min(triton.next_power_of_2(channels), budget // block_w)), block_w


def _shuffle(small: torch.Tensor, big: torch.Tensor, factor: int, to_big: bool) -> None:
    batch, channels, big_height, big_width = big.shape
    if big.numel() == 0:
        return
    block_c, block_w = _shuffle_blocks(big)
    grid = (batch * triton.cdiv(channels, block_c) * big_height * triton.cdiv(big_width, block_w),)
    _shuffle_kernel[grid](
        small, big, channels, big_height, big_width, *small.stride(), *big.stride(),
        FACTOR=factor, TO_BIG=to_big, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=4,
    )


def why_not_pixel_shuffle(x, factor):
    return tensors_on_supported_device(x)


def why_not_pixel_unshuffle(x, factor):
    return tensors_on_supported_device(x)


def pixel_shuffle(x, factor):
    batch, channels, height, width = x.shape
    y = torch.empty((batch, channels // (factor * factor), height * factor, width * factor), dtype=x.dtype,
                    device=x.device, memory_format=same_memory_format(x))
    _shuffle(x, y, factor, to_big=True)
    return y


def pixel_unshuffle(x, factor):
    batch, channels, height, width = x.shape
    y = torch.empty((batch, channels * factor * factor, height // factor, width // factor), dtype=x.dtype,
                    device=x.device, memory_format=same_memory_format(x))
    _shuffle(y, x, factor, to_big=False)
    return y


def _head_configs():
    if interpreting():
        return [triton.Config({"BLOCK_P": 32, "BLOCK_CI": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_CI": ci}, num_warps=warps, num_stages=stages)
        for p, ci, warps, stages in [
            (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (256, 32, 8, 3), (64, 32, 4, 4),
        ]
    ]


@triton.autotune(configs=_head_configs(), key=["in_channels", "conv_channels", "KH", "KW", "FACTOR"])
@triton.jit
def _conv_pixel_shuffle_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, y_ptr,
    in_channels, height, width, conv_channels, negative_slope,
    stride_x_b, stride_x_c, stride_x_h, stride_x_w,
    stride_w_o, stride_w_i, stride_w_h, stride_w_w,
    stride_res_b, stride_res_c, stride_res_h, stride_res_w,
    stride_y_b, stride_y_c, stride_y_h, stride_y_w,
    KH: tl.constexpr, KW: tl.constexpr, FACTOR: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP32_DOTS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """One (BLOCK_P pixels, BLOCK_CO conv channels) tile of the head, stored shuffled."""
    pid = tl.program_id(0)
    num_co_blocks = tl.cdiv(conv_channels, BLOCK_CO)
    pid_co = pid % num_co_blocks
    pid_p = pid // num_co_blocks
    batch = tl.program_id(1).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = tl.arange(0, BLOCK_CI)
    p_mask = offs_p < height * width
    co_mask = offs_co < conv_channels
    row = offs_p // width
    col = offs_p % width

    x_batch_ptr = x_ptr + batch * stride_x_b
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for dy in tl.static_range(KH):
        for dx in tl.static_range(KW):
            src_row = row + (dy - KH // 2)
            src_col = col + (dx - KW // 2)
            inside = p_mask & (src_row >= 0) & (src_row < height) & (src_col >= 0) & (src_col < width)
            # pixel_offsets: (BLOCK_P,), clamped so masked lanes still form in-range addresses
            pixel_offsets = (tl.where(inside, src_row, 0).to(tl.int64) * stride_x_h
                             + tl.where(inside, src_col, 0).to(tl.int64) * stride_x_w)
            for ci0 in range(0, in_channels, BLOCK_CI):
                ci = ci0 + offs_ci
                ci_mask = ci < in_channels
                # x_tile: (BLOCK_P, BLOCK_CI); w_tile: (BLOCK_CI, BLOCK_CO) = W[:, :, dy, dx]ᵀ
                x_tile = tl.load(x_batch_ptr + pixel_offsets[:, None] + ci[None, :].to(tl.int64) * stride_x_c,
                                 mask=inside[:, None] & ci_mask[None, :], other=0.0)
                w_tile = tl.load(w_ptr + offs_co[None, :] * stride_w_o + ci[:, None] * stride_w_i
                                 + dy * stride_w_h + dx * stride_w_w,
                                 mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
                acc = lora_dot(x_tile, w_tile, acc, FP32_DOTS)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:
        acc = acc * tl.sigmoid(acc)
    elif ACTIVATION == 3:
        acc = tl.where(acc >= 0.0, acc, acc * negative_slope)

    # the shuffled destination of conv channel o at pixel (h, w): (o // r², h·r + i, w·r + j)
    out_channel = (offs_co // (FACTOR * FACTOR)).to(tl.int64)
    out_row = row[:, None] * FACTOR + ((offs_co // FACTOR) % FACTOR)[None, :]
    out_col = col[:, None] * FACTOR + (offs_co % FACTOR)[None, :]
    tile_mask = p_mask[:, None] & co_mask[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + batch * stride_res_b + out_channel[None, :] * stride_res_c
                           + out_row.to(tl.int64) * stride_res_h + out_col.to(tl.int64) * stride_res_w,
                           mask=tile_mask, other=0.0)
        acc += residual.to(tl.float32)
    y_offsets = (batch * stride_y_b + out_channel[None, :] * stride_y_c + out_row.to(tl.int64) * stride_y_h
                 + out_col.to(tl.int64) * stride_y_w)
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


def why_not_conv2d_pixel_shuffle(x, weight, bias, factor, activation, negative_slope, residual):
    reason = tensors_on_supported_device(x, weight, bias, residual)
    if reason is not None:
        return reason
    if x.shape[0] > MAX_GRID_BATCH:
        return f"batch {x.shape[0]} > {MAX_GRID_BATCH}"
    return None


def conv2d_pixel_shuffle(x, weight, bias, factor, activation, negative_slope, residual):
    batch, in_channels, height, width = x.shape
    conv_channels, _, kernel_h, kernel_w = weight.shape
    y = torch.empty((batch, conv_channels // (factor * factor), height * factor, width * factor), dtype=x.dtype,
                    device=x.device, memory_format=same_memory_format(x))
    if y.numel() == 0:
        return y
    block_co = max(16, min(128, triton.next_power_of_2(conv_channels)))
    pixels = height * width
    residual_strides = (0, 0, 0, 0) if residual is None else residual.stride()

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_P"]) * triton.cdiv(conv_channels, block_co), batch)

    _conv_pixel_shuffle_kernel[grid](
        x, weight, weight if bias is None else bias, y if residual is None else residual, y,
        in_channels, height, width, conv_channels, float(negative_slope),
        *x.stride(), *weight.stride(), *residual_strides, *y.stride(),
        KH=kernel_h, KW=kernel_w, FACTOR=factor, ACTIVATION=ACTIVATION_CODES[activation],
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, FP32_DOTS=fp32_dots(x.dtype),
        BLOCK_CO=block_co,
    )
    return y
