"""The GEGLU projection of the SD transformer's feed-forward, with the gate fused.

    [h, g] = x · Wᵀ + bias (+ LoRA),   W: (2·inner, in)
    y      = h · gelu(g),              gelu exact: g · ½ · (1 + erf(g / √2))

x: (..., in) -> y: (..., inner). h is the first half of the projection's features and g the second
(diffusers ``GEGLU``: ``hidden_states, gate = proj(x).chunk(2, dim=-1)``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import registry
from .linear import check_linear_args, linear_reference
from .lora import LoRA


def geglu_reference(x, weight, bias, lora):
    hidden, gate = linear_reference(x.float(), weight, bias, lora).chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).to(x.dtype)


geglu_op = registry.define("geglu", geglu_reference)
geglu_op.register_lazy("aten")
geglu_op.register_lazy("triton")
geglu_op.register_lazy("cuda")


def geglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora: Optional[LoRA] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """h · gelu(g) with [h, g] = x·Wᵀ + bias; x (..., in), W (2·inner, in) -> (..., inner)."""
    check_linear_args(x, weight, bias, lora)
    if weight.shape[0] % 2:
        raise ValueError(f"the GEGLU weight must have an even number of out-features (2·inner), got {weight.shape[0]}")
    return geglu_op(x, weight, bias, lora, backend=backend)
