"""conv2d: the convolution through torch (cuDNN), the LoRA branch fused into one Triton pass.

    y = conv(x, W) + bias + scale · B · M_bᵀ · conv(x, A)

x (Batch, Cin, H, W), W (Cout, Cin/groups, kh, kw), A (r, Cin, kh, kw), B (Cout, r), M none, (r, r) or
(Batch, r, r); y (Batch, Cout, H', W') in x's memory format.

With a LoRA, A is stacked below W and the bias extended with r zeros, so ONE convolution computes
z = [conv(x, W) + bias ; t = conv(x, A)] of Cout + r channels: x is read once and cuDNN sees one
larger GEMM instead of a second, thin rank-r one. One Triton pass
(:func:`~flashstep.backends.triton.lora_epilogue.add_lora_to_feature_map`) then writes
y = z[:, :Cout] + scale · B · M_bᵀ · z[:, Cout:] for every sample at once.

The stacked weight is cached per weight tensor (one entry each, dropped with the weight) and
rebuilt when the weight, A or the bias is another tensor, moved, or written in place (the
version counter): memory for one extra (Cout + r) × Cin × kh × kw copy per LoRA-carrying conv.
Inference tensors (made under ``torch.inference_mode``) have no version counter: for them the
stack is rebuilt on every call.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import tensors_on_supported_device
from ...ops._checks import same_memory_format
from .lora_epilogue import add_lora_to_feature_map

MAX_GRID_BATCH = 65535

# weight -> (fingerprint, stacked weight, stacked bias)
_stacked_cache: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _fingerprint(tensor):
    """What identifies a tensor's current contents: identity, storage address and version."""
    if tensor is None:
        return None
    return weakref.ref(tensor), tensor.data_ptr(), tensor._version


def _same(fingerprint, tensor) -> bool:
    if fingerprint is None or tensor is None:
        return fingerprint is None and tensor is None
    ref, data_ptr, version = fingerprint
    return ref() is tensor and data_ptr == tensor.data_ptr() and version == tensor._version


def stacked_weight_and_bias(weight: torch.Tensor, bias, down: torch.Tensor):
    """[W ; A] (Cout + r, Cin, kh, kw) and [bias ; 0] (Cout + r,) or None, cached per weight."""
    sources = (weight, down, bias)
    # NOTE: inference tensors keep no version counter, so an in-place write to one could not be
    # seen; their stacked copy is rebuilt on every call instead of cached.
    cacheable = not any(t is not None and t.is_inference() for t in sources)
    entry = _stacked_cache.get(weight) if cacheable else None
    if entry is not None:
        fingerprints, stacked_weight, stacked_bias = entry
        if all(_same(f, t) for f, t in zip(fingerprints, sources)):
            return stacked_weight, stacked_bias
    with torch.no_grad():
        stacked_weight = torch.cat([weight, down])
        stacked_bias = None
        if bias is not None:
            stacked_bias = torch.cat([bias, bias.new_zeros(down.shape[0])])
    if cacheable:
        _stacked_cache[weight] = (tuple(_fingerprint(t) for t in sources), stacked_weight, stacked_bias)
    return stacked_weight, stacked_bias


def why_not(x, weight, bias, stride, padding, dilation, groups, lora):
    tensors = (x, weight, bias) if lora is None else (x, weight, bias, lora.down, lora.up, lora.mix)
    reason = tensors_on_supported_device(*tensors)
    if reason is not None:
        return reason
    if lora is not None and x.shape[0] > MAX_GRID_BATCH:
        return f"batch {x.shape[0]} > {MAX_GRID_BATCH} with a LoRA (one grid row per sample)"
    return None


def forward(x, weight, bias, stride, padding, dilation, groups, lora):
    if lora is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out_channels = weight.shape[0]
    stacked_weight, stacked_bias = stacked_weight_and_bias(weight, bias, lora.down)
    # z: (Batch, Cout + r, H', W')
    z = F.conv2d(x, stacked_weight, stacked_bias, stride, padding, dilation)
    y = torch.empty((x.shape[0], out_channels) + tuple(z.shape[2:]), dtype=x.dtype, device=x.device,
                    memory_format=same_memory_format(x))
    if y.numel() == 0:
        return y
    return add_lora_to_feature_map(z[:, :out_channels], z[:, out_channels:], lora, y)
