"""conv2d on CUDA: the convolution through torch (cuDNN); with a LoRA, its rank-r convolution t = conv(x, A)
through torch too and our epilogue kernel (kernels/lora_epilogue.cu) adding scale · B · Mᵀ_b · t_b onto the
output in place, in one pass over it. Without a LoRA this is torch's convolution alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops._checks import same_memory_format
from . import tensors_on_cuda
from .linear import add_lora_, lora_why_not


def why_not(x, weight, bias, stride, padding, dilation, groups, lora):
    tensors = () if lora is None else (lora.down, lora.up, lora.mix)
    reason = tensors_on_cuda(x, weight, bias, *tensors)
    if reason is not None:
        return reason
    return lora_why_not(x, lora, x.shape[0])


def forward(x, weight, bias, stride, padding, dilation, groups, lora):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if lora is None or y.numel() == 0:
        return y
    t = F.conv2d(x, lora.down, None, stride, padding, dilation)  # (Batch, r, H', W')
    memory_format = same_memory_format(x)
    channels_inner = memory_format is torch.channels_last
    y = y.contiguous(memory_format=memory_format)
    t = t.contiguous(memory_format=memory_format)
    batch = x.shape[0]
    add_lora_(y, t, lora, batch, y.shape[2] * y.shape[3], channels_inner)
    return y
