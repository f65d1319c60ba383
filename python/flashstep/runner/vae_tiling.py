"""Exact, memory-bounded execution of the SD VAE encoder and decoder: layer by layer, tile by tile.

The untiled VAE keeps a few full activation maps of its widest level alive at once (at 2048² the decoder's
last levels are 128-256 channels × 2048², 1-2 GB each in fp16). :class:`TiledVAE` instead runs every
primitive of ``vae.encoder`` / ``vae.decoder`` as a step of :mod:`flashstep.runner.streaming` over FULL maps
held in a :class:`~flashstep.runner.feature_store.FeatureStore` (device, host RAM or disk), one output tile at
a time:

* a convolution (3×3, 1×1 or stride 2) reads its output tile's input window plus the halo it needs; in front
  of it, on the window: the block's GroupNorm + SiLU (whole-map statistics), or nearest 2× upsampling, or
  the 1×1 post_quant_conv; after it, on the tile: the residual (through the 1×1 shortcut) and the 1×1
  quant_conv.
* The mid-block attention (1/8 of the image side) runs on the whole map through the module, or, when that
  map does not fit the tile budget, over bands of query rows against the full K and V.

So the result equals the untiled forward up to float rounding (no seams, no brightness steps), and the
compute device holds a tile's working set, the weights, and the maps the budget lets it keep.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..models.vae import LOGVAR_MAX, LOGVAR_MIN
from .feature_store import map_bytes
from .memory import MemoryBudget
from .stream_steps import ConvStep, SpatialAttentionStep, Step, conv_input_window, plan_shapes
from .streaming import StreamedModel

__all__ = ["TiledVAE", "encoder_plan", "decoder_plan", "plan_shapes", "conv_input_window"]

def _resnet_steps(name: str, resnet, source: str) -> List[Step]:
    """ResnetBlock2D: conv1(silu(norm1(x))), then conv2(silu(norm2(h))) + shortcut(x)."""
    if resnet.time_emb_proj is not None:
        raise ValueError(f"{name} has a time embedding; the VAE's resnets have none")
    hidden = f"{name}.conv1"
    return [
        ConvStep(hidden, source, resnet.conv1, norm=resnet.norm1),
        ConvStep(name, hidden, resnet.conv2, norm=resnet.norm2, residual=source, shortcut=resnet.conv_shortcut),
    ]


def _mid_block_steps(name: str, block, source: str) -> List[Step]:
    steps = _resnet_steps(f"{name}.resnets.0", block.resnets[0], source)
    steps.append(SpatialAttentionStep(f"{name}.attentions.0", steps[-1].output, block.attentions[0]))
    steps += _resnet_steps(f"{name}.resnets.1", block.resnets[1], steps[-1].output)
    return steps


def encoder_plan(vae) -> List[Step]:
    """The steps of ``quant_conv(encoder(x))``; the input map is named ``"input"``."""
    encoder = vae.encoder
    steps: List[Step] = [ConvStep("encoder.conv_in", "input", encoder.conv_in)]
    for i, block in enumerate(encoder.down_blocks):
        for j, resnet in enumerate(block.resnets):
            steps += _resnet_steps(f"encoder.down_blocks.{i}.resnets.{j}", resnet, steps[-1].output)
        if block.downsamplers is not None:
            down = block.downsamplers[0]
            steps.append(ConvStep(f"encoder.down_blocks.{i}.downsamplers.0", steps[-1].output, down.conv,
                                  pad_right_bottom=down.pad_right_bottom))
    steps += _mid_block_steps("encoder.mid_block", encoder.mid_block, steps[-1].output)
    steps.append(ConvStep("quant_conv", steps[-1].output, encoder.conv_out, norm=encoder.conv_norm_out,
                          pointwise_after=vae.quant_conv))
    return steps


def decoder_plan(vae) -> List[Step]:
    """The steps of ``decoder(post_quant_conv(z))``; the input map is named ``"input"``."""
    decoder = vae.decoder
    steps: List[Step] = [ConvStep("decoder.conv_in", "input", decoder.conv_in, pointwise_before=vae.post_quant_conv)]
    steps += _mid_block_steps("decoder.mid_block", decoder.mid_block, steps[-1].output)
    for i, block in enumerate(decoder.up_blocks):
        for j, resnet in enumerate(block.resnets):
            steps += _resnet_steps(f"decoder.up_blocks.{i}.resnets.{j}", resnet, steps[-1].output)
        if block.upsamplers is not None:
            steps.append(ConvStep(f"decoder.up_blocks.{i}.upsamplers.0", steps[-1].output,
                                  block.upsamplers[0].conv, upsample=True))
    steps.append(ConvStep("decoder.conv_out", steps[-1].output, decoder.conv_out, norm=decoder.conv_norm_out))
    return steps


class TiledVAE(StreamedModel):
    """Runs ``vae.encode`` / ``vae.decode`` streamed through full maps (see the module docstring); the options
    are :class:`~flashstep.runner.streaming.StreamedModel`'s."""

    def __init__(self, vae, budget: MemoryBudget, tile: Optional[int] = None, progress: bool = False, *,
                 host_memory: Optional[Union[str, int]] = None, store: Optional[str] = None):
        super().__init__(budget, tile, progress, host_memory=host_memory, store=store)
        self.vae = vae

    # -- public API ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, latent, H/f, W/f), as ``vae.encode``."""
        mean, logvar = self._run(encoder_plan(self.vae), x, "VAE encode").chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, h, w), unscaled -> image (B, 3, f·h, f·w), as ``vae.decode``."""
        return self._run(decoder_plan(self.vae), z, "VAE decode")

    def untiled_peak_bytes(self, shape: Sequence[int], dtype: torch.dtype, direction: Optional[str] = None) -> int:
        """Estimated activation bytes of the plain ``vae.encode`` / ``vae.decode`` on ``shape``: the live maps
        of its most expensive step (a few maps of the widest level), input and output included."""
        steps = self._plan(shape, direction)
        shapes = plan_shapes(steps, shape)
        element_size = torch.empty((), dtype=dtype).element_size()
        widest = max(step.untiled_bytes(shapes, element_size) for step in steps)
        return widest + map_bytes(shape, dtype) + map_bytes(shapes[steps[-1].output], dtype)

    def should_tile(self, shape: Sequence[int], dtype: torch.dtype, direction: Optional[str] = None) -> bool:
        """True when the plain VAE on ``shape`` (an image to encode or a latent to decode) would not fit the
        budget. ``direction`` ("encode"/"decode") is read from the channel count when not given."""
        return self.untiled_peak_bytes(shape, dtype, direction) > self.budget.bytes

    # -- planning -----------------------------------------------------------------------------------
    def _plan(self, shape: Sequence[int], direction: Optional[str]) -> List[Step]:
        config = self.vae.config
        if direction is None:
            channels = shape[1]
            if channels == config.latent_channels and channels != config.in_channels:
                direction = "decode"
            elif channels == config.in_channels and channels != config.latent_channels:
                direction = "encode"
            else:
                raise ValueError(f"cannot tell from {channels} channels whether {tuple(shape)} is an image or a "
                                 "latent; pass direction='encode' or 'decode'")
        if direction == "encode":
            return encoder_plan(self.vae)
        if direction == "decode":
            return decoder_plan(self.vae)
        raise ValueError(f"direction={direction!r}; valid: 'encode', 'decode'")

    def _run(self, steps: List[Step], x: torch.Tensor, label: str) -> torch.Tensor:
        return self._stream(steps, x, label, next(self.vae.parameters()))
