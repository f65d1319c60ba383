"""Exact, memory-bounded execution of the SD UNet: layer by layer, tile by tile, with whole-latent context.

Cutting the latent into overlapping tiles and blending the UNet's outputs (the reference's latent tiling)
changes the result: every tile's GroupNorm statistics and self-attention see only the tile. With random
weights a 32-latent tile's noise prediction differs from the whole latent's by 5-13% of ε, 28-38 dB in the
image. :class:`TiledUNet` instead runs every primitive of the UNet as a step of
:mod:`flashstep.runner.streaming` over FULL maps (device, host RAM or disk), one output tile at a time:

    conv_in                             3×3 conv tiles
    resnet                              h = conv1(silu(norm1(x))) + time_emb_proj(silu(emb)),
                                        conv2(silu(norm2(h))) + shortcut(x)
    Transformer2DModel                  proj_in(norm(x)) per pixel; per BasicTransformerBlock: self-attention of
                                        each band of query rows against the keys and values of the whole map,
                                        then cross-attention and feed-forward per token; x + proj_out(·) per pixel
    down / up sampling                  stride-2 conv tiles / nearest 2× + conv tiles
    up-block resnets                    read [h, skip] concatenated window by window (GroupNorm groups that
                                        span both merge their channels' moments)
    conv_out                            conv(silu(conv_norm_out(h)))

Every GroupNorm uses the whole map's statistics, so the output equals ``unet(sample, t, context)`` up to
float rounding, with no seam, on latents whose sides are multiples of 2^(levels-1) (the SR pipelines pad
theirs to 8). Skip maps stay in the store until the up path reads them.
Memory: a tile's working set, the weights, the maps the budget keeps on the device, and for each
self-attention the keys and values of its whole map (2·B·H·W·C values).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..models.transformer_2d import Transformer2DModel
from .memory import MemoryBudget
from .stream_steps import ConvStep, Step, TokenStep, TransformerBlockStep
from .streaming import StreamedModel, plain_peak_bytes


def _pointwise(module, linear: bool):
    """A Linear (over channels) or 1×1 conv as a function of (B, C, r, c) tiles."""
    if linear:
        return lambda tile: module(tile.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return module


def resnet_steps(name: str, resnet, source, temb_act: torch.Tensor) -> List[Step]:
    """ResnetBlock2D with its time embedding as a per-channel bias of conv1."""
    hidden = f"{name}.conv1"
    bias = resnet.time_emb_proj(temb_act) if resnet.time_emb_proj is not None and temb_act is not None else None
    return [
        ConvStep(hidden, source, resnet.conv1, norm=resnet.norm1, bias=bias),
        ConvStep(name, hidden, resnet.conv2, norm=resnet.norm2, residual=source, shortcut=resnet.conv_shortcut),
    ]


def transformer_steps(name: str, transformer: Transformer2DModel, source: str, context: torch.Tensor) -> List[Step]:
    """Transformer2DModel: norm + proj_in, each block, proj_out + the input."""
    linear = transformer.linear_projection
    channels = transformer.norm.num_channels
    steps: List[Step] = [TokenStep(f"{name}.proj_in", source, _pointwise(transformer.proj_in, linear), channels,
                                   norm=transformer.norm)]
    for index, block in enumerate(transformer.transformer_blocks):
        steps.append(TransformerBlockStep(f"{name}.transformer_blocks.{index}", steps[-1].output, block, context))
    steps.append(TokenStep(name, steps[-1].output, _pointwise(transformer.proj_out, linear), channels,
                           residual=source))
    return steps


def unet_plan(unet, temb_act: Optional[torch.Tensor], context: Optional[torch.Tensor]) -> List[Step]:
    """The steps of ``unet.forward`` after the time embedding; the input map is named ``"input"``.
    (``temb_act`` and ``context`` None: a plan for its shapes and bytes only.)"""
    steps: List[Step] = [ConvStep("conv_in", "input", unet.conv_in)]
    skips = ["conv_in"]

    def add_block_layers(prefix: str, block, skips_to_read: Optional[List[str]] = None) -> List[str]:
        """Each resnet (and its transformer) of ``block``; resnets read [h, skip] when ``skips_to_read`` is
        given (last first). Returns each layer's output map."""
        attentions = getattr(block, "attentions", None)
        outputs = []
        for j, resnet in enumerate(block.resnets):
            source = steps[-1].output if skips_to_read is None else (steps[-1].output, skips_to_read.pop())
            steps.extend(resnet_steps(f"{prefix}.resnets.{j}", resnet, source, temb_act))
            if attentions is not None:
                steps.extend(transformer_steps(f"{prefix}.attentions.{j}", attentions[j], steps[-1].output, context))
            outputs.append(steps[-1].output)
        return outputs

    for i, block in enumerate(unet.down_blocks):
        skips.extend(add_block_layers(f"down_blocks.{i}", block))
        if block.downsamplers is not None:
            steps.append(ConvStep(f"down_blocks.{i}.downsamplers.0", steps[-1].output, block.downsamplers[0].conv))
            skips.append(steps[-1].output)

    mid = unet.mid_block
    steps.extend(resnet_steps("mid_block.resnets.0", mid.resnets[0], steps[-1].output, temb_act))
    steps.extend(transformer_steps("mid_block.attentions.0", mid.attentions[0], steps[-1].output, context))
    steps.extend(resnet_steps("mid_block.resnets.1", mid.resnets[1], steps[-1].output, temb_act))

    for i, block in enumerate(unet.up_blocks):
        add_block_layers(f"up_blocks.{i}", block, skips)
        if block.upsamplers is not None:
            steps.append(ConvStep(f"up_blocks.{i}.upsamplers.0", steps[-1].output, block.upsamplers[0].conv,
                                  upsample=True))

    steps.append(ConvStep("conv_out", steps[-1].output, unet.conv_out, norm=unet.conv_norm_out))
    return steps


