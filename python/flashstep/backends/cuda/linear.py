"""linear on CUDA: the GEMM through torch (cuBLAS), the LoRA branch as a rank-r GEMM through torch and
our epilogue kernel (kernels/lora_epilogue.cu) adding scale · B · Mᵀ_b · t_b onto the output in place.

:func:`add_lora_` is shared with the conv2d and geglu backends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _native
from . import tensors_on_cuda

# The epilogue keeps the (r × tile) slices of t and P in shared memory; samples go on gridDim.z.
MAX_RANK = 64
MAX_BATCH = 65535


def lora_why_not(x, lora, batch: int):
    """None when the epilogue kernel takes this LoRA for x, launched over ``batch`` samples, else the reason."""
    if lora is None:
        return None
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    if lora.rank > MAX_RANK:
        return f"LoRA rank {lora.rank} > {MAX_RANK}"
    if batch > MAX_BATCH:
        return f"batch {batch} > {MAX_BATCH} with a LoRA"
    return None


def add_lora_(y: torch.Tensor, t: torch.Tensor, lora, batch: int, positions: int, channels_inner: bool) -> None:
    """y += scale · B · Mᵀ_b · t_b in place, per sample b.

    channels_inner: y (Batch, positions, Cout) and t (Batch, positions, r), contiguous (linear rows,
    channels_last maps); else y (Batch, Cout, positions) and t (Batch, r, positions) (NCHW maps). A shared
    LoRA (no per-sample mix) may be given batch = 1 with all rows as positions.
    """
    mixed = lora.mixed_up(torch.float32).contiguous()  # (Cout, r) or (Batch, Cout, r)
    channels, rank = mixed.shape[-2:]
    mixed_stride = channels * rank if mixed.dim() == 3 else 0
    with torch.cuda.device(y.device):
        _native.module().lora_epilogue_cuda(
            y.data_ptr(), t.data_ptr(), mixed.data_ptr(), mixed_stride, batch, channels, positions, rank,
            channels_inner, _native.dtype_code(y.dtype), torch.cuda.current_stream(y.device).cuda_stream,
        )


def _lora_batch(x, lora) -> int:
    """Samples of the epilogue launch: x's first dim for a per-sample LoRA, else all rows as one sample."""
    return x.shape[0] if lora is not None and lora.per_sample else 1


def why_not(x, weight, bias, lora):
    tensors = () if lora is None else (lora.down, lora.up, lora.mix)
    reason = tensors_on_cuda(x, weight, bias, *tensors)
    if reason is not None:
        return reason
    return lora_why_not(x, lora, _lora_batch(x, lora))


def forward(x, weight, bias, lora):
    y = F.linear(x, weight, bias)
    if lora is None or y.numel() == 0:
        return y
    t = F.linear(x, lora.down).contiguous()  # (Batch, ..., r)
    y = y.contiguous()
    batch = _lora_batch(x, lora)
    add_lora_(y, t, lora, batch, y.numel() // (batch * y.shape[-1]), channels_inner=True)
    return y
