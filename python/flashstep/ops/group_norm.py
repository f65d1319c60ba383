"""GroupNorm with an optional SiLU and an optional residual add, in one pass over the data.

For x (B, C, *spatial) split into G groups of C/G channels, per (b, g)::

    mean = E[x_bg],  rstd = 1 / sqrt(Var[x_bg] + eps)        (biased variance, over C/G · spatial)
    y    = (x - mean) · rstd · weight[c] + bias[c]
    y    = silu(y) = y · sigmoid(y)                           if activation == "silu"
    y    = y + residual                                       if residual is given

The statistics may instead be given (``stats=(mean, rstd)``, each (B, G) fp32): tiled VAE decoding
gathers them over the whole image (:func:`group_norm_moments`, :func:`combine_moments`) so that every
tile is normalised alike and no seam or brightness step appears. The output has x's dtype and memory
format (NCHW or channels_last); statistics and arithmetic are fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import registry
from ._checks import check_same_dtype_device, check_tensor, same_memory_format

ACTIVATIONS = (None, "silu")


def group_norm_moments(x: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, m2) per (B, G) in fp32, where m2 = Σ (x - mean)² over the group.

    Moments of disjoint parts of an image combine exactly with :func:`combine_moments`.
    """
    batch = x.shape[0]
    grouped = x.reshape(batch, num_groups, -1).float()
    count = torch.full((batch, num_groups), grouped.shape[-1], dtype=torch.float32, device=x.device)
    mean = grouped.mean(dim=-1)
    m2 = (grouped - mean.unsqueeze(-1)).square().sum(dim=-1)
    return count, mean, m2


def combine_moments(parts) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (count, mean, m2) triples of disjoint parts (Chan et al.'s parallel variance)."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine_moments needs at least one (count, mean, m2) part")
    count, mean, m2 = parts[0]
    for other_count, other_mean, other_m2 in parts[1:]:
        total = count + other_count
        delta = other_mean - mean
        mean = mean + delta * (other_count / total)
        m2 = m2 + other_m2 + delta.square() * (count * other_count / total)
        count = total
    return count, mean, m2


def stats_from_moments(moments, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) for ``stats=`` from combined moments."""
    count, mean, m2 = moments
    return mean, torch.rsqrt(m2 / count + eps)


def group_norm_reference(x, num_groups, weight, bias, eps, activation, residual, stats):
    batch, channels = x.shape[:2]
    grouped = x.float().reshape(batch, num_groups, -1)
    if stats is None:
        mean = grouped.mean(dim=-1)
        rstd = torch.rsqrt(grouped.var(dim=-1, unbiased=False) + eps)
    else:
        mean, rstd = (s.float() for s in stats)
    y = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    affine_shape = (1, channels) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype).contiguous(memory_format=same_memory_format(x))


group_norm_op = registry.define("group_norm", group_norm_reference)
group_norm_op.register_lazy("aten")
group_norm_op.register_lazy("cpu")
group_norm_op.register_lazy("triton")
group_norm_op.register_lazy("cuda")


def check_group_norm_args(x, num_groups, weight, bias, activation, residual, stats) -> None:
    check_tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of the {channels} channels")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, param, ndim=(1,))
            if param.shape[0] != channels:
                raise ValueError(f"{name} has {param.shape[0]} entries for {channels} channels")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; valid: None, 'silu'")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}; they must match")
    check_same_dtype_device(x=x, weight=weight, bias=bias, residual=residual)
    if stats is not None:
        if len(stats) != 2:
            raise ValueError("stats must be a pair (mean, rstd), each of shape (B, G)")
        for name, s in zip(("mean", "rstd"), stats):
            if tuple(s.shape) != (x.shape[0], num_groups):
                raise ValueError(f"stats {name} has shape {tuple(s.shape)}, expected (B, G) = {(x.shape[0], num_groups)}")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """GroupNorm(+SiLU)(+residual) of x (B, C, *spatial); see the module docstring."""
    check_group_norm_args(x, num_groups, weight, bias, activation, residual, stats)
    return group_norm_op(x, num_groups, weight, bias, float(eps), activation, residual, stats, backend=backend)
