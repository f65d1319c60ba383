"""How the denoise stage of the SR pipelines runs a latent larger than its tile or the memory budget.

Two modes, chosen per pipeline (``latent_tiling=``):

* ``"exact"`` (default): the UNet streamed layer by layer over the whole latent
  (:class:`~flashstep.runner.unet_tiling.TiledUNet`): every GroupNorm and self-attention sees the whole
  latent, so the result equals the untiled UNet up to float rounding. It streams when ``tile`` (output
  pixels, /8 per latent pixel) is smaller than the latent, or, with no tile given, when the plain UNet's
  estimated activation peak exceeds the budget.
* ``"gaussian"``: the reference's latent tiling: overlapping latent tiles through the plain UNet, blended
  with a Gaussian window (:class:`~flashstep.runner.tiling.SpatialTiler`). Each tile sees only itself, so
  the result differs from the untiled one (28-38 dB in the image with random weights).

:class:`LatentTiling` is the stage's tiler; the stage's function calls :meth:`LatentTiling.unet`, which is the
plain UNet or its streamed form as the current call decided.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ..runner.memory import MemoryBudget
from ..runner.tiling import SpatialTiler, is_out_of_memory
from ..runner.unet_tiling import TiledUNet

MODES = ("exact", "gaussian")
LATENT_FACTOR = 8
# NOTE: the blended tiling as in the reference (96-latent tiles, 32 overlap); its budget estimate is a
# conservative 2 MB per latent pixel for the SD UNet at fp16 (peak activations at the first level).
LATENT_OVERLAP = 32
UNET_BYTES_PER_LATENT_PIXEL = 2.0 * 2**20
MINIMUM_BLEND_TILE = 32


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"latent_tiling={mode!r}; valid: {', '.join(MODES)}")
    return mode


class LatentTiling:
    """The denoise stage's tiler (see the module docstring). ``tile``: the call's output-pixel tile (None:
    from the budget; 0: never tile), set by the pipeline before each run. ``unet_batch``: UNet samples per
    latent (2 where both guidance branches run in one call)."""

    def __init__(self, unet, budget: MemoryBudget, mode: str = "exact", progress: bool = False, unet_batch: int = 1):
        self.plain = unet
        self.unet_batch = unet_batch
        self.mode = check_mode(mode)
        self.streamed = TiledUNet(unet, budget, progress=progress)
        self.blend = SpatialTiler("latent", scale=1, tile=None, overlap=LATENT_OVERLAP, window="gaussian",
                                  bytes_per_pixel=UNET_BYTES_PER_LATENT_PIXEL, multiple=LATENT_FACTOR,
                                  minimum_tile=MINIMUM_BLEND_TILE)
        self.tile: Optional[int] = None
        self.streaming = False

    def __str__(self) -> str:
        if self.mode == "gaussian":
            return str(self.blend)
        size = f"{self.tile // LATENT_FACTOR}-latent tiles" if self.tile else "tiles from the budget"
        return f"latent streamed layer by layer, whole-latent statistics and attention ({size})"

    def unet(self, *args, **kwargs) -> torch.Tensor:
        return (self.streamed if self.streaming else self.plain)(*args, **kwargs)

    def streams(self, latent: torch.Tensor, budget: MemoryBudget) -> bool:
        """Whether the exact mode streams this latent (batch as the UNet will see it)."""
        if self.tile == 0:
            return False
        if self.tile is not None:
            return max(latent.shape[-2:]) > max(1, self.tile // LATENT_FACTOR)
        shape = (latent.shape[0] * self.unet_batch,) + tuple(latent.shape[1:])
        return self.streamed.untiled_peak_bytes(shape, latent.dtype) > budget.bytes

    def graphable(self, args: Dict[str, Any], budget: MemoryBudget) -> bool:
        """A streamed call moves maps between stores and cannot be captured in a CUDA graph."""
        return self.mode == "gaussian" or not self.streams(args["latent"], budget)

    def run(self, fn: Callable[..., Any], args: Dict[str, Any], *, budget: MemoryBudget, record=None,
            progress: bool = False, on_retry: Callable[[str], None] = lambda message: None) -> Any:
        if self.mode == "gaussian":
            self.blend.tile = None if self.tile is None else (
                0 if self.tile == 0 else max(MINIMUM_BLEND_TILE, self.tile // LATENT_FACTOR))
            return self.blend.run(fn, args, budget=budget, record=record, progress=progress, on_retry=on_retry)
        streaming = self.streams(args["latent"], budget)
        try:
            result = self._call(fn, args, budget, progress, streaming)
        except RuntimeError as error:
            if streaming or not is_out_of_memory(error):
                raise
            torch.cuda.empty_cache()
            on_retry("out of memory in the whole-latent UNet; streaming it layer by layer")
            streaming = True
            result = self._call(fn, args, budget, progress, streaming)
        if record is not None:
            record.tiles = self.streamed.last_run.tiles if streaming else 0
        return result

    def _call(self, fn, args: Dict[str, Any], budget: MemoryBudget, progress: bool, streaming: bool):
        self.streamed.budget, self.streamed.progress = budget, progress
        self.streamed.tile = max(1, self.tile // LATENT_FACTOR) if streaming and self.tile else None
        self.streaming = streaming
        try:
            return fn(**args)
        finally:
            self.streaming = False
