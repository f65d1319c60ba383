"""Spatial tiling of a stage: split one input into overlapping tiles, run the stage on each, blend.

A :class:`SpatialTiler` cuts the stage input ``input_name`` (B, C, h, w) into tiles of side ``tile`` with
``overlap`` (input pixels), runs the stage function on each (the other inputs are passed whole), and
blends the outputs (B, C', h·s, w·s) with a window that falls off towards the tile's inner edges:

* ``"gaussian"`` — the latent tiling of OSEDiff/S3Diff: w(u) = exp(-(u - mid)² / (2·0.01·T²)) per axis,
  products of the two axes; blended outputs are Σ w·out / Σ w.
* ``"feather"`` — for pixel SR nets: weight 1 in the interior, a linear ramp across the overlap of each
  inner edge, 1 at the image border (no fall-off where there is no neighbour).

Tiles start every ``tile - overlap`` pixels and the last row/column is aligned to the border. The tile side
comes from the call (``tile``; 0 means never tile), else from the memory budget and the stage's bytes per
input pixel. On a GPU
out-of-memory error the tile side is halved and the stage re-run (said once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .memory import MemoryBudget


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` (the last aligned to the end)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def gaussian_window(height: int, width: int, variance: float = 0.01) -> torch.Tensor:
    def axis(n: int) -> torch.Tensor:
        u = torch.arange(n, dtype=torch.float32)
        mid = (n - 1) / 2
        return torch.exp(-((u - mid) ** 2) / (n * n * 2 * variance)) / math.sqrt(2 * math.pi * variance)

    return axis(height)[:, None] * axis(width)[None, :]


def feather_window(height: int, width: int, ramp: int, edges: Tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """1 inside, a linear ramp of ``ramp`` pixels on each edge that has a neighbour (top, bottom, left, right)."""

    def axis(n: int, low: bool, high: bool) -> torch.Tensor:
        w = torch.ones(n, dtype=torch.float32)
        r = min(ramp, n // 2)
        if r > 0:
            ramp_up = (torch.arange(r, dtype=torch.float32) + 0.5) / r
            if low:
                w[:r] = torch.minimum(w[:r], ramp_up)
            if high:
                w[n - r:] = torch.minimum(w[n - r:], ramp_up.flip(0))
        return w

    top, bottom, left, right = edges
    return axis(height, top, bottom)[:, None] * axis(width, left, right)[None, :]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class SpatialTiler:
    """See the module docstring. ``scale``: output pixels per input pixel; ``multiple``: tile sides and
    starts are multiples of it (e.g. 8 for latents that a VAE made)."""

    input_name: str
    scale: int = 1
    tile: Optional[int] = None
    overlap: int = 32
    window: str = "gaussian"
    bytes_per_pixel: float = 64 * 1024.0
    multiple: int = 1
    minimum_tile: int = 16

    def __str__(self) -> str:
        size = self.tile if self.tile is not None else "auto"
        return f"{self.input_name} in {size}-pixel tiles, overlap {self.overlap}, {self.window} blend"

    def tile_side(self, budget: MemoryBudget) -> int:
        if self.tile is not None:
            return self.tile
        return budget.tile_side(self.bytes_per_pixel, multiple=max(self.multiple, 1), minimum=self.minimum_tile)

    def graphable(self, args: Dict[str, Any], budget: MemoryBudget) -> bool:
        """Each tile is one static-shape call of the stage function, so a CUDA graph may capture it."""
        return True

    def run(self, fn: Callable[..., Any], args: Dict[str, Any], *, budget: MemoryBudget, record=None,
            progress: bool = False, on_retry: Callable[[str], None] = lambda message: None) -> Any:
        side = self.tile_side(budget)
        while True:
            try:
                return self._run_tiles(fn, args, side, record, progress)
            except RuntimeError as error:
                # NOTE: a side larger than the input ran it whole; halving starts from the input's longer side,
                # or the first retries would run the same whole input again.
                current = min(side, max(args[self.input_name].shape[-2:]))
                if not is_out_of_memory(error) or side <= 0 or current // 2 < self.minimum_tile:
                    raise
                torch.cuda.empty_cache()
                side = max(self.minimum_tile, (current // 2) // max(self.multiple, 1) * max(self.multiple, 1))
                on_retry(f"out of memory; retrying {self.input_name} with {side}-pixel tiles")

    def _run_tiles(self, fn, args, side: int, record, progress: bool):
        x = args[self.input_name]
        height, width = x.shape[-2:]
        if side <= 0 or (height <= side and width <= side):
            if record is not None:
                record.tiles = 0
            return fn(**args)
        overlap = min(self.overlap, side // 2)
        rows, cols = tile_starts(height, side, overlap), tile_starts(width, side, overlap)
        boxes = [(top, left) for top in rows for left in cols]
        if record is not None:
            record.tiles = len(boxes)
        iterator = boxes
        if progress:
            from tqdm import tqdm

            iterator = tqdm(boxes, desc=f"tiles of {self.input_name}", unit="tile", leave=False)
        s = self.scale
        output = weights = None
        for top, left in iterator:
            tile_h, tile_w = min(side, height), min(side, width)
            piece = x[..., top : top + tile_h, left : left + tile_w]
            result = fn(**{**args, self.input_name: piece})
            if output is None:
                output = torch.zeros(result.shape[:-2] + (height * s, width * s), dtype=torch.float32, device=result.device)
                weights = torch.zeros((height * s, width * s), dtype=torch.float32, device=result.device)
            window = self._window(tile_h * s, tile_w * s, overlap * s,
                                  (top > 0, top + tile_h < height, left > 0, left + tile_w < width)).to(result.device)
            region = (slice(top * s, (top + tile_h) * s), slice(left * s, (left + tile_w) * s))
            output[(..., *region)] += result.float() * window
            weights[region] += window
        return (output / weights).to(result.dtype)

    def _window(self, height: int, width: int, overlap: int, edges) -> torch.Tensor:
        if self.window == "gaussian":
            return gaussian_window(height, width)
        if self.window == "feather":
            return feather_window(height, width, overlap, edges)
        raise ValueError(f"unknown tile window {self.window!r}; valid: gaussian, feather")
