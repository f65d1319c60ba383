"""Low-rank adapters for convolutions and linear layers, static or per sample.

A LoRA adds a rank-r delta to a weight W (Cout, Cin[, kh, kw])::

    W' = W + scale · B · A                      static (peft: scale = lora_alpha / r)
    W'_b = W + scale · B · M_bᵀ · A             per sample b, degradation-guided LoRA (S3Diff)

with A = ``down`` (r, Cin[, kh, kw]), B = ``up`` (Cout, r) and M = ``mix`` (r, r) shared or
(Batch, r, r) per sample. Applied to an input x this is ``y = W x + scale · B (Mᵀ (A x))``: the
per-sample form costs one extra rank-r convolution and a tiny (Cout × r) GEMM per sample, never a
rebuilt copy of W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LoRA:
    """A LoRA delta: ``down`` = A (r, Cin[, kh, kw]), ``up`` = B (Cout, r), ``scale``, ``mix`` = M.

    ``up`` may also be given as (Cout, r, 1, 1), the layout of a peft conv ``lora_B``.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    mix: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.up.dim() == 4:
            if self.up.shape[2:] != (1, 1):
                raise ValueError(f"LoRA up (B) must be (Cout, r) or (Cout, r, 1, 1), got {tuple(self.up.shape)}")
            object.__setattr__(self, "up", self.up.reshape(self.up.shape[0], self.up.shape[1]))
        if self.up.dim() != 2:
            raise ValueError(f"LoRA up (B) must be (Cout, r), got {tuple(self.up.shape)}")
        if self.down.dim() not in (2, 4):
            raise ValueError(f"LoRA down (A) must be (r, Cin) or (r, Cin, kh, kw), got {tuple(self.down.shape)}")
        rank = self.down.shape[0]
        if self.up.shape[1] != rank:
            raise ValueError(
                f"LoRA ranks disagree: down (A) {tuple(self.down.shape)} has rank {rank}, "
                f"up (B) {tuple(self.up.shape)} has rank {self.up.shape[1]}"
            )
        if self.mix is not None and (self.mix.dim() not in (2, 3) or tuple(self.mix.shape[-2:]) != (rank, rank)):
            raise ValueError(f"LoRA mix (M) must be (r, r) or (Batch, r, r) with r={rank}, got {tuple(self.mix.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def per_sample(self) -> bool:
        return self.mix is not None and self.mix.dim() == 3

    def with_mix(self, mix: Optional[torch.Tensor]) -> "LoRA":
        return LoRA(self.down, self.up, self.scale, mix)

    def check_against(self, weight: torch.Tensor, batch: Optional[int] = None) -> None:
        """Raise ValueError unless this LoRA fits ``weight`` (and an input batch of ``batch``)."""
        expected_down = (self.rank,) + tuple(weight.shape[1:])
        if tuple(self.down.shape) != expected_down:
            raise ValueError(
                f"LoRA down (A) has shape {tuple(self.down.shape)}; for a weight of shape "
                f"{tuple(weight.shape)} it must be {expected_down}"
            )
        if self.up.shape[0] != weight.shape[0]:
            raise ValueError(
                f"LoRA up (B) has shape {tuple(self.up.shape)}; for a weight of shape {tuple(weight.shape)} "
                f"it must be ({weight.shape[0]}, {self.rank})"
            )
        if self.per_sample and batch is not None and self.mix.shape[0] != batch:
            raise ValueError(f"LoRA mix (M) holds {self.mix.shape[0]} matrices but the input batch is {batch}")

    def mixed_up(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale · B · Mᵀ: (Cout, r), or (Batch, Cout, r) per sample."""
        up = self.up.to(dtype)
        if self.mix is None:
            return up * self.scale
        return torch.matmul(up, self.mix.to(dtype).transpose(-1, -2)) * self.scale


def lora_delta(weight: torch.Tensor, lora: LoRA) -> torch.Tensor:
    """scale · B · Mᵀ · A in fp32, shaped like ``weight`` (or (Batch, *weight.shape) per sample)."""
    lora.check_against(weight)
    down = lora.down.float().reshape(lora.rank, -1)  # (r, Cin·kh·kw)
    delta = torch.matmul(lora.mixed_up(torch.float32), down)
    return delta.reshape(delta.shape[:-2] + tuple(weight.shape))


def merge_lora(weight: torch.Tensor, lora: LoRA) -> torch.Tensor:
    """W + scale · B · Mᵀ · A, computed in fp32 and returned in ``weight``'s dtype.

    Merging is for static LoRA (``mix`` None or (r, r)); a per-sample mix has no single weight.
    """
    if lora.per_sample:
        raise ValueError("a per-sample LoRA (mix of shape (Batch, r, r)) cannot be merged into one weight; pass it to the op")
    return (weight.float() + lora_delta(weight, lora)).to(weight.dtype)


def merge_lora_(weight: torch.Tensor, lora: LoRA) -> torch.Tensor:
    """W <- W + scale · B · Mᵀ · A in place, in fp32 arithmetic; returns W.

    A float32 W is updated by one GEMM accumulating into it (one pass over W); other dtypes go through
    :func:`merge_lora`'s fp32 copy.

    NOTE: loading OSEDiff (290 LoRA'd layers, 0.9 B weights, fp32, 2 threads on the development machine) spent
    14.6 s in :func:`merge_lora` plus the copy back (five passes over every weight, and fp32 temporaries);
    in place it takes 5.0 s, most of it the first write to each memory-mapped weight page.
    """
    if lora.per_sample:
        raise ValueError("a per-sample LoRA (mix of shape (Batch, r, r)) cannot be merged into one weight; pass it to the op")
    lora.check_against(weight)
    if weight.dtype == torch.float32 and weight.is_contiguous():
        down = lora.down.float().reshape(lora.rank, -1)  # (r, Cin·kh·kw)
        weight.view(weight.shape[0], -1).addmm_(lora.mixed_up(torch.float32), down)
    else:
        weight.copy_(merge_lora(weight, lora))
    return weight
