"""Precision helpers shared by pipelines: a safe (float32) copy of a module, made on first need."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class SafeCopy:
    """A float32 copy of ``module``, built the first time a stage's output is not finite and kept after."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32):
        self.module = module
        self.dtype = dtype
        self._copy: Optional[nn.Module] = None

    def get(self) -> nn.Module:
        if self._copy is None:
            if next(self.module.parameters()).dtype == self.dtype:
                self._copy = self.module
            else:
                self._copy = copy.deepcopy(self.module).to(self.dtype)
        return self._copy


def supported_dtype(requested: torch.dtype, supports_fp16: bool, supports_bf16: bool) -> torch.dtype:
    """The requested dtype, or the closest one the model claims to handle (bf16, then fp32)."""
    if requested == torch.float16 and not supports_fp16:
        return torch.bfloat16 if supports_bf16 else torch.float32
    if requested == torch.bfloat16 and not supports_bf16:
        return torch.float32
    return requested
