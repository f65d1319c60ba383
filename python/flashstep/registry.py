"""The op registry: one public op, several implementations ("backends"), one selection rule.

Every op has a ``torch`` reference implementation: plain fp32 math, always available, the truth the
other backends are tested against. Other backends are registered beside it:

=========  ======================================================================================
backend    what it is
=========  ======================================================================================
cuda       our CUDA kernels in ``flashstep._C`` (built when nvcc was found), CUDA tensors only
triton     our Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when the
           backend is asked for by name (the interpreter is for tests, never picked by auto)
cpu        our C++ CPU kernels in ``flashstep._C``, where they measurably beat torch
aten       a fast composition of torch's own kernels (cuDNN/cuBLAS/oneDNN, SDPA) in the input
           dtype: the production path where no kernel of ours applies
torch      the reference
=========  ======================================================================================

Selection, first rule that applies:

1. ``backend=`` given to the call: that backend, or an error that says why it cannot run.
2. ``FLASHSTEP_BACKEND`` in the environment: a backend name for every op (``triton``) or a
   comma-separated list of ``op=backend`` pairs (``attention=cuda,group_norm=triton``), with
   ``*=backend`` as a default. Named backends are strict, as in rule 1.
3. auto: the first backend, in the order of the table above, that is available, eligible for auto
   selection and supports the inputs, unless it declares that another backend is faster on these
   inputs (``auto_why_not``: e.g. the C++ CPU GroupNorm on small fp32 maps); such a backend still runs
   when nothing but the reference is left. The reference always runs, so auto never fails.
"""
from __future__ import annotations

import contextvars
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

BACKEND_PRIORITY = ("cuda", "triton", "cpu", "aten", "torch")
ENV_VAR = "FLASHSTEP_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run these inputs on this machine."""


def _always() -> bool:
    return True


def _no_reason(*args: Any, **kwargs: Any) -> Optional[str]:
    return None


@dataclass
class Implementation:
    """One backend of one op.

    ``why_not(*args, **kwargs)`` returns None when the backend supports the inputs, else a short
    reason ("head dim 600 > 512"). ``available()`` says whether the backend can run on this machine
    at all. ``auto_eligible()`` says whether auto selection may pick it (the Triton interpreter runs
    only when asked for by name). ``auto_why_not(*args, **kwargs)``: None, or why auto should prefer a
    later backend for these inputs (it measured slower there).
    """

    op_name: str
    backend: str
    forward: Callable[..., Any]
    available: Callable[[], bool] = _always
    why_not: Callable[..., Optional[str]] = _no_reason
    auto_eligible: Callable[[], bool] = _always
    unavailable_reason: Callable[[], str] = lambda: "not available on this machine"
    auto_why_not: Callable[..., Optional[str]] = _no_reason

    def supports(self, *args: Any, **kwargs: Any) -> bool:
        return self.why_not(*args, **kwargs) is None


class LazyBackend:
    """Backend code that lives in another module and is imported on first use.

    The module ``flashstep.backends.<backend>.<module>`` defines the forward function and,
    optionally, ``why_not_<function>`` (or ``why_not`` when the function is ``forward``); the package
    ``flashstep.backends.<backend>`` defines ``available()``, ``unavailable_reason()`` and
    ``auto_eligible()``. Importing is deferred so that ``import flashstep`` never imports triton or
    touches CUDA.
    """

    def __init__(self, backend: str, module: str, function: str = "forward"):
        self.backend = backend
        self.module_name = f"flashstep.backends.{backend}.{module}"
        self.package_name = f"flashstep.backends.{backend}"
        self.function = function
        self.checker = "why_not" if function == "forward" else f"why_not_{function}"
        self.auto_checker = f"auto_{self.checker}"

    def package(self):
        return importlib.import_module(self.package_name)

    def module(self):
        return importlib.import_module(self.module_name)

    def module_exists(self) -> bool:
        return importlib.util.find_spec(self.module_name) is not None

    def implementation(self, op_name: str) -> Implementation:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.module(), self.function)(*args, **kwargs)

        def why_not(*args: Any, **kwargs: Any) -> Optional[str]:
            try:
                module = self.module()
            except ImportError as error:
                return f"{self.module_name} cannot be imported ({error})"
            checker = getattr(module, self.checker, None)
            return None if checker is None else checker(*args, **kwargs)

        def auto_why_not(*args: Any, **kwargs: Any) -> Optional[str]:
            checker = getattr(self.module(), self.auto_checker, None)
            return None if checker is None else checker(*args, **kwargs)

        return Implementation(
            op_name=op_name,
            backend=self.backend,
            forward=forward,
            available=lambda: self.package().available() and self.module_exists(),
            why_not=why_not,
            auto_eligible=lambda: self.package().auto_eligible(),
            unavailable_reason=self.unavailable_reason,
            auto_why_not=auto_why_not,
        )

    def unavailable_reason(self) -> str:
        if not self.module_exists():
            return f"{self.module_name} is not part of this installation"
        return self.package().unavailable_reason()


