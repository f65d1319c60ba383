"""The VAE of a pipeline, run whole when it fits the memory budget and streamed tile by tile (exactly,
:class:`~flashstep.runner.vae_tiling.TiledVAE`) when it does not."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..runner import MemoryBudget
from ..runner.vae_tiling import TiledVAE


class VAERunner:
    """``encode``/``decode`` with the plain VAE, or its exact tiled form beyond the budget.

    ``allow_tiling`` False (a call's ``tile=0``) always runs the plain VAE.
    """

    def __init__(self, vae, budget: MemoryBudget, progress: bool = False):
        self.vae = vae
        self.tiled = TiledVAE(vae, budget, progress=progress)
        self.allow_tiling = True
        self.last_tiled = False

    def _tiles(self, x: torch.Tensor, direction: str) -> bool:
        self.last_tiled = self.allow_tiling and self.tiled.should_tile(x.shape, x.dtype, direction)
        return self.last_tiled

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.tiled.encode(x) if self._tiles(x, "encode") else self.vae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.tiled.decode(z) if self._tiles(z, "decode") else self.vae.decode(z)


class SafeVAERunner:
    """A :class:`VAERunner` over the float32 copy of the VAE, built on first need."""

    def __init__(self, safe_copy, budget: MemoryBudget, progress: bool = False):
        self.safe_copy = safe_copy
        self.budget = budget
        self.progress = progress
        self._runner: Optional[VAERunner] = None

    def get(self, allow_tiling: bool) -> VAERunner:
        if self._runner is None:
            self._runner = VAERunner(self.safe_copy.get(), self.budget, self.progress)
        self._runner.allow_tiling = allow_tiling
        return self._runner
