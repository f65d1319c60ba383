"""Pixel-space SR with a one-pass net (RRDBNet, SRVGGNetCompact, SwinIR, or the bundled default model).

    sr    = net(lq)                          lq (B, 3, h, w) in [0, 1] -> (B, 3, h·s, w·s), s = the net's scale
    image = resize(sr, round(h·scale), round(w·scale))     any output scale, bicubic (antialiased when shrinking)

Large inputs run in feathered, overlapping tiles (the tile side from ``tile`` or the memory budget).
A non-finite fp16/bf16 output is re-run in float32.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..models.layers import Conv2d
from ..runner import Stage
from ..runner.tiling import SpatialTiler
from .base import ImagePipeline, RunOptions
from .precision import SafeCopy, supported_dtype

# NOTE: overlap in input pixels; 16 covers the receptive-field edge effects of the SRVGG/RRDB convs at
# the tile border well enough that feathered tiles match the untiled output (tests/pipelines/test_pixel_sr.py).
TILE_OVERLAP = 16


def bytes_per_input_pixel(model: torch.nn.Module, dtype: torch.dtype) -> float:
    """A conservative estimate of activation bytes per input pixel: three live tensors of the widest conv's
    width at the output resolution."""
    widest = max((m.out_channels for m in model.modules() if isinstance(m, (Conv2d, torch.nn.Conv2d))), default=64)
    itemsize = torch.finfo(dtype).bits // 8
    return float(3 * widest * (model.scale**2 + 1) * itemsize)


def resize(image: torch.Tensor, size) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=shrinking).to(image.dtype)


class PixelSRPipeline(ImagePipeline):
    """See the module docstring. ``model`` is an SR net with ``scale`` and ``forward(x in [0, 1])``."""

    kind = "pixel-sr"

    def __init__(self, model: torch.nn.Module, **options):
        super().__init__(**options)
        self.dtype = supported_dtype(self.dtype, getattr(model, "supports_fp16", True), getattr(model, "supports_bf16", True))
        self.model = model.to(self.device, self.dtype).eval()
        self.scale = int(model.scale)
        self._safe_model = SafeCopy(self.model)
        self.tiler = SpatialTiler("lq", scale=self.scale, overlap=TILE_OVERLAP, window="feather",
                                  bytes_per_pixel=bytes_per_input_pixel(self.model, self.dtype), minimum_tile=32)
        self.graph.inputs = ("lq", "size")
        self.graph.append(Stage("upscale", self._upscale, ("lq",), ("sr",), dtype=self.dtype, tiler=self.tiler,
                                safe_fn=self._upscale_safe if self.dtype != torch.float32 else None, graphable=True))
        self.graph.append(Stage("resize", self._resize, ("sr", "size"), ("image",)))

    def _upscale(self, lq: torch.Tensor) -> torch.Tensor:
        return self.model(lq)

    def _upscale_safe(self, lq: torch.Tensor) -> torch.Tensor:
        return self._safe_model.get()(lq.float())

    @staticmethod
    def _resize(sr: torch.Tensor, size) -> torch.Tensor:
        return resize(sr, size).float().clamp(0, 1)

    def upscale_tensor(self, lq: torch.Tensor, prompts: Optional[List[str]], prompt_embeds, options: RunOptions) -> torch.Tensor:
        height, width = lq.shape[-2:]
        scale = options.scale if options.scale is not None else self.scale
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        self.tiler.tile = None if options.tile is None else (0 if options.tile == 0 else max(32, options.tile // self.scale))
        return self._run({"lq": lq, "size": size})


def _split_options(options: dict):
    allowed = {"device", "dtype", "max_memory", "progress", "cuda_graphs"}
    unknown = sorted(set(options) - allowed - {"scale"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(allowed | {'scale'})}")
    return {k: v for k, v in options.items() if k in allowed}


def build_default(scale: Optional[float] = None, **options) -> PixelSRPipeline:
    """The bundled SR net: ×2 weights when ``scale`` ≤ 2, else ×4 (outputs resized to ``scale`` on call)."""
    from ..data import load_default_model

    net_scale = 2 if scale is not None and float(scale) <= 2 else 4
    return PixelSRPipeline(load_default_model(net_scale), **_split_options(options))


def build_pixel_sr(model, **options) -> PixelSRPipeline:
    """A Real-ESRGAN / SwinIR checkpoint (path) or an already built SR net."""
    if not isinstance(model, torch.nn.Module):
        from ..loaders import load_model

        model = load_model(model)
    if not hasattr(model, "scale"):
        raise ValueError(f"{type(model).__name__} is not a pixel SR net (it has no 'scale'); use another pipeline kind")
    return PixelSRPipeline(model, **_split_options(options))