@dataclass
class Op:
    """A public op with its implementations. Call it like the function it stands for."""

    name: str
    implementations: Dict[str, Implementation] = field(default_factory=dict)

    def register(
        self,
        backend: str,
        forward: Callable[..., Any],
        *,
        why_not: Callable[..., Optional[str]] = _no_reason,
        available: Callable[[], bool] = _always,
        auto_why_not: Callable[..., Optional[str]] = _no_reason,
    ) -> Implementation:
        if backend not in BACKEND_PRIORITY:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_PRIORITY)}")
        impl = Implementation(self.name, backend, forward, available=available, why_not=why_not,
                              auto_why_not=auto_why_not)
        self.implementations[backend] = impl
        return impl

    def register_lazy(self, backend: str, module: Optional[str] = None, function: str = "forward") -> Implementation:
        """Register ``flashstep.backends.<backend>.<module or op name>.<function>``."""
        if backend not in BACKEND_PRIORITY:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_PRIORITY)}")
        impl = LazyBackend(backend, module or self.name, function).implementation(self.name)
        self.implementations[backend] = impl
        return impl

    # -- introspection -------------------------------------------------------------------------
    def registered(self) -> List[str]:
        """Every backend registered for this op, in priority order."""
        return [b for b in BACKEND_PRIORITY if b in self.implementations]

    def backends(self) -> List[str]:
        """The backends that can run on this machine, in priority order."""
        return [b for b in self.registered() if self._available(b)]

    def _available(self, backend: str) -> bool:
        try:
            return bool(self.implementations[backend].available())
        except ImportError:
            return False

    # -- selection -----------------------------------------------------------------------------
    def select(self, *args: Any, backend: Optional[str] = None, **kwargs: Any) -> Implementation:
        """The implementation that would run these inputs (see the module docstring)."""
        name = backend if backend is not None else requested_backend(self.name)
        if name is not None and name != "auto":
            return self._strict(name, args, kwargs)
        slower_here: Optional[Implementation] = None
        for candidate in self.registered():
            if candidate == "torch":
                break
            impl = self.implementations[candidate]
            if not self._available(candidate) or not impl.auto_eligible() or not impl.supports(*args, **kwargs):
                continue
            if impl.auto_why_not(*args, **kwargs) is None:
                return impl
            slower_here = slower_here or impl
        return slower_here or self.implementations["torch"]

    def _strict(self, name: str, args: tuple, kwargs: dict) -> Implementation:
        if name not in self.implementations:
            raise BackendUnavailableError(
                f"flashstep.ops.{self.name} has no {name!r} backend; registered backends: "
                f"{', '.join(self.registered())}"
            )
        impl = self.implementations[name]
        if not self._available(name):
            raise BackendUnavailableError(
                f"backend {name!r} for flashstep.ops.{self.name} cannot run here: "
                f"{impl.unavailable_reason()}; backends that run here: {', '.join(self.backends())}"
            )
        reason = impl.why_not(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} for flashstep.ops.{self.name} does not support these inputs: "
                f"{reason}; use backend='auto' to fall back"
            )
        return impl

    def __call__(self, *args: Any, backend: Optional[str] = None, **kwargs: Any) -> Any:
        impl = self.select(*args, backend=backend, **kwargs)
        trace = _trace.get()
        if trace is not None:
            trace.append((self.name, impl.backend, _shape_of(args[0]) if args else ()))
        return impl.forward(*args, **kwargs)


def _shape_of(value: Any) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else ()


# When set (see :func:`trace_ops`), every op call appends (op name, backend taken, first input's shape).
_trace: contextvars.ContextVar[Optional[List[tuple]]] = contextvars.ContextVar("flashstep_op_trace", default=None)


class trace_ops:
    """Context manager recording which backend every op call took::

        with registry.trace_ops() as calls:
            model(x)
        # calls: [("conv2d", "aten", (1, 4, 64, 64)), ...]
    """

    def __enter__(self) -> List[tuple]:
        self.calls: List[tuple] = []
        self._token = _trace.set(self.calls)
        return self.calls

    def __exit__(self, *exc: Any) -> None:
        _trace.reset(self._token)


_OPS: Dict[str, Op] = {}


def define(name: str, reference: Callable[..., Any]) -> Op:
    """Create the op ``name`` with its torch reference and add it to the global table."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is already defined")
    op = Op(name)
    op.register("torch", reference)
    _OPS[name] = op
    return op


def get(name: str) -> Op:
    _ensure_ops_imported()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; ops: {', '.join(sorted(_OPS))}") from None


def all_ops() -> Iterator[Op]:
    _ensure_ops_imported()
    return iter(sorted(_OPS.values(), key=lambda op: op.name))


def _ensure_ops_imported() -> None:
    importlib.import_module("flashstep.ops")


def requested_backend(op_name: str) -> Optional[str]:
    """The backend ``FLASHSTEP_BACKEND`` names for this op, or None."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if "=" not in value:
        return _validated(value)
    default = None
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{ENV_VAR}={value!r}: expected 'backend' or 'op=backend,...', got item {item!r}")
        key, _, backend = item.partition("=")
        key, backend = key.strip(), backend.strip()
        if key == op_name:
            return _validated(backend)
        if key == "*":
            default = _validated(backend)
    return default


def _validated(backend: str) -> str:
    if backend not in BACKEND_PRIORITY and backend != "auto":
        raise ValueError(
            f"{ENV_VAR} names unknown backend {backend!r}; valid: auto, {', '.join(BACKEND_PRIORITY)}"
        )
    return backend