class TiledUNet(StreamedModel):
    """``unet(sample, timestep, context, text_embeds, time_ids)`` streamed through full maps (see the module
    docstring); the options are :class:`~flashstep.runner.streaming.StreamedModel`'s.

    sample (B, C, h, w) with h and w multiples of 2^(levels-1) (the pipelines pad their latents to 8).
    """

    def __init__(self, unet, budget: MemoryBudget, tile: Optional[int] = None, progress: bool = False, *,
                 host_memory: Optional[Union[str, int]] = None, store: Optional[str] = None):
        super().__init__(budget, tile, progress, host_memory=host_memory, store=store)
        self.unet = unet
        self._plain_peaks: Dict[Tuple[Tuple[int, ...], torch.dtype], int] = {}

    @property
    def multiple(self) -> int:
        return 2 ** sum(block.downsamplers is not None for block in self.unet.down_blocks)

    def untiled_peak_bytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Estimated activation bytes of the plain ``unet`` on a latent of ``shape``: the most it holds at once,
        the skips waiting for the up path included. Kept per shape: the pipelines ask before every call."""
        key = (tuple(shape), dtype)
        if key not in self._plain_peaks:
            self._plain_peaks[key] = plain_peak_bytes(unet_plan(self.unet, None, None), shape, dtype)
        return self._plain_peaks[key]

    def __call__(self, sample: torch.Tensor, timestep, context: torch.Tensor,
                 text_embeds: Optional[torch.Tensor] = None, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        height, width = sample.shape[-2:]
        if height % self.multiple or width % self.multiple:
            raise ValueError(f"a streamed UNet needs latent sides that are multiples of {self.multiple}, got "
                             f"{height}×{width}; pad the latent (the SR pipelines pad their input to 64 pixels)")
        parameter = next(self.unet.parameters())
        with torch.no_grad():
            emb = self.unet.time_embed(timestep, sample.shape[0], parameter.dtype, parameter.device, text_embeds,
                                       time_ids)
            steps = unet_plan(self.unet, F.silu(emb), context.to(parameter.device, parameter.dtype))
            return self._stream(steps, sample, "UNet", parameter)
