"""The compiled module ``flashstep._C``, loaded once, with what it was built with.

Importing this touches no CUDA API beyond ``cudaGetDeviceCount`` when asked, so it is safe on a
machine with no GPU and no driver.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# Dtype codes shared with csrc/tensor_args.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

try:
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # a source checkout that was never built
    _C = None
    IMPORT_ERROR = str(error)

WITH_CUDA: bool = bool(_C is not None and _C.with_cuda)
CUDA_ARCHS: str = _C.cuda_archs if _C is not None else ""


def module():
    """The compiled module; raises with the fix when the package was not built."""
    if _C is None:
        raise ImportError(
            f"flashstep._C is missing ({IMPORT_ERROR}); install flashstep with 'pip install .' "
            "so that the native module is built"
        )
    return _C


@functools.lru_cache(maxsize=None)
def cuda_device_count() -> int:
    """CUDA devices seen by our kernels' runtime (0 without a driver or without a CUDA build)."""
    return int(_C.cuda_device_count()) if WITH_CUDA else 0


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not one of float32, float16, bfloat16") from None
