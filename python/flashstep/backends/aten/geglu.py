"""geglu as torch's GEMM (with the LoRA branch), then h · gelu(g)."""
from __future__ import annotations

import torch.nn.functional as F

from .linear import forward as linear_forward


def forward(x, weight, bias, lora):
    hidden, gate = linear_forward(x, weight, bias, lora).chunk(2, dim=-1)
    return hidden * F.gelu(gate)
