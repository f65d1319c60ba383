"""group_norm on CUDA: kernels/group_norm.cu through ``flashstep._C.group_norm_cuda``.

Per-chunk moments of every (b, g) spread over many blocks, merged per group into per-channel affine
terms, then one pass over x writing (x - mean)·rstd·weight + bias, SiLU and the residual with 16-byte
vectors. With ``stats`` given the moments are skipped. NCHW and channels_last (4-D) run natively; other
layouts are made contiguous first. float32, float16 and bfloat16, fp32 arithmetic.
"""
from __future__ import annotations

import torch

from ... import _native
from ...ops._checks import same_memory_format
from . import tensors_on_cuda

# The samples go on gridDim.z.
MAX_BATCH = 65535


def _address(tensor) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def why_not(x, num_groups, weight, bias, eps, activation, residual, stats):
    reason = tensors_on_cuda(x, weight, bias, residual, *(stats or ()))
    if reason is not None:
        return reason
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    if x.numel() == 0:
        return "empty input"
    if x.shape[0] > MAX_BATCH:
        return f"batch {x.shape[0]} > {MAX_BATCH}"
    return None


def forward(x, num_groups, weight, bias, eps, activation, residual, stats):
    memory_format = same_memory_format(x)
    channels_last = memory_format is torch.channels_last
    x = x.contiguous(memory_format=memory_format)
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    mean, rstd = (None, None) if stats is None else (s.float().contiguous() for s in stats)
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    y = torch.empty_like(x, memory_format=memory_format)
    module = _native.module()
    with torch.cuda.device(x.device):
        workspace = torch.empty(
            module.group_norm_cuda_workspace(batch, channels, spatial, num_groups, channels_last),
            dtype=torch.float32, device=x.device,
        )
        module.group_norm_cuda(
            x.data_ptr(), y.data_ptr(), _address(weight), _address(bias), _address(residual), _address(mean),
            _address(rstd), workspace.data_ptr(), batch, channels, spatial, num_groups, float(eps),
            activation == "silu", channels_last, _native.dtype_code(x.dtype),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return y
