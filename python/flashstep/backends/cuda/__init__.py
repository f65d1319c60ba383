"""Our CUDA kernels, compiled into ``flashstep._C`` (``kernels/<op>.cu`` through ``csrc/cuda/<op>.cpp``).

Each op module checks the tensors, allocates the output and passes raw pointers and the current
stream to ``_C``; C++ never sees a torch type.
"""
from __future__ import annotations

from ... import _native


def available() -> bool:
    return _native.WITH_CUDA and _native.cuda_device_count() > 0


def auto_eligible() -> bool:
    return True


def unavailable_reason() -> str:
    if _native._C is None:
        return f"the native module is missing ({_native.IMPORT_ERROR})"
    if not _native.WITH_CUDA:
        return "flashstep was built without CUDA kernels (rebuild with FLASHSTEP_CUDA=ON and nvcc on PATH)"
    return "no CUDA device is visible (no GPU or no driver)"


def tensors_on_cuda(*tensors) -> "str | None":
    """None when every tensor is a CUDA tensor on one device, else the reason."""
    devices = {t.device for t in tensors if t is not None}
    if any(d.type != "cuda" for d in devices):
        return "the cuda backend takes CUDA tensors only"
    if len(devices) > 1:
        return f"tensors on several devices: {sorted(str(d) for d in devices)}"
    return None
