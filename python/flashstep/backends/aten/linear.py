"""linear through torch's GEMM; the LoRA branch as a rank-r GEMM plus a batched GEMM."""
from __future__ import annotations

import torch.nn.functional as F

from .lora_epilogue import add_lora_to_rows_


def forward(x, weight, bias, lora):
    y = F.linear(x, weight, bias)
    if lora is None:
        return y
    squeeze = x.dim() == 1
    if squeeze:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    batch = x.shape[0]
    t = F.linear(x, lora.down)  # (Batch, ..., r)
    add_lora_to_rows_(y.view(batch, -1, y.shape[-1]), t.reshape(batch, -1, t.shape[-1]), lora)
    return y.squeeze(0) if squeeze else y
