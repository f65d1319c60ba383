"""flashstep: a compiled, kernel-optimized runtime for one-step diffusion super-resolution and
one-step image generators.

Importing flashstep is cheap: it imports torch but not triton, and touches no CUDA API. Submodules
load on first use::

    import flashstep
    y = flashstep.ops.attention(q, k, v)
    print(flashstep.info())
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_MODULES = ("ops", "registry", "models", "loaders", "runner", "pipelines", "testing", "distributed")
_LAZY_FUNCTIONS = {
    "info": ("flashstep.system_info", "info"),
    "load_model": ("flashstep.loaders", "load_model"),
    "load_lora": ("flashstep.loaders", "load_lora"),
    "load": ("flashstep.pipelines", "load"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"flashstep.{name}")
    if name in _LAZY_FUNCTIONS:
        module_name, attribute = _LAZY_FUNCTIONS[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'flashstep' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_MODULES) + list(_LAZY_FUNCTIONS))
