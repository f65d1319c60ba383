"""float32 convolutions on the CPU, each shape through the fastest of torch's CPU kernels for it, in the
input's memory format (the models run NCHW).

* 1×1 convolutions: one GEMM over the pixels (MKL), no layout change;
* stride-1 3×3 convolutions over at least ``WINOGRAD_MIN_PIXELS`` output pixels: NNPACK's Winograd transform
  (``torch._nnpack_spatial_convolution``, about a third of the multiplications), NCHW;
* everything else (the UNet's small maps, stride-2 convolutions): oneDNN on the weight reordered once into
  its blocked layout and kept (``mkldnn._reorder_convolution_weight``, ``mkldnn._convolution_pointwise``),
  channels_last. torch's own CPU convolution reorders the weight on every call, which at the UNet's small
  latent sizes costs more than the convolution. A kept weight lives as long as its tensor, is rebuilt when
  the tensor changes (version counter, data pointer, shape) and costs its size in RAM once
  (:func:`packed_bytes`); inference tensors (whose in-place changes have no version counter) are not kept.

Used for float32 CPU tensors without autograd.

NOTE: measured on the 2-core development machine (AMD EPYC, AVX2, fp32, same process, median of 3, other jobs
kept the load average at 3-6). Per convolution, 2 threads, wall ms: oneDNN on the kept weight with
channels_last input | the same with NCHW input | NNPACK:
    128 -> 128, 3×3, 256²     344 |  563 | 169     (the VAE decoder's top level at 256² output)
    256 -> 256, 3×3, 128²     303 |  396 | 123
    512 -> 512, 3×3, 64²      327 |  381 | 138
    320 -> 320, 3×3, 64²       94 |  108 |  54
    640 -> 640, 3×3, 32²      134 |  155 | 126
    640 -> 640, 3×3, 16²       37 |   60 |  78
    1280 -> 1280, 3×3, 16²    110 |  148 | 280
torch's F.conv2d (the weight reordered on each call), NCHW, against oneDNN on the kept weight: 1280 -> 1280,
3×3, 8²: 99.9 vs 25.6 ms; 320 -> 320, 3×3, 32²: 48.0 vs 24.0 ms. 1×1, NCHW, 1 thread, CPU ms, oneDNN vs the
GEMM: 512 -> 256 at 128²: 134 vs 57; 256 -> 128 at 256²: 276 vs 90. NNPACK's output differs from the fp64
result by 3e-6 (relative, L2), oneDNN's by 5e-7.
Whole models (full SD configs at 256² output, 1 thread, CPU s): torch NCHW | oneDNN kept weights, channels_last |
that and NNPACK at >= 32² | NNPACK, oneDNN and the 1×1 GEMM, NCHW (this module):
    UNet (32² latent)    3.41 | 2.32 | 2.19 | see RESULTS.md
    VAE encoder          3.44 | 3.20 | 2.52 (1.0 of it channels_last <-> NCHW copies)
    VAE decoder          7.30 | 6.73 | 4.17 (1.6 of it copies)
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

WINOGRAD_MIN_PIXELS = 32 * 32


def _onednn_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
    except (AttributeError, RuntimeError):
        return False


def _nnpack_available() -> bool:
    try:
        return bool(torch.backends.nnpack.is_available())
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()
NNPACK = _nnpack_available()

# id(weight) -> (weakref to the weight, its state when packed, the packed weight)
_cache: Dict[int, Tuple[weakref.ref, tuple, torch.Tensor]] = {}
_lock = threading.Lock()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv2d` runs these tensors: float32 on the CPU, oneDNN enabled, no autograd."""
    return (ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def uses_winograd(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    height = x.shape[-2] + 2 * padding[0] - 2
    width = x.shape[-1] + 2 * padding[1] - 2
    return (NNPACK and tuple(weight.shape[-2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and height * width >= WINOGRAD_MIN_PIXELS)


def _state(weight: torch.Tensor, stride, padding, dilation, groups) -> tuple:
    return (weight._version, weight.data_ptr(), tuple(weight.shape), tuple(stride), tuple(padding),
            tuple(dilation), groups)


def _forget(key: int):
    def callback(_ref) -> None:
        with _lock:
            _cache.pop(key, None)

    return callback


def packed_weight(weight: torch.Tensor, x: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """The weight in oneDNN's blocked layout: kept from an earlier call, or reordered now (and kept unless the
    weight is an inference tensor)."""
    if weight.is_inference():
        return torch.ops.mkldnn._reorder_convolution_weight(weight, list(padding), list(stride), list(dilation),
                                                            groups, list(x.shape))
    key = id(weight)
    state = _state(weight, stride, padding, dilation, groups)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, list(padding), list(stride), list(dilation),
                                                          groups, list(x.shape))
    with _lock:
        _cache[key] = (weakref.ref(weight, _forget(key)), state, packed)
    return packed


def is_pointwise(weight: torch.Tensor, stride, padding, groups) -> bool:
    return tuple(weight.shape[-2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


# NOTE: the GEMMs and NNPACK run one sample at a time: their batched forms round differently (NNPACK switches
# algorithm above batch 1), and an image's result should not depend on the batch it came in.


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1×1 convolution as one GEMM per sample: x (B, C, H, W) -> (B, O, H, W), in x's layout (NCHW or
    channels_last)."""
    batch, channels, height, width = x.shape
    matrix = weight.reshape(weight.shape[0], channels)  # (O, C)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view
        out = torch.empty((batch, height * width, matrix.shape[0]), dtype=x.dtype, device=x.device)
        for sample in range(batch):
            if bias is None:
                torch.mm(rows[sample], matrix.t(), out=out[sample])
            else:
                torch.addmm(bias, rows[sample], matrix.t(), out=out[sample])
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
    columns = x.contiguous().view(batch, channels, height * width)
    out = torch.empty((batch, matrix.shape[0], height * width), dtype=x.dtype, device=x.device)
    for sample in range(batch):
        if bias is None:
            torch.mm(matrix, columns[sample], out=out[sample])
        else:
            torch.addmm(bias[:, None], matrix, columns[sample], out=out[sample])
    return out.view(batch, -1, height, width)


def winograd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding) -> torch.Tensor:
    """NNPACK's Winograd convolution, one sample at a time; NCHW out."""
    x, weight = x.contiguous(), weight.contiguous()
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, list(padding))
    return torch.cat([torch._nnpack_spatial_convolution(x[sample:sample + 1], weight, bias, list(padding))
                      for sample in range(x.shape[0])])


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
           groups: int, memory_format: torch.memory_format) -> torch.Tensor:
    """F.conv2d(x, weight, bias, ...) in ``memory_format``, for tensors :func:`applies` accepts."""
    if is_pointwise(weight, stride, padding, groups):
        y = pointwise(x, weight, bias)
    elif uses_winograd(x, weight, stride, padding, dilation, groups):
        y = winograd(x, weight, bias, padding)
    else:
        packed = packed_weight(weight, x, stride, padding, dilation, groups)
        y = torch.ops.mkldnn._convolution_pointwise(x.contiguous(memory_format=torch.channels_last), packed, bias,
                                                    list(padding), list(stride), list(dilation), groups, "none", [], "")
    return y.contiguous(memory_format=memory_format)


def packed_bytes() -> int:
    """RAM held by the kept weights (the weights they were made from are not counted)."""
    with _lock:
        entries = list(_cache.values())
    return sum(entry[2].numel() * entry[2].element_size() for entry in entries if entry[0]() is not None)


def clear() -> None:
    """Drop every kept weight (they are rebuilt on next use)."""
    with _lock:
        _cache.clear()
