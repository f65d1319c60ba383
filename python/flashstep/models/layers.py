"""Layers the architectures are built from: torch modules whose forward calls :mod:`flashstep.ops`.

Parameter names match ``torch.nn`` (``weight``, ``bias``), so state dicts of the public checkpoints load
with ``load_state_dict``. :class:`Conv2d` and :class:`Linear` carry an optional LoRA:

* static (``merge_lora``): folded into ``weight`` once, after which the layer costs nothing extra;
* per sample (S3Diff): ``layer.lora`` holds A, B and the scale, and ``layer.lora_mix`` the (Batch, r, r)
  mixing matrices for the current call; the op adds ``scale · B · Mᵀ_b · A x_b`` without rebuilding W.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .. import ops
from ..ops.lora import LoRA, merge_lora_


class LoRAHost(nn.Module):
    """Base of the layers that accept a LoRA (see the module docstring).

    An attached LoRA lives in non-persistent buffers (``lora_down``, ``lora_up``), so ``.to(device, dtype)``
    moves it with the weight while state dicts keep the public keys only.
    """

    lora_mix: Optional[torch.Tensor]

    def _init_lora(self) -> None:
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)
        self.lora_scale = 1.0
        self.lora_mix = None

    @property
    def lora(self) -> Optional[LoRA]:
        """The attached (unmerged) LoRA, or None."""
        if self.lora_down is None:
            return None
        return LoRA(self.lora_down, self.lora_up, self.lora_scale)

    def attach_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """Keep a LoRA beside the weight, unmerged (per-sample use: set ``lora_mix`` before each call)."""
        lora = LoRA(down.to(self.weight), up.to(self.weight), float(scale))
        lora.check_against(self.weight)
        self.lora_down, self.lora_up, self.lora_scale = lora.down, lora.up, lora.scale

    def detach_lora(self) -> None:
        self.lora_down = self.lora_up = self.lora_mix = None

    def merge_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """W <- W + scale · B · A, in place; the layer then runs at the plain layer's cost."""
        lora = LoRA(down.to(self.weight.device), up.to(self.weight.device), float(scale))
        with torch.no_grad():
            merge_lora_(self.weight, lora)

    def active_lora(self) -> Optional[LoRA]:
        lora = self.lora
        if lora is None or self.lora_mix is None:
            return lora
        return lora.with_mix(self.lora_mix.to(self.weight.dtype))


class Conv2d(LoRAHost):
    """``nn.Conv2d`` through :func:`flashstep.ops.conv2d` (with an optional LoRA)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._init_lora()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                          lora=self.active_lora())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}" + (", lora" if self.lora is not None else ""))


class Linear(LoRAHost):
    """``nn.Linear`` through :func:`flashstep.ops.linear` (with an optional LoRA)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._init_lora()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, lora=self.active_lora())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}" + (", lora" if self.lora is not None else "")


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` through :func:`flashstep.ops.group_norm`, with SiLU and a residual fused on request."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: torch.Tensor, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation, residual)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


@dataclass(frozen=True)
class LoRAWeights:
    """One module's adapter as stored in a LoRA file: A (r, in[, kh, kw]), B (out, r) and its scale."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass
class LoRASpec:
    """A whole LoRA file: module path (as in the model's ``named_modules``) -> its adapter."""

    modules: Dict[str, LoRAWeights]

    def __len__(self) -> int:
        return len(self.modules)


def apply_lora(model: nn.Module, spec: LoRASpec, scale: float = 1.0, merge: bool = True) -> nn.Module:
    """Merge (static) or attach (per-sample) every adapter of ``spec`` into ``model``; returns ``model``.

    Raises ValueError naming the first module paths the model lacks or that cannot take a LoRA.
    """
    modules = dict(model.named_modules())
    missing = [name for name in spec.modules if name not in modules]
    if missing:
        raise ValueError(
            f"the LoRA names {len(missing)} modules the model does not have, e.g. {missing[:3]}; "
            f"is it for another architecture?"
        )
    unsuitable = [name for name in spec.modules if not isinstance(modules[name], LoRAHost)]
    if unsuitable:
        raise ValueError(f"these modules cannot take a LoRA (not a conv or linear layer): {unsuitable[:3]}")
    for name, weights in spec.modules.items():
        layer = modules[name]
        if merge:
            layer.merge_lora(weights.down, weights.up, weights.scale * scale)
        else:
            layer.attach_lora(weights.down, weights.up, weights.scale * scale)
    return model


def lora_hosts(model: nn.Module) -> Iterable[LoRAHost]:
    return (m for m in model.modules() if isinstance(m, LoRAHost))


class LoRAModelMixin:
    """``model.apply_lora(spec, scale=1.0)`` for the architectures."""

    def apply_lora(self, spec: LoRASpec, scale: float = 1.0, merge: bool = True):
        return apply_lora(self, spec, scale, merge)
