"""conv2d through torch's convolution (cuDNN / oneDNN); the LoRA branch as a rank-r conv plus a GEMM."""
from __future__ import annotations

import torch.nn.functional as F

from .lora_epilogue import add_lora_to_feature_map_


def forward(x, weight, bias, stride, padding, dilation, groups, lora):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if lora is None:
        return y
    t = F.conv2d(x, lora.down, None, stride, padding, dilation)  # (Batch, r, H', W')
    return add_lora_to_feature_map_(y, t, lora)
