"""Linear layer with an optional LoRA delta, static or per sample.

    y = x · Wᵀ + bias + scale · (x · Aᵀ) · M_b · Bᵀ

x: (Batch, ..., in), W: (out, in), bias: (out,), y: (Batch, ..., out). The LoRA has A (r, in),
B (out, r) and an optional mix M, (r, r) or (Batch, r, r) indexed by x's first dimension.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import registry
from ._checks import check_same_dtype_device, check_tensor
from .lora import LoRA, lora_delta


def linear_reference(x, weight, bias, lora):
    """fp32; a per-sample LoRA uses each sample's merged weight."""
    xf = x.float()
    bias_f = None if bias is None else bias.float()
    if lora is None:
        y = F.linear(xf, weight.float(), bias_f)
    elif not lora.per_sample:
        y = F.linear(xf, weight.float() + lora_delta(weight, lora), bias_f)
    else:
        merged = weight.float() + lora_delta(weight, lora)  # (Batch, out, in)
        y = torch.stack([F.linear(xf[b], merged[b], bias_f) for b in range(x.shape[0])])
    return y.to(x.dtype)


linear_op = registry.define("linear", linear_reference)
linear_op.register_lazy("aten")
linear_op.register_lazy("triton")
linear_op.register_lazy("cuda")


def check_linear_args(x, weight, bias, lora) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=(2,))
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({tuple(x.shape)}) must equal the weight's in-features ({weight.shape[1]})")
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries for a weight of {weight.shape[0]} out-features")
    check_same_dtype_device(x=x, weight=weight, bias=bias)
    if lora is not None:
        if not isinstance(lora, LoRA):
            raise TypeError(f"lora must be a flashstep.ops.LoRA, got {type(lora).__name__}")
        if lora.per_sample and x.dim() < 2:
            raise ValueError("a per-sample LoRA needs x of shape (Batch, ..., in)")
        lora.check_against(weight, batch=x.shape[0] if x.dim() >= 2 else None)
        check_same_dtype_device(x=x, lora_down=lora.down, lora_up=lora.up)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora: Optional[LoRA] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """x·Wᵀ + bias (+ the LoRA delta); x (Batch, ..., in) -> (Batch, ..., out)."""
    check_linear_args(x, weight, bias, lora)
    return linear_op(x, weight, bias, lora, backend=backend)
