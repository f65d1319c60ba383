"""Our C++ CPU kernels in ``flashstep._C`` (``csrc/cpu/<op>.cpp``), used where they measurably beat torch."""
from __future__ import annotations

from ... import _native


def available() -> bool:
    return _native._C is not None


def auto_eligible() -> bool:
    return True


def unavailable_reason() -> str:
    return f"the native module is missing ({_native.IMPORT_ERROR})"


def tensors_on_cpu(*tensors) -> "str | None":
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return "the cpu backend takes CPU tensors only"
    return None
