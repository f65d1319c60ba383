"""What this installation is and can do: ``flashstep.info()`` and ``flashstep info``."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from . import __version__, _native, registry


@dataclass
class OpInfo:
    name: str
    registered: List[str]
    runnable: List[str]


@dataclass
class Info:
    version: str
    python: str
    torch: str
    torch_cuda: str
    triton: str
    native_module: str
    cuda_kernels_compiled: bool
    cuda_archs: List[str]
    cuda_runtime: str
    cuda_driver: str
    devices: List[str]
    ops: List[OpInfo] = field(default_factory=list)
    # backend -> why it runs no op here (only backends that run none)
    idle_backends: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> Dict:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"flashstep {self.version}",
            f"  python            {self.python}",
            f"  torch             {self.torch} (CUDA {self.torch_cuda})",
            f"  triton            {self.triton}",
            f"  native module     {self.native_module}",
            f"  CUDA kernels      {'compiled for sm_' + ', sm_'.join(self.cuda_archs) if self.cuda_kernels_compiled else 'not compiled'}",
            f"  CUDA runtime      {self.cuda_runtime}, driver {self.cuda_driver}",
            "  devices           " + ("; ".join(self.devices) if self.devices else "none"),
            "",
            f"  {'op':<22} {'registered backends':<34} runs here",
        ]
        for op in self.ops:
            lines.append(f"  {op.name:<22} {', '.join(op.registered):<34} {', '.join(op.runnable)}")
        if self.idle_backends:
            lines += ["", "  not running here:"]
            lines += [f"  {backend:<22} {reason}" for backend, reason in self.idle_backends.items()]
        return "\n".join(lines)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _version_string(encoded: int) -> str:
    if not encoded:
        return "none"
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _devices() -> List[str]:
    devices = [f"cpu: {platform.processor() or platform.machine()}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(f"cuda:{index}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    return devices


def _idle_backends() -> Dict[str, str]:
    """Each backend that is registered for some op but runs none here -> the reason it gives."""
    idle: Dict[str, str] = {}
    for backend in registry.BACKEND_PRIORITY:
        implementations = [op.implementations[backend] for op in registry.all_ops() if backend in op.implementations]
        if implementations and not any(backend in op.backends() for op in registry.all_ops()):
            try:
                idle[backend] = implementations[0].unavailable_reason()
            except ImportError as error:
                idle[backend] = f"cannot be imported ({error})"
    return idle


def info() -> Info:
    """Version, build, devices and, for each op, its backends and which of them run here (and, for a backend
    that runs no op here, why)."""
    native = _native._C
    return Info(
        version=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=str(torch.version.cuda),
        triton=_triton_version(),
        native_module="loaded" if native is not None else f"missing ({_native.IMPORT_ERROR})",
        cuda_kernels_compiled=_native.WITH_CUDA,
        cuda_archs=[a for a in _native.CUDA_ARCHS.split(",") if a],
        cuda_runtime=_version_string(native.cuda_runtime_version()) if native is not None else "none",
        cuda_driver=_version_string(native.cuda_driver_version()) if native is not None else "none",
        devices=_devices(),
        ops=[OpInfo(op.name, op.registered(), op.backends()) for op in registry.all_ops()],
        idle_backends=_idle_backends(),
    )
