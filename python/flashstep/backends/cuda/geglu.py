"""geglu on CUDA: the projection through the cuda linear backend (cuBLAS GEMM + our LoRA epilogue), then one
kernel (kernels/geglu.cu) that reads the (..., 2·inner) projection once and writes h · gelu(g), exact erf GELU.
"""
from __future__ import annotations

import torch

from ... import _native
from .linear import forward as linear_forward
from .linear import why_not as linear_why_not


def why_not(x, weight, bias, lora):
    reason = linear_why_not(x, weight, bias, lora)
    if reason is not None:
        return reason
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    return None


def forward(x, weight, bias, lora):
    projection = linear_forward(x, weight, bias, lora).contiguous()  # (..., 2·inner)
    inner = weight.shape[0] // 2
    out = torch.empty(projection.shape[:-1] + (inner,), dtype=projection.dtype, device=projection.device)
    rows = out.numel() // inner
    if rows == 0:
        return out
    with torch.cuda.device(out.device):
        _native.module().geglu_cuda(
            projection.data_ptr(), out.data_ptr(), rows, inner, _native.dtype_code(out.dtype),
            torch.cuda.current_stream(out.device).cuda_stream,
        )
    return out
