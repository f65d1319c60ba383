"""Triton kernels, one file per op.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which tests use. Auto selection never picks the interpreter. Kernel
rules that keep the interpreter usable: cast to fp32 right after ``tl.load``, mask every load and
store, no libdevice or inline asm, one autotune config while interpreting.
"""
from __future__ import annotations

import functools
import importlib.util
import os


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    if not _triton_importable():
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def auto_eligible() -> bool:
    return not interpreting()


def unavailable_reason() -> str:
    if not _triton_importable():
        return "triton is not installed (pip install triton)"
    return "no CUDA device is visible to torch and TRITON_INTERPRET=1 is not set"


def tensors_on_supported_device(*tensors) -> "str | None":
    """None when every tensor is on a device this backend runs on, else the reason."""
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type == "cuda":
            continue
        if tensor.device.type == "cpu" and interpreting():
            continue
        return f"tensor on {tensor.device} (Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)"
    return None
