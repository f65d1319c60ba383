"""conv2d through torch's convolution (cuDNN / oneDNN / NNPACK); the LoRA branch as a rank-r conv plus a GEMM.

float32 on the CPU goes through :mod:`.cpu_conv` (Winograd for stride-1 3×3 over large maps, oneDNN on weights
kept in its blocked layout otherwise); the output has x's memory format.
"""
from __future__ import annotations

import torch.nn.functional as F

from ...ops._checks import same_memory_format
from . import cpu_conv
from .lora_epilogue import add_lora_to_feature_map_


def _conv(x, weight, bias, stride, padding, dilation, groups):
    if cpu_conv.applies(x, weight):
        return cpu_conv.conv2d(x, weight, bias, stride, padding, dilation, groups, same_memory_format(x))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def forward(x, weight, bias, stride, padding, dilation, groups, lora):
    y = _conv(x, weight, bias, stride, padding, dilation, groups)
    if lora is None:
        return y
    t = _conv(x, lora.down, None, stride, padding, dilation, 1)  # (Batch, r, H', W')
    return add_lora_to_feature_map_(y, t, lora)
