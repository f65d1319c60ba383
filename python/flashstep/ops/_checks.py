"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the problem."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, tensor: torch.Tensor, ndim: Optional[Sequence[int]] = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; flashstep ops take float32, float16 or bfloat16")
    if ndim is not None and tensor.dim() not in ndim:
        wanted = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {wanted} dimensions, got shape {tuple(tensor.shape)}")


def check_same_dtype_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise TypeError(f"inputs must share one dtype, got {listing}; cast them with .to(dtype)")
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"inputs must be on one device, got {listing}")


def pair(value, name: str) -> tuple:
    """An int or a pair of ints as a pair."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def same_memory_format(reference: torch.Tensor) -> torch.memory_format:
    """channels_last when the 4-D tensor is stored that way (and not also NCHW-contiguous)."""
    if reference.dim() == 4 and not reference.is_contiguous() and reference.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
