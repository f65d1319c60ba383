"""The LoRA branch added onto a base output in place, shared by the aten conv2d, linear and geglu paths.

With t = A x the rank-r activations, the branch is scale · B · Mᵀ_b · t_b: one batched GEMM of the
(Cout × r) matrix scale · B · Mᵀ_b against t, accumulated into y.
"""
from __future__ import annotations

import torch

from ...ops.lora import LoRA


def _mixed_up(lora: LoRA, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """scale · B · Mᵀ as (Batch, Cout, r) in ``dtype``."""
    mixed = lora.mixed_up(torch.float32).to(dtype)
    return mixed.expand(batch, -1, -1) if mixed.dim() == 2 else mixed


def add_lora_to_rows_(y_rows: torch.Tensor, t_rows: torch.Tensor, lora: LoRA) -> None:
    """y_rows (Batch, P, Cout) += t_rows (Batch, P, r) · (scale · B · Mᵀ)ᵀ."""
    y_rows.baddbmm_(t_rows, _mixed_up(lora, y_rows.shape[0], y_rows.dtype).transpose(1, 2))


def add_lora_to_feature_map_(y: torch.Tensor, t: torch.Tensor, lora: LoRA) -> torch.Tensor:
    """y (Batch, Cout, H, W) += scale · B · Mᵀ · t with t (Batch, r, H, W); returns y (maybe a new tensor)."""
    batch, channels, height, width = y.shape
    rank = t.shape[1]
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        y_rows = y.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view
        t_rows = t.permute(0, 2, 3, 1).reshape(batch, height * width, rank)
        add_lora_to_rows_(y_rows, t_rows, lora)
        return y
    y = y.contiguous()
    mixed = _mixed_up(lora, batch, y.dtype)  # (Batch, Cout, r)
    y.view(batch, channels, height * width).baddbmm_(mixed, t.reshape(batch, rank, height * width))
    return y
