"""Exact, memory-bounded execution of the SD VAE encoder and decoder: layer by layer, tile by tile.

The untiled VAE keeps a few full activation maps of its widest level alive at once (at 2048² the decoder's
last levels are 128-256 channels × 2048², 1-2 GB each in fp16). :class:`TiledVAE` instead runs every
primitive of ``vae.encoder`` / ``vae.decoder`` over FULL maps held in a
:class:`~flashstep.runner.feature_store.FeatureStore` (device, host RAM or disk), one output tile at a time:

* a convolution (3×3, 1×1 or stride 2) reads its output tile's input window plus the halo it needs from the
  full input map, zero-padded only outside the image exactly like the untiled conv, and calls the layer
  module itself on it (so attached LoRAs and ``lora_mix`` apply). In front of it, on the window: the
  block's GroupNorm + SiLU, or nearest 2× upsampling, or the 1×1 post_quant_conv; after it, on the tile: the
  residual (through the 1×1 shortcut) and the 1×1 quant_conv. The tile goes into the full output map.
* GroupNorm uses the whole map's statistics. While a map is written, the moments of each tile
  (count n_t, mean_t, m2_t per (B, G), :func:`flashstep.ops.group_norm_moments`) are merged in fp64
  (:func:`flashstep.ops.combine_moments`)::

      mean = Σ n_t·mean_t / n,   m2 = Σ m2_t + Σ n_t·(mean_t - mean)²,   rstd = 1 / √(m2/n + eps)

  and the reader normalises every window with ``ops.group_norm(..., stats=(mean, rstd))``.
* The mid-block attention (1/8 of the image side) runs on the whole map through the module, or, when that
  map does not fit the tile budget, over bands of query rows against the full K and V.

So the result equals the untiled forward up to float rounding (no seams, no brightness steps), and the
compute device holds a tile's working set, the weights, and the maps the budget lets it keep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from ..models.attention import SpatialSelfAttention, residual_add
from ..models.layers import Conv2d, GroupNorm
from ..models.vae import LOGVAR_MAX, LOGVAR_MIN
from .feature_store import STORE_KINDS, FeatureMap, FeatureStore, map_bytes
from .memory import MemoryBudget, available_ram, parse_memory

# NOTE: a quarter of the budget is kept for the tile being computed; the rest holds full maps. Bigger
# tiles only shave the halo overhead (about 4/side of a 3×3 conv's work), the maps are what must fit.
TILE_SHARE = 0.25
MINIMUM_TILE = 8
# NOTE: on a CPU, tiles whose tensors exceed a few MiB come from fresh mmaps that page-fault on every
# use (the caching allocator that saves this on a GPU does not exist there). Decoding 4096² with 8
# channels under a 2 GB budget on the 2-core development machine took 40 s (3.9 s in the kernel) with
# 256-pixel tiles, 54 s (8.9 s) with 512 and 105 s (24 s) with 1024, so a CPU tile keeps its largest
# tensor within 2 MiB.
CPU_TILE_TENSOR_BYTES = 2 * 2**20
# Bytes a conv tile needs per output pixel, in fp32 units of its channels: the input window, its
# normalised (fp32) and zero-padded copies (3 per input pixel), and the conv output, its cropped copy,
# the residual, the shortcut and the fp32 moments copy (5 per output pixel).
CONV_INPUT_COPIES, CONV_OUTPUT_COPIES = 3, 5
# Maps of (B, HW, C) the attention keeps at once: input, normalised tokens, q, k, v, its output,
# the output projection and the sum.
ATTENTION_COPIES = 8


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
    """``output`` = [pointwise_after](conv([upsample](prologue(source))) [+ shortcut(residual)]).

    prologue: silu(norm(·)) with whole-map statistics, or the 1×1 ``pointwise_before``, or nothing.
    ``pad_right_bottom``: the encoder's Downsample2D, which pads (0, 1, 0, 1) before its stride-2 conv.
    """

    output: str
    source: str
    conv: Conv2d
    norm: Optional[GroupNorm] = None
    pointwise_before: Optional[Conv2d] = None
    upsample: bool = False
    pad_right_bottom: bool = False
    residual: Optional[str] = None
    shortcut: Optional[Conv2d] = None
    pointwise_after: Optional[Conv2d] = None

    def reads(self) -> Tuple[str, ...]:
        return (self.source,) if self.residual is None else (self.source, self.residual)

    def input_extent(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) of the conv's input space: the source, upsampled 2× when ``upsample``."""
        return (2 * height, 2 * width) if self.upsample else (height, width)

    def output_shape(self, shape: Sequence[int]) -> Tuple[int, int, int, int]:
        batch, _, height, width = shape
        extra = 1 if self.pad_right_bottom else 0
        k, s, p = self.conv.kernel_size, self.conv.stride, self.conv.padding
        sides = [(n + extra + 2 * p - k) // s + 1 for n in self.input_extent(height, width)]
        channels = (self.pointwise_after or self.conv).out_channels
        return batch, channels, sides[0], sides[1]

    def tile_bytes_per_pixel(self, shape: Sequence[int]) -> Tuple[float, float]:
        """(all tensors of a tile, its largest tensor) in bytes per output pixel."""
        batch, channels_in = shape[:2]
        channels_in *= self.conv.stride ** 2
        channels_out = self.output_shape(shape)[1]
        return (4.0 * batch * (CONV_INPUT_COPIES * channels_in + CONV_OUTPUT_COPIES * channels_out),
                4.0 * batch * max(channels_in, channels_out))

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        """Activation bytes the plain module holds at once for this step: its input and output maps, the
        conv's input (normalised or upsampled), the residual and its shortcut, and one more copy of the
        conv's input and output for the backend's layout reorders or workspace.

        NOTE: decoding 4096² untiled on the CPU (8 channels) peaked at 3.25 GB, six full-resolution maps:
        oneDNN reorders the conv's input and output, which the four maps a resnet holds do not count.
        """
        shape = shapes[self.source]
        source = math.prod(shape)
        out = math.prod(self.output_shape(shape))
        conv_input = 4 * source if self.upsample else source
        live = source + out + conv_input + out
        if self.upsample or self.norm is not None or self.pointwise_before is not None:
            live += conv_input
        if self.residual is not None:
            live += math.prod(shapes[self.residual]) + (out if self.shortcut is not None else 0)
        return live * element_size


@dataclass
class AttentionStep:
    """``output`` = the mid-block SpatialSelfAttention of ``source`` (residual included)."""

    output: str
    source: str
    attention: SpatialSelfAttention

    def reads(self) -> Tuple[str, ...]:
        return (self.source,)

    def output_shape(self, shape: Sequence[int]) -> Tuple[int, int, int, int]:
        return tuple(shape)

    def untiled_bytes(self, shapes: Dict[str, Tuple[int, ...]], element_size: int) -> int:
        return ATTENTION_COPIES * math.prod(shapes[self.source]) * element_size


Step = Union[ConvStep, AttentionStep]


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
    steps.append(AttentionStep(f"{name}.attentions.0", steps[-1].output, block.attentions[0]))
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


def plan_shapes(steps: Sequence[Step], input_shape: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """map name -> shape, for the input and every step's output."""
    shapes = {"input": tuple(input_shape)}
    for step in steps:
        shapes[step.output] = step.output_shape(shapes[step.source])
    return shapes


@dataclass
class TiledRunRecord:
    """What the last encode/decode did: tiles run, where each map lived, the peak bytes per store kind,
    and how the attention ran ("whole" or "N-row query bands")."""

    tiles: int = 0
    placements: Dict[str, str] = field(default_factory=dict)
    peak_bytes: Dict[str, int] = field(default_factory=dict)
    attention: str = ""


class TiledVAE:
    """Runs ``vae.encode`` / ``vae.decode`` streamed through full maps (see the module docstring).

    ``budget``: activation bytes the compute device (the VAE's parameters' device) may hold; a quarter goes
    to the tile being computed, the rest to full maps on the device. ``tile``: output-tile side in pixels
    of every step, and the attention runs in bands of about tile² query pixels when its map is larger
    (None: both from the budget, per step). Results are made on the input's device. ``host_memory``: RAM the maps may take when computing
    on a GPU (default half the available RAM); on a CPU device and host are one memory and ``budget``
    decides between RAM and disk. ``store``: put every map in this kind ("device", "host", "disk").
    """

    def __init__(self, vae, budget: MemoryBudget, tile: Optional[int] = None, progress: bool = False, *,
                 host_memory: Optional[Union[str, int]] = None, store: Optional[str] = None):
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        if store is not None and store not in STORE_KINDS:
            raise ValueError(f"unknown store kind {store!r}; valid: {', '.join(STORE_KINDS)}")
        self.vae = vae
        self.budget = budget
        self.tile = tile
        self.progress = progress
        self.host_memory = parse_memory(host_memory) if host_memory is not None else None
        self.store_kind = store
        self.last_run = TiledRunRecord()

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

    def _capacities(self, device: torch.device) -> Dict[str, float]:
        maps = self.budget.bytes * (1 - TILE_SHARE)
        if device.type == "cpu":
            return {"host": maps}
        host = self.host_memory if self.host_memory is not None else available_ram() // 2
        return {"device": maps, "host": host}

    def _run(self, steps: List[Step], x: torch.Tensor, label: str) -> torch.Tensor:
        parameter = next(self.vae.parameters())
        run = _StreamedRun(steps, parameter.device, parameter.dtype, self.budget.bytes * TILE_SHARE, self.tile)
        with torch.no_grad(), FeatureStore(parameter.device, self._capacities(parameter.device),
                                           force=self.store_kind) as store:
            result = run.execute(store, x, label if self.progress else None)
            self.last_run = TiledRunRecord(
                tiles=run.tiles, placements=dict(store.placements), attention=run.attention_mode,
                peak_bytes={kind: tier.peak for kind, tier in store.tiers.items()},
            )
        return result


class _StreamedRun:
    """One execution of a plan: allocates, fills and frees the maps, step by step, tile by tile."""

    def __init__(self, steps: List[Step], device: torch.device, dtype: torch.dtype, tile_bytes: float,
                 tile: Optional[int]):
        self.steps, self.device, self.dtype = steps, device, dtype
        self.tile_bytes, self.tile = tile_bytes, tile
        self.maps: Dict[str, FeatureMap] = {}
        self.tiles = 0
        self.attention_mode = ""
        self.bar = None
        # map -> the group count its GroupNorm readers use; its moments are gathered while it is written
        self.moment_groups: Dict[str, int] = {}
        for step in steps:
            norm = step.attention.group_norm if isinstance(step, AttentionStep) else step.norm
            if norm is not None:
                self.moment_groups[step.source] = norm.num_groups
        self.last_reader: Dict[str, int] = {}
        for index, step in enumerate(steps):
            for name in step.reads():
                self.last_reader[name] = index

    # -- driver -------------------------------------------------------------------------------------
    def execute(self, store: FeatureStore, x: torch.Tensor, label: Optional[str]) -> torch.Tensor:
        shapes = plan_shapes(self.steps, x.shape)
        if label is not None:
            from tqdm import tqdm

            total = sum(self._tile_count(step, shapes[step.source]) for step in self.steps)
            self.bar = tqdm(total=total, desc=label, unit="tile", leave=False)
        try:
            self.maps["input"] = store.wrap("input", x)
            final = self.steps[-1].output
            for index, step in enumerate(self.steps):
                shape = step.output_shape(shapes[step.source])
                # NOTE: the result is the caller's tensor, so it is made where the input came from.
                kind = ("host" if x.device.type == "cpu" else "device") if step.output == final else None
                self.maps[step.output] = store.allocate(step.output, shape, self.dtype, kind)
                if isinstance(step, AttentionStep):
                    self._attention(step)
                else:
                    self._conv(step)
                for name in step.reads():
                    if self.last_reader[name] == index:
                        store.free(self.maps.pop(name))
            return self.maps[final].whole(x.device)
        finally:
            if self.bar is not None:
                self.bar.close()

    def _side(self, bytes_per_pixel: Tuple[float, float]) -> int:
        """Output-tile side of a conv step whose tile needs ``bytes_per_pixel`` (all, largest tensor)."""
        if self.tile is not None:
            return self.tile
        total, largest = bytes_per_pixel
        pixels = self.tile_bytes / total
        if self.device.type == "cpu":
            pixels = min(pixels, CPU_TILE_TENSOR_BYTES / largest)
        return max(MINIMUM_TILE, int(math.sqrt(pixels)))

    def _tile_count(self, step: Step, shape: Sequence[int]) -> int:
        if isinstance(step, AttentionStep):
            rows = self._attention_rows(shape)
            return 1 if rows is None else 2 * -(-shape[2] // rows)
        side = self._side(step.tile_bytes_per_pixel(shape))
        _, _, height, width = step.output_shape(shape)
        return -(-height // side) * -(-width // side)

    def _done_tile(self) -> None:
        self.tiles += 1
        if self.bar is not None:
            self.bar.update(1)

    # -- statistics ---------------------------------------------------------------------------------
    def _add_moments(self, target: FeatureMap, tile: torch.Tensor) -> None:
        groups = self.moment_groups.get(target.name)
        if groups is None:
            return
        part = tuple(t.double() for t in ops.group_norm_moments(tile, groups))
        target.moments = part if target.moments is None else ops.combine_moments([target.moments, part])

    def _stats(self, source: FeatureMap, norm: GroupNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, rstd), each (B, G) fp32, of the whole map."""
        mean, rstd = ops.stats_from_moments(source.moments, norm.eps)
        return mean.float(), rstd.float()

    # -- convolutions -------------------------------------------------------------------------------
    def _conv(self, step: ConvStep) -> None:
        source, target = self.maps[step.source], self.maps[step.output]
        stats = self._stats(source, step.norm) if step.norm is not None else None
        residual = self.maps[step.residual] if step.residual is not None else None
        _, _, height, width = target.shape
        side = self._side(step.tile_bytes_per_pixel(source.shape))
        for top in range(0, height, side):
            for left in range(0, width, side):
                rows, cols = slice(top, min(top + side, height)), slice(left, min(left + side, width))
                tile = self._conv_tile(step, source, stats, rows, cols)  # (B, Cout, r, c)
                if residual is not None:
                    shortcut = self._read(residual, rows, cols)
                    if step.shortcut is not None:
                        shortcut = step.shortcut(shortcut)
                    tile = tile.add_(shortcut)
                if step.pointwise_after is not None:
                    tile = step.pointwise_after(tile)
                target.write(rows, cols, tile)
                self._add_moments(target, tile)
                self._done_tile()

    def _read(self, source: FeatureMap, rows: slice, cols: slice) -> torch.Tensor:
        return source.read(rows, cols, self.device).to(self.dtype)

    def _prologue(self, step: ConvStep, window: torch.Tensor, stats) -> torch.Tensor:
        if step.norm is not None:
            norm = step.norm
            return ops.group_norm(window, norm.num_groups, norm.weight, norm.bias, norm.eps, "silu", stats=stats)
        if step.pointwise_before is not None:
            return step.pointwise_before(window)
        return window

    def _conv_tile(self, step: ConvStep, source: FeatureMap, stats, rows: slice, cols: slice) -> torch.Tensor:
        """Output rows × cols of the step's conv (before residual and pointwise_after), (B, Cout, r, c)."""
        conv = step.conv
        extent = step.input_extent(*source.shape[2:])
        windows = [conv_input_window(span.start, span.stop, conv.kernel_size, conv.stride, conv.padding)
                   for span in (rows, cols)]
        # the window clipped to the input space; outside it the conv sees zeros
        inside = [(max(first, 0), min(last, n)) for (first, last, _), n in zip(windows, extent)]
        if step.upsample:
            # source pixels under the clipped upsampled window; nearest 2× maps u to u // 2
            spans = [slice(low // 2, (high - 1) // 2 + 1) for low, high in inside]
            block = F.interpolate(self._prologue(step, self._read(source, *spans), stats), scale_factor=2.0,
                                  mode="nearest")
            block = block[:, :, inside[0][0] - 2 * spans[0].start : inside[0][1] - 2 * spans[0].start,
                                inside[1][0] - 2 * spans[1].start : inside[1][1] - 2 * spans[1].start]
        else:
            block = self._prologue(step, self._read(source, *(slice(low, high) for low, high in inside)), stats)
        (row_first, row_last, row_skip), (col_first, col_last, col_skip) = windows
        block = F.pad(block, (inside[1][0] - col_first, col_last - inside[1][1],
                              inside[0][0] - row_first, row_last - inside[0][1]))
        out = conv(block)
        return out[:, :, row_skip : row_skip + rows.stop - rows.start, col_skip : col_skip + cols.stop - cols.start]

    # -- attention ----------------------------------------------------------------------------------
    def _attention_rows(self, shape: Sequence[int]) -> Optional[int]:
        """Query rows per band, or None to run the whole map through the module."""
        batch, channels, height, width = shape
        if self.tile is not None:
            pixels = self.tile * self.tile
            return None if height * width <= pixels else max(1, pixels // width)
        row_bytes = 4.0 * ATTENTION_COPIES * batch * width * channels
        rows = int(self.tile_bytes // row_bytes)
        return None if rows >= height else max(1, rows)

    def _attention(self, step: AttentionStep) -> None:
        source, target = self.maps[step.source], self.maps[step.output]
        rows = self._attention_rows(source.shape)
        if rows is None:
            self.attention_mode = "whole"
            out = step.attention(source.whole(self.device).to(self.dtype))
            target.write(slice(None), slice(None), out)
            self._add_moments(target, out)
            self._done_tile()
            return
        self.attention_mode = f"{rows}-row query bands"
        self._attention_in_bands(step, source, target, rows)

    def _attention_in_bands(self, step: AttentionStep, source: FeatureMap, target: FeatureMap, rows: int) -> None:
        """SpatialSelfAttention over bands of ``rows`` query rows; K and V (B, HW, C) of the whole map stay
        on the device. Tokens are in the module's order (row-major), so keys and values match it."""
        attention, norm = step.attention, step.attention.group_norm
        stats = self._stats(source, norm)
        batch, channels, height, width = source.shape
        bands = [slice(top, min(top + rows, height)) for top in range(0, height, rows)]

        def tokens_of(band: slice) -> Tuple[torch.Tensor, torch.Tensor]:
            window = self._read(source, band, slice(None))  # (B, C, r, W)
            normed = ops.group_norm(window, norm.num_groups, norm.weight, norm.bias, norm.eps, stats=stats)
            return window, normed.flatten(2).transpose(1, 2).contiguous()  # (B, rW, C)

        keys = torch.empty(batch, height * width, channels, device=self.device, dtype=self.dtype)
        values = torch.empty_like(keys)
        for band in bands:
            _, tokens = tokens_of(band)
            keys[:, band.start * width : band.stop * width] = attention.to_k(tokens)
            values[:, band.start * width : band.stop * width] = attention.to_v(tokens)
            self._done_tile()
        for band in bands:
            window, tokens = tokens_of(band)
            query = attention.to_q(tokens).unsqueeze(1)  # (B, 1, rW, C)
            out = attention.to_out[0](ops.attention(query, keys.unsqueeze(1), values.unsqueeze(1)).squeeze(1))
            out = residual_add(window, out.transpose(1, 2).view(window.shape))  # (B, C, r, W)
            target.write(band, slice(None), out)
            self._add_moments(target, out)
            self._done_tile()
