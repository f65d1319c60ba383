"""Pixel shuffle and unshuffle, and the upscaling head's convolution fused with the shuffle.

pixel_shuffle(x, r):   x (B, C·r², H, W) -> (B, C, H·r, W·r),  y[b, c, h·r + i, w·r + j] = x[b, c·r² + i·r + j, h, w]
pixel_unshuffle(x, r): the inverse, (B, C, H·r, W·r) -> (B, C·r², H, W)
conv2d_pixel_shuffle(x, weight, bias, r, activation, residual):
    y = act(pixel_shuffle(conv(x, W, bias, padding=kh//2), r)) + residual
    W: (C·r², Cin, kh, kw) odd kernel, stride 1, "same" padding; residual (B, C, H·r, W·r), e.g. the
    nearest-upsampled input of Real-ESRGAN's SRVGG head. The conv writes straight into the shuffled
    layout: the (B, C·r², H, W) intermediate never reaches memory.

Activations: None, "relu", "silu", "leaky_relu" (slope ``negative_slope``). Output: x's dtype and
memory format.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import registry
from ._checks import check_same_dtype_device, check_tensor, same_memory_format

ACTIVATIONS = (None, "relu", "silu", "leaky_relu")


def pixel_shuffle_reference(x: torch.Tensor, factor: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    out_channels = channels // (factor * factor)
    y = x.reshape(batch, out_channels, factor, factor, height, width).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(batch, out_channels, height * factor, width * factor).contiguous(memory_format=same_memory_format(x))


def pixel_unshuffle_reference(x: torch.Tensor, factor: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    y = x.reshape(batch, channels, height // factor, factor, width // factor, factor).permute(0, 1, 3, 5, 2, 4)
    y = y.reshape(batch, channels * factor * factor, height // factor, width // factor)
    return y.contiguous(memory_format=same_memory_format(x))


def apply_activation(y: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return y


def conv2d_pixel_shuffle_reference(x, weight, bias, factor, activation, negative_slope, residual):
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    conv = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), padding=padding)
    y = apply_activation(pixel_shuffle_reference(conv, factor), activation, negative_slope)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype).contiguous(memory_format=same_memory_format(x))


pixel_shuffle_op = registry.define("pixel_shuffle", pixel_shuffle_reference)
pixel_unshuffle_op = registry.define("pixel_unshuffle", pixel_unshuffle_reference)
conv2d_pixel_shuffle_op = registry.define("conv2d_pixel_shuffle", conv2d_pixel_shuffle_reference)
for _op in (pixel_shuffle_op, pixel_unshuffle_op, conv2d_pixel_shuffle_op):
    for _backend in ("aten", "triton", "cuda"):
        _op.register_lazy(_backend, module="pixel_shuffle", function=_op.name)


def _check_factor(factor) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the shuffle factor must be a positive int, got {factor!r}")


def pixel_shuffle(x: torch.Tensor, factor: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """(B, C·r², H, W) -> (B, C, H·r, W·r); see the module docstring."""
    check_tensor("x", x, ndim=(4,))
    _check_factor(factor)
    if x.shape[1] % (factor * factor):
        raise ValueError(f"pixel_shuffle by {factor} needs channels divisible by {factor * factor}, got {x.shape[1]}")
    return pixel_shuffle_op(x, factor, backend=backend)


def pixel_unshuffle(x: torch.Tensor, factor: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """(B, C, H·r, W·r) -> (B, C·r², H, W); see the module docstring."""
    check_tensor("x", x, ndim=(4,))
    _check_factor(factor)
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"pixel_unshuffle by {factor} needs height and width divisible by {factor}, got {tuple(x.shape[2:])}; "
            "pad the image first"
        )
    return pixel_unshuffle_op(x, factor, backend=backend)


def conv2d_pixel_shuffle(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    factor: int,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    negative_slope: float = 0.01,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """act(pixel_shuffle(conv(x, W) + bias, r)) + residual; x (B, Cin, H, W) -> (B, C, H·r, W·r)."""
    check_tensor("x", x, ndim=(4,))
    check_tensor("weight", weight, ndim=(4,))
    _check_factor(factor)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels, the weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if weight.shape[0] % (factor * factor):
        raise ValueError(f"the weight's {weight.shape[0]} output channels are not divisible by r² = {factor * factor}")
    if weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"conv2d_pixel_shuffle takes odd kernels ('same' padding), got {tuple(weight.shape[2:])}")
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries for {weight.shape[0]} output channels")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; valid: None, 'relu', 'silu', 'leaky_relu'")
    if residual is not None:
        expected = (x.shape[0], weight.shape[0] // (factor * factor), x.shape[2] * factor, x.shape[3] * factor)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, the output is {expected}")
    check_same_dtype_device(x=x, weight=weight, bias=bias, residual=residual)
    return conv2d_pixel_shuffle_op(x, weight, bias, factor, activation, float(negative_slope), residual, backend=backend)
