"""pixel_shuffle, pixel_unshuffle and conv2d_pixel_shuffle on CUDA (kernels/pixel_shuffle.cu).

The shuffles are exact index gathers from x with any strides into a contiguous output that keeps x's
layout (channels_last stays channels_last). conv2d_pixel_shuffle is one direct convolution (tensor cores for
fp16/bf16, FMA for fp32) whose epilogue adds the bias, applies the activation and the residual, and stores
straight into the shuffled layout: the (B, C·r², H, W) intermediate never reaches memory.
"""
from __future__ import annotations

import torch

from ... import _native
from ...ops._checks import same_memory_format
from . import tensors_on_cuda

# The shuffle kernels index the output with 32-bit integers.
MAX_ELEMENTS = 2**31 - 1
# The fused head: kernels of 1 or 3 along each axis, r² output channels of one channel in a 64-wide tile,
# output-channel tiles · batch and pixel-row tiles of 8 on gridDim.z and gridDim.y.
HEAD_KERNEL_SIZES = (1, 3)
HEAD_MAX_FACTOR = 8
HEAD_TILE_CHANNELS = 64
HEAD_TILE_ROWS = 8
MAX_GRID_YZ = 65535
ACTIVATION_CODES = {None: 0, "relu": 1, "silu": 2, "leaky_relu": 3}


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _shuffle_why_not(x, output_elements: int):
    reason = tensors_on_cuda(x)
    if reason is not None:
        return reason
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    if x.numel() == 0:
        return "empty input"
    if output_elements > MAX_ELEMENTS:
        return f"{output_elements} output elements need 64-bit indexing"
    return None


def why_not_pixel_shuffle(x, factor):
    return _shuffle_why_not(x, x.numel())


def why_not_pixel_unshuffle(x, factor):
    return _shuffle_why_not(x, x.numel())


def _shuffle(function_name: str, x, factor, out_shape):
    memory_format = same_memory_format(x)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    with torch.cuda.device(x.device):
        getattr(_native.module(), function_name)(
            x.data_ptr(), y.data_ptr(), list(x.shape), list(x.stride()), factor,
            memory_format is torch.channels_last, _native.dtype_code(x.dtype), _stream(x.device),
        )
    return y


def pixel_shuffle(x, factor):
    batch, channels, height, width = x.shape
    out_shape = (batch, channels // (factor * factor), height * factor, width * factor)
    return _shuffle("pixel_shuffle_cuda", x, factor, out_shape)


def pixel_unshuffle(x, factor):
    batch, channels, height, width = x.shape
    out_shape = (batch, channels * factor * factor, height // factor, width // factor)
    return _shuffle("pixel_unshuffle_cuda", x, factor, out_shape)


def why_not_conv2d_pixel_shuffle(x, weight, bias, factor, activation, negative_slope, residual):
    reason = tensors_on_cuda(x, weight, bias, residual)
    if reason is not None:
        return reason
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    if x.numel() == 0:
        return "empty input"
    kernel_h, kernel_w = weight.shape[2:]
    if kernel_h not in HEAD_KERNEL_SIZES or kernel_w not in HEAD_KERNEL_SIZES:
        return f"kernel {kernel_h}x{kernel_w}: the fused head takes 1 or 3 along each axis"
    if factor > HEAD_MAX_FACTOR:
        return f"factor {factor} > {HEAD_MAX_FACTOR}"
    if activation not in ACTIVATION_CODES:
        return f"activation {activation!r}"
    squared = factor * factor
    tile_channels = (HEAD_TILE_CHANNELS // squared) * squared
    channel_tiles = -(-weight.shape[0] // tile_channels)
    if x.shape[0] * channel_tiles > MAX_GRID_YZ or -(-x.shape[2] // HEAD_TILE_ROWS) > MAX_GRID_YZ:
        return f"input {tuple(x.shape)} with {weight.shape[0]} output channels exceeds the launch grid"
    return None


def conv2d_pixel_shuffle(x, weight, bias, factor, activation, negative_slope, residual):
    memory_format = same_memory_format(x)
    x = x.contiguous(memory_format=memory_format)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format)
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    y = torch.empty(
        (batch, out_channels // (factor * factor), height * factor, width * factor),
        dtype=x.dtype, device=x.device, memory_format=memory_format,
    )
    with torch.cuda.device(x.device):
        _native.module().conv2d_pixel_shuffle_cuda(
            x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            0 if residual is None else residual.data_ptr(), y.data_ptr(), batch, in_channels, height, width,
            out_channels, kernel_h, kernel_w, factor, ACTIVATION_CODES[activation], float(negative_slope),
            memory_format is torch.channels_last, _native.dtype_code(x.dtype), _stream(x.device),
        )
    return y
