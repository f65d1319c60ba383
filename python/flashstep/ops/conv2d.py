"""2-D convolution with an optional LoRA delta, static or per sample.

    y = conv(x, W) + bias + scale · conv1x1(B · Mᵀ_b, conv(x, A))

x: (Batch, Cin, H, W), weight W: (Cout, Cin/groups, kh, kw), bias: (Cout,), y: (Batch, Cout, H', W').
The LoRA (:class:`flashstep.ops.lora.LoRA`) has A (r, Cin, kh, kw) with W's stride, padding and
dilation, B (Cout, r), and an optional mix M, (r, r) or (Batch, r, r). Its delta is never built as a
per-sample copy of W: the rank-r branch costs r/Cout of the main convolution plus a (Cout × r) GEMM per
sample. A static LoRA should be merged into W once with :func:`flashstep.ops.merge_lora`.
The output has x's dtype and memory format.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import registry
from ._checks import check_same_dtype_device, check_tensor, pair, same_memory_format
from .lora import LoRA, lora_delta


def conv2d_reference(x, weight, bias, stride, padding, dilation, groups, lora):
    """fp32; a per-sample LoRA runs sample by sample with its own merged weight."""
    xf = x.float()
    bias_f = None if bias is None else bias.float()
    if lora is None:
        y = F.conv2d(xf, weight.float(), bias_f, stride, padding, dilation, groups)
    elif not lora.per_sample:
        y = F.conv2d(xf, weight.float() + lora_delta(weight, lora), bias_f, stride, padding, dilation, groups)
    else:
        merged = weight.float() + lora_delta(weight, lora)  # (Batch, Cout, Cin, kh, kw)
        y = torch.cat(
            [F.conv2d(xf[b : b + 1], merged[b], bias_f, stride, padding, dilation, groups) for b in range(x.shape[0])]
        )
    return y.to(x.dtype).contiguous(memory_format=same_memory_format(x))


conv2d_op = registry.define("conv2d", conv2d_reference)
conv2d_op.register_lazy("aten")
conv2d_op.register_lazy("triton")
conv2d_op.register_lazy("cuda")


def check_conv2d_args(x, weight, bias, groups, lora) -> None:
    check_tensor("x", x, ndim=(4,))
    check_tensor("weight", weight, ndim=(4,))
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries for a weight of {weight.shape[0]} output channels")
    check_same_dtype_device(x=x, weight=weight, bias=bias)
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} must divide the {x.shape[1]} input and {weight.shape[0]} output channels")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but the weight {tuple(weight.shape)} expects {weight.shape[1] * groups}"
        )
    if lora is not None:
        if not isinstance(lora, LoRA):
            raise TypeError(f"lora must be a flashstep.ops.LoRA, got {type(lora).__name__}")
        if groups != 1:
            raise ValueError("a LoRA applies to ungrouped convolutions only (groups=1)")
        lora.check_against(weight, batch=x.shape[0])
        check_same_dtype_device(x=x, lora_down=lora.down, lora_up=lora.up)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    lora: Optional[LoRA] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """conv(x, W) + bias (+ the LoRA delta); x (Batch, Cin, H, W) -> (Batch, Cout, H', W')."""
    check_conv2d_args(x, weight, bias, groups, lora)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    return conv2d_op(x, weight, bias, stride, padding, dilation, groups, lora, backend=backend)
