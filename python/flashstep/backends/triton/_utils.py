"""Helpers shared by the Triton launchers: warps per tile, dot precision, device guards, SM counts.

Every helper here is plain Python run at launch time; none touches the Triton driver, so they work
under the interpreter (``TRITON_INTERPRET=1``) as on a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton

from . import interpreting


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def num_warps_for(tile_elements: int) -> int:
    """Warps for a program that holds ``tile_elements`` values of one tile in registers.

    16 values per thread or more: 4 warps up to 2048 elements, 8 up to 8192, 16 above, 32 from
    32768. NOTE: this is Liger-Kernel's ``calculate_settings`` rule, which keeps register pressure
    per thread flat as tiles grow.
    """
    if tile_elements >= 32768:
        return 32
    if tile_elements >= 8192:
        return 16
    if tile_elements >= 2048:
        return 8
    return 4


def dot_operands_in_fp32(dtype: torch.dtype) -> bool:
    """True when ``tl.dot`` must be fed fp32 operands instead of ``dtype`` ones.

    NOTE: the interpreter computes bf16 dots wrongly (errors of order 1e10) and does no bf16
    arithmetic, so bf16 tiles are cast to fp32 right after their load there; on a GPU bf16 and fp16
    stay on the tensor cores with fp32 accumulation.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_input_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` inputs: exact "ieee" products for fp32.

    NOTE: fp32 callers ask for fp32 results, so their dots must not round operands to tf32 (10
    mantissa bits). The value does not change fp16/bf16 dots; "tf32" is Triton's default there.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device current, so a launch lands on that device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_multiprocessor_count(index)


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
