"""group_norm on the CPU through ``flashstep._C.group_norm_cpu`` (csrc/cpu/group_norm.cpp).

One pass over x for the per-group moments (skipped when ``stats`` is given), one fused pass for
(x - mean)·rstd·weight + bias, SiLU and the residual. float32, float16 and bfloat16 (converted on load,
fp32 arithmetic); NCHW, and channels_last for 4-D inputs; other layouts are made contiguous first.

NOTE: measured on the shared 2-core development machine (AMD EPYC, AVX2, load average 9-30 from other
jobs), fp32, torch.set_num_threads(2), both in one process, median of 15 calls, wall ms (process CPU ms),
against F.silu(F.group_norm(x, 32, weight, bias)):
    (1, 128, 256, 256) NCHW            torch 229 (68)   cpu 101 (33)
    (1, 128, 256, 256) channels_last   torch 237 (77)   cpu 103 (33)
    (1, 320, 64, 64)   NCHW            torch  52 (18)   cpu   6 (1.7)
    (1, 320, 64, 64)   channels_last   torch  73 (23)   cpu   3 (1.6)
Alternating the two calls (torch's OpenMP workers still spinning when ours start) narrows the gap at the UNet
size to 16-36 vs 50-56 ms (NCHW) and 22-49 vs 55-76 ms (channels_last). float16 and bfloat16, measured the same
way: 36-53 vs 60-152 ms at the VAE size and 5-13 vs 41-76 ms at the UNet size, both layouts.
"""
from __future__ import annotations

import torch

from ... import _native
from ...ops._checks import same_memory_format
from . import tensors_on_cpu

# Below this many elements the op runs on the calling thread alone: starting a second thread costs about
# 0.1-0.2 ms, more than the whole pass at the UNet's small latent maps (measured on the 2-core AMD EPYC machine,
# quiet, fp32: (2, 1280, 2, 2) 0.14 ms on one thread, 0.29 ms on two; (2, 320, 16, 16) 0.19 vs 0.34 ms; from
# (2, 320, 32, 32) on, two threads are as fast or faster).
SINGLE_THREAD_MAX_ELEMENTS = 256 * 1024
# Auto selection leaves plain fp32 inputs below this size to the aten backend (F.group_norm): on the quiet
# machine (benchmarks/results_cpu_ops.txt) this kernel ran 1.32x torch eager at (1, 128, 128, 128) = 2 Mi
# elements but 0.98x at 1 Mi, 0.55-0.80x at the VAE's smaller maps and 0.4-0.5x at the UNet's (which
# aten runs at 0.7-0.9x eager). With given statistics (streamed tiles) or in fp16/bf16 it stays: there
# the alternatives are the fp32 reference or torch's slow half-precision CPU path.
AUTO_MIN_FP32_ELEMENTS = 2 * 1024 * 1024


def _address(tensor) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def why_not(x, num_groups, weight, bias, eps, activation, residual, stats):
    reason = tensors_on_cpu(x, weight, bias, residual, *(stats or ()))
    if reason is not None:
        return reason
    if x.dtype not in _native.DTYPE_CODES:
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    if x.numel() == 0:
        return "empty input"
    return None


def auto_why_not(x, num_groups, weight, bias, eps, activation, residual, stats):
    if stats is None and x.dtype == torch.float32 and x.numel() < AUTO_MIN_FP32_ELEMENTS:
        return f"torch's own group_norm is as fast below {AUTO_MIN_FP32_ELEMENTS} fp32 elements"
    return None


def forward(x, num_groups, weight, bias, eps, activation, residual, stats):
    memory_format = same_memory_format(x)
    x = x.contiguous(memory_format=memory_format)
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    mean, rstd = (None, None) if stats is None else (s.float().contiguous() for s in stats)
    batch, channels = x.shape[:2]
    y = torch.empty_like(x, memory_format=memory_format)
    _native.module().group_norm_cpu(
        x.data_ptr(), y.data_ptr(), _address(weight), _address(bias), _address(residual), _address(mean),
        _address(rstd), batch, channels, x.numel() // (batch * channels), num_groups, float(eps),
        activation == "silu", memory_format == torch.channels_last, _native.dtype_code(x.dtype),
        1 if x.numel() < SINGLE_THREAD_MAX_ELEMENTS else torch.get_num_threads(),
    )
    return y
