"""The steps of a streamed (layer-by-layer, tile-by-tile) run: what each reads and writes, its shapes and bytes.

A plan is a list of steps over named full maps (B, C, H, W); the input map is ``"input"``.
:class:`~flashstep.runner.streaming.StreamedRun` executes it. Four kinds:

* :class:`ConvStep` — ``[pointwise_after](conv([upsample](prologue(cat(sources)))) [+ bias]
  [+ shortcut(cat(residual))])``, per output tile with the conv's halo; prologue = silu(group_norm) with
  whole-map statistics, or a 1×1 conv.
* :class:`SpatialAttentionStep` — the VAE mid-block attention (one head, GroupNorm first, residual after).
* :class:`TokenStep` — a per-pixel function (a Linear or 1×1 conv over channels), optionally after a
  GroupNorm with whole-map statistics and before a residual add.
* :class:`TransformerBlockStep` — a UNet ``BasicTransformerBlock`` over the map's pixels as tokens (row-major,
  as the module orders them): self-attention against the keys and values of the whole map, then the
  per-token cross-attention and feed-forward.

Several sources are concatenated along channels (the UNet's up path reads [h, skip]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..models.attention import SpatialSelfAttention
from ..models.layers import Conv2d, GroupNorm

Names = Union[str, Tuple[str, ...]]

# Bytes a conv tile needs per output pixel, in fp32 units of its channels: the input window, its
# normalised (fp32) and zero-padded copies (3 per input pixel), and the conv output, its cropped copy,
# the residual, the shortcut and the fp32 moments copy (5 per output pixel).
CONV_INPUT_COPIES, CONV_OUTPUT_COPIES = 3, 5
# Maps of (B, HW, C) the VAE attention keeps at once: input, normalised tokens, q, k, v, its output,
# the output projection and the sum.
ATTENTION_COPIES = 8
# Per-token values of a transformer block, in units of its width C: the band, LN1, q, the attention output
# and its projection, the sum, LN2, the cross-attention's q, output and sum, LN3, the GEGLU projection (8C)
# and its product (4C), the output projection and the sum make 26; the plain UNet's measured peak asks for
# 44 (CPU fp32, reduced SD 2.1 config: VmHWM 185 MB at a 128² latent and 701 MB at 256², against 120 and
# 480 MB estimated with 26 and 192 and 768 MB with 44).
TRANSFORMER_TOKEN_COPIES = 44
# A per-pixel step's band: input, its normalised copy and token-major copy; output, its copy and residual.
TOKEN_COPIES = 6


def names(value: Names) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def concat_shape(shapes: Dict[str, Tuple[int, ...]], value: Names) -> Tuple[int, int, int, int]:
    """The shape of the maps in ``value`` concatenated along channels (they share B, H, W)."""
    parts = [shapes[name] for name in names(value)]
    batch, _, height, width = parts[0]
    for part in parts[1:]:
        if (part[0], part[2], part[3]) != (batch, height, width):
            raise ValueError(f"cannot concatenate maps of shapes {[tuple(p) for p in parts]} along channels")
    return batch, sum(p[1] for p in parts), height, width


def conv_input_window(start: int, stop: int, kernel: int, stride: int, padding: int) -> Tuple[int, int, int]:
    """The input range [first, last) that output rows [start, stop) of a conv read, and ``skip``.

    Output o reads inputs [o·stride - padding, o·stride - padding + kernel). Fed the window [first, last)
    (out-of-image parts zero-filled) the module, which pads ``padding`` on each side itself, puts output
    ``start`` at index ``skip`` of its result; ``first = (start - skip)·stride`` with skip = ⌈padding/stride⌉.
    """
    skip = -(-padding // stride)
    first = (start - skip) * stride
    last = (stop - 1) * stride - padding + kernel
    return first, last, skip


@dataclass
class ConvStep:
    """``output`` = [pointwise_after](conv([upsample](prologue(cat(source)))) [+ bias] [+ shortcut(cat(residual))]).

    prologue: silu(norm(·)) with whole-map statistics, or the 1×1 ``pointwise_before``, or nothing.
    ``bias``: (B, Cout) added per channel after the conv (the UNet resnet's time embedding).
    ``pad_right_bottom``: the encoder's Downsample2D, which pads (0, 1, 0, 1) before its stride-2 conv.
    """

    output: str
    source: Names
    conv: Conv2d
    norm: Optional[GroupNorm] = None
    pointwise_before: Optional[Conv2d] = None
    upsample: bool = False
    pad_right_bottom: bool = False
    residual: Optional[Names] = None
    shortcut: Optional[Conv2d] = None
    pointwise_after: Optional[Conv2d] = None
    bias: Optional[torch.Tensor] = None

    def reads(self) -> Tuple[str, ...]:
        return names(self.source) + (names(self.residual) if self.residual is not None else ())

    def normalised(self) -> Tuple[Tuple[str, ...], ...]:
        return (names(self.source),) if self.norm is not None else ()

    def input_extent(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) of the conv's input space: the source, upsampled 2× when ``upsample``."""
        return (2 * height, 2 * width) if self.upsample else (height, width)

    def output_shape(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, int, int, int]:
        batch, _, height, width = concat_shape(shapes, self.source)
        extra = 1 if self.pad_right_bottom else 0
        k, s, p = self.conv.kernel_size, self.conv.stride, self.conv.padding
        sides = [(n + extra + 2 * p - k) // s + 1 for n in self.input_extent(height, width)]
        channels = (self.pointwise_after or self.conv).out_channels
        return batch, channels, sides[0], sides[1]

    def tile_bytes_per_pixel(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[float, float]:
        """(all tensors of a tile, its largest tensor) in bytes per output pixel."""
        batch, channels_in = concat_shape(shapes, self.source)[:2]
        channels_in *= self.conv.stride ** 2
        channels_out = self.output_shape(shapes)[1]
        return (4.0 * batch * (CONV_INPUT_COPIES * channels_in + CONV_OUTPUT_COPIES * channels_out),
                4.0 * batch * max(channels_in, channels_out))

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        """Activation bytes the plain module holds at once for this step: its input and output maps, the
        conv's input (normalised or upsampled), the residual and its shortcut, and one more copy of the
        conv's input and output for the backend's layout reorders or workspace.

        NOTE: decoding 4096² untiled on the CPU (8 channels) peaked at 3.25 GB, six full-resolution maps:
        oneDNN reorders the conv's input and output, which the four maps a resnet holds do not count.
        """
        source = math.prod(concat_shape(shapes, self.source))
        out = math.prod(self.output_shape(shapes))
        conv_input = 4 * source if self.upsample else source
        live = source + out + conv_input + out
        if self.upsample or self.norm is not None or self.pointwise_before is not None:
            live += conv_input
        if self.residual is not None:
            live += math.prod(concat_shape(shapes, self.residual)) + (out if self.shortcut is not None else 0)
        return live * element_size


@dataclass
class SpatialAttentionStep:
    """``output`` = the VAE mid-block SpatialSelfAttention of ``source`` (residual included)."""

    output: str
    source: str
    attention: SpatialSelfAttention

    def reads(self) -> Tuple[str, ...]:
        return (self.source,)

    def normalised(self) -> Tuple[Tuple[str, ...], ...]:
        return ((self.source,),)

    def output_shape(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, ...]:
        return tuple(shapes[self.source])

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        return ATTENTION_COPIES * math.prod(shapes[self.source]) * element_size


@dataclass
class TokenStep:
    """``output`` = fn([norm](source)) [+ residual], per pixel; fn maps a (B, C, r, c) tile to (B, C', r, c)."""

    output: str
    source: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    out_channels: int
    norm: Optional[GroupNorm] = None
    residual: Optional[str] = None

    def reads(self) -> Tuple[str, ...]:
        return (self.source,) + ((self.residual,) if self.residual is not None else ())

    def normalised(self) -> Tuple[Tuple[str, ...], ...]:
        return ((self.source,),) if self.norm is not None else ()

    def output_shape(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, int, int, int]:
        batch, _, height, width = shapes[self.source]
        return batch, self.out_channels, height, width

    def pixel_bytes(self, shapes: Dict[str, Tuple[int, ...]]) -> float:
        batch, channels = shapes[self.source][:2]
        return 4.0 * batch * TOKEN_COPIES * max(channels, self.out_channels)

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        return TOKEN_COPIES * math.prod(self.output_shape(shapes)) * element_size


@dataclass
class TransformerBlockStep:
    """``output`` = ``block``(tokens of ``source``, context) as a (B, C, H, W) map.

    ``block``: a :class:`~flashstep.models.transformer_2d.BasicTransformerBlock`; ``context`` (B, M, D).
    """

    output: str
    source: str
    block: torch.nn.Module
    context: torch.Tensor = field(repr=False)

    def reads(self) -> Tuple[str, ...]:
        return (self.source,)

    def normalised(self) -> Tuple[Tuple[str, ...], ...]:
        return ()

    def output_shape(self, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, ...]:
        return tuple(shapes[self.source])

    def key_value_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        """The keys and values of the whole map, kept on the compute device for the step."""
        return 2 * math.prod(shapes[self.source]) * element_size

    def token_bytes(self, shapes: Dict[str, Tuple[int, ...]]) -> float:
        batch, channels = shapes[self.source][:2]
        return 4.0 * batch * TRANSFORMER_TOKEN_COPIES * channels

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        return TRANSFORMER_TOKEN_COPIES * math.prod(shapes[self.source]) * element_size


Step = Union[ConvStep, SpatialAttentionStep, TokenStep, TransformerBlockStep]


def plan_shapes(steps: Sequence[Step], input_shape: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """map name -> shape, for the input and every step's output."""
    shapes = {"input": tuple(input_shape)}
    for step in steps:
        shapes[step.output] = tuple(step.output_shape(shapes))
    return shapes


def last_readers(steps: Sequence[Step]) -> Dict[str, int]:
    """map name -> the index of the last step that reads it (after which the map can be freed)."""
    return {name: index for index, step in enumerate(steps) for name in step.reads()}


@dataclass
class StreamedRunRecord:
    """What the last streamed run did: tiles run, where each map lived, the peak bytes per store kind,
    and how the attention ran ("whole" or "N-row query bands")."""

    tiles: int = 0
    placements: Dict[str, str] = field(default_factory=dict)
    peak_bytes: Dict[str, int] = field(default_factory=dict)
    attention: str = ""
