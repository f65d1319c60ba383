"""Executes a plan of :mod:`~flashstep.runner.stream_steps` over full maps, one output tile at a time.

Every map lives in a :class:`~flashstep.runner.feature_store.FeatureStore` (device, host RAM or disk); the
compute device holds a tile's working set, the weights, and the maps the budget lets it keep:

* a convolution reads its output tile's input window plus the halo it needs from the full input map(s),
  zero-padded only outside the image exactly like the untiled conv, and calls the layer module itself on
  it (so attached LoRAs and ``lora_mix`` apply).
* GroupNorm uses the whole map's statistics. While a map that a GroupNorm reads is written, the moments
  of each tile per (B, channel) (count n_t, mean_t, m2_t, :func:`flashstep.ops.group_norm_moments`) are
  merged in fp64 (:func:`flashstep.ops.combine_moments`); a reader's groups (which may span two
  concatenated maps) merge their channels' moments the same way::

      mean = Σ n_t·mean_t / n,   m2 = Σ m2_t + Σ n_t·(mean_t - mean)²,   rstd = 1 / √(m2/n + eps)

  and every window is normalised with ``ops.group_norm(..., stats=(mean, rstd))``.
* attention runs its queries in bands of rows against the keys and values of the whole map, which stay on
  the compute device for the step (the VAE's attention runs whole when its map fits the tile budget).

So the result equals the untiled forward up to float rounding: no seams, no brightness steps.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from ..models.attention import merge_heads, residual_add, split_heads
from ..models.layers import GroupNorm
from .feature_store import STORE_KINDS, FeatureMap, FeatureStore
from .memory import MemoryBudget, available_ram, parse_memory, release_heap
from .stream_steps import (ATTENTION_COPIES, ConvStep, SpatialAttentionStep, Step, StreamedRunRecord, TokenStep,
                           TransformerBlockStep, conv_input_window, last_readers, names, plan_shapes)

# NOTE: a quarter of the budget is kept for the tile being computed and 60% holds full maps. Bigger tiles
# only shave the halo overhead (about 4/side of a 3×3 conv's work), the maps are what must fit. The last
# 15% is left to what lives beside the stage: the pipeline's full-size images (its input, the upsampled
# input, the output) and the heap's slack. With maps at 75%, OSEDiff ×4 to 2048² (reduced config, CPU) under
# a 1 GB budget peaked at 1027 MB above its starting RSS during the streamed decode.
TILE_SHARE = 0.25
MAP_SHARE = 0.60
MINIMUM_TILE = 8
# NOTE: on a CPU, tiles whose tensors exceed a few MiB come from fresh mmaps that page-fault on every
# use (the caching allocator that saves this on a GPU does not exist there). Decoding 4096² with 8
# channels under a 2 GB budget on the 2-core development machine took 40 s (3.9 s in the kernel) with
# 256-pixel tiles, 54 s (8.9 s) with 512 and 105 s (24 s) with 1024, so a CPU tile keeps its largest
# tensor within 2 MiB.
CPU_TILE_TENSOR_BYTES = 2 * 2**20

Moments = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def store_capacities(budget_bytes: float, device: torch.device, host_memory: Optional[int]) -> Dict[str, float]:
    """Bytes each store kind may hold: the map share of the budget on the device; on a GPU also host RAM
    (``host_memory``, default half the available RAM). On a CPU device and host are one memory."""
    maps = budget_bytes * MAP_SHARE
    if device.type == "cpu":
        return {"host": maps}
    host = host_memory if host_memory is not None else available_ram() // 2
    return {"device": maps, "host": host}


def run_streamed(steps: List[Step], x: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
                 budget_bytes: float, tile: Optional[int], store: Optional[str], host_memory: Optional[int],
                 label: Optional[str]) -> Tuple[torch.Tensor, StreamedRunRecord]:
    """Run ``steps`` on ``x`` (the map ``"input"``); the result of the last step and what the run did."""
    run = StreamedRun(steps, device, dtype, budget_bytes * TILE_SHARE, tile)
    with torch.no_grad(), FeatureStore(device, store_capacities(budget_bytes, device, host_memory),
                                       force=store) as feature_store:
        result = run.execute(feature_store, x, label)
        record = StreamedRunRecord(
            tiles=run.tiles, placements=dict(feature_store.placements), attention=run.attention_mode,
            peak_bytes={kind: tier.peak for kind, tier in feature_store.tiers.items()},
        )
    return result, record


class StreamedModel:
    """Base of the streamed forms of a model (:class:`~flashstep.runner.vae_tiling.TiledVAE`,
    :class:`~flashstep.runner.unet_tiling.TiledUNet`).

    ``budget``: activation bytes the compute device (the model's parameters' device) may hold; a quarter goes
    to the tile being computed, 60% to full maps on the device, the rest is left to the caller's tensors.
    ``tile``: output-tile side in pixels of every step, and attention in bands of about tile² query pixels
    (None: both from the budget, per step). Results are made on the input's device. ``host_memory``: RAM
    the maps may take when computing on a GPU (default half the available RAM); on a CPU device and host
    are one memory and ``budget`` decides between RAM and disk. ``store``: put every map in this kind
    ("device", "host", "disk"). ``last_run``: what the last call did.
    """

    def __init__(self, budget: MemoryBudget, tile: Optional[int] = None, progress: bool = False, *,
                 host_memory: Optional[Union[str, int]] = None, store: Optional[str] = None):
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        if store is not None and store not in STORE_KINDS:
            raise ValueError(f"unknown store kind {store!r}; valid: {', '.join(STORE_KINDS)}")
        self.budget = budget
        self.tile = tile
        self.progress = progress
        self.host_memory = parse_memory(host_memory) if host_memory is not None else None
        self.store_kind = store
        self.last_run = StreamedRunRecord()

    def _stream(self, steps: List[Step], x: torch.Tensor, label: str, parameter: torch.Tensor) -> torch.Tensor:
        result, self.last_run = run_streamed(
            steps, x, device=parameter.device, dtype=parameter.dtype, budget_bytes=self.budget.bytes,
            tile=self.tile, store=self.store_kind, host_memory=self.host_memory,
            label=label if self.progress else None)
        return result


def plain_peak_bytes(steps: List[Step], input_shape: Sequence[int], dtype: torch.dtype) -> int:
    """Estimated activation bytes of the plain (unstreamed) forward of ``steps``: at each step, the maps still
    to be read later plus the step's own working set (``untiled_bytes``); the largest over the steps."""
    shapes = plan_shapes(steps, input_shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    last_reader = last_readers(steps)
    live = {"input": math.prod(shapes["input"]) * element_size}
    peak = 0
    for index, step in enumerate(steps):
        peak = max(peak, sum(live.values()) + step.untiled_bytes(shapes, element_size))
        live[step.output] = math.prod(shapes[step.output]) * element_size
        for name in step.reads():
            if last_reader[name] == index:
                live.pop(name, None)
    return peak


def group_stats(parts: Sequence[Moments], groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each (B, G) fp32, of ``groups`` consecutive channel groups over the channel moments
    ``parts`` (each (count, mean, m2) of (B, C_i), concatenated along channels)."""
    count, mean, m2 = (torch.cat(values, dim=1) for values in zip(*parts))
    batch = count.shape[0]
    count, mean, m2 = (t.reshape(batch, groups, -1) for t in (count, mean, m2))
    total = count.sum(dim=-1, keepdim=True)
    group_mean = (count * mean).sum(dim=-1, keepdim=True) / total
    group_m2 = (m2 + count * (mean - group_mean).square()).sum(dim=-1, keepdim=True)
    mean, rstd = ops.stats_from_moments((total, group_mean, group_m2), eps)
    return mean.squeeze(-1).float(), rstd.squeeze(-1).float()


def _bands(height: int, rows: int) -> List[slice]:
    return [slice(top, min(top + rows, height)) for top in range(0, height, rows)]


def _tokens(tile: torch.Tensor) -> torch.Tensor:
    """(B, C, r, W) -> (B, r·W, C) row-major tokens, contiguous."""
    return tile.flatten(2).transpose(1, 2).contiguous()


class StreamedRun:
    """One execution of a plan: allocates, fills and frees the maps, step by step, tile by tile.

    ``tile_bytes``: bytes a tile's working set may take; ``tile``: the output-tile side of every step
    instead (and attention bands of about tile² query pixels).
    """

    def __init__(self, steps: List[Step], device: torch.device, dtype: torch.dtype, tile_bytes: float,
                 tile: Optional[int]):
        self.steps, self.device, self.dtype = steps, device, dtype
        self.tile_bytes, self.tile = tile_bytes, tile
        self.maps: Dict[str, FeatureMap] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.tiles = 0
        self.attention_mode = ""
        self.bar = None
        self.normalised = {name for step in steps for group in step.normalised() for name in group}
        self.last_reader = last_readers(steps)

    # -- driver -------------------------------------------------------------------------------------
    def execute(self, store: FeatureStore, x: torch.Tensor, label: Optional[str]) -> torch.Tensor:
        self.shapes = plan_shapes(self.steps, x.shape)
        if label is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self._tile_count(step) for step in self.steps), desc=label, unit="tile",
                            leave=False)
        try:
            self.maps["input"] = store.wrap("input", x)
            if "input" in self.normalised:
                self._add_moments(self.maps["input"], x)
            final = self.steps[-1].output
            for index, step in enumerate(self.steps):
                # NOTE: the result is the caller's tensor, so it is made where the input came from.
                kind = ("host" if x.device.type == "cpu" else "device") if step.output == final else None
                self.maps[step.output] = store.allocate(step.output, self.shapes[step.output], self.dtype, kind)
                self._run_step(step)
                for name in dict.fromkeys(step.reads()):
                    if self.last_reader[name] == index:
                        store.free(self.maps.pop(name))
                if self.device.type == "cpu":
                    release_heap()
            return self.maps[final].whole(x.device)
        finally:
            if self.bar is not None:
                self.bar.close()

    def _run_step(self, step: Step) -> None:
        if isinstance(step, ConvStep):
            self._conv(step)
        elif isinstance(step, SpatialAttentionStep):
            self._spatial_attention(step)
        elif isinstance(step, TokenStep):
            self._token_step(step)
        elif isinstance(step, TransformerBlockStep):
            self._transformer_block(step)
        else:
            raise TypeError(f"unknown step {type(step).__name__}")

    def _side(self, bytes_per_pixel: Tuple[float, float]) -> int:
        """Output-tile side of a conv step whose tile needs ``bytes_per_pixel`` (all, largest tensor)."""
        if self.tile is not None:
            return self.tile
        total, largest = bytes_per_pixel
        pixels = self.tile_bytes / total
        if self.device.type == "cpu":
            pixels = min(pixels, CPU_TILE_TENSOR_BYTES / largest)
        return max(MINIMUM_TILE, int(math.sqrt(pixels)))

    def _band_rows(self, width: int, token_bytes: float, fixed_bytes: float = 0.0) -> int:
        """Rows per band of a per-token step whose tokens take ``token_bytes`` each beside ``fixed_bytes``."""
        if self.tile is not None:
            return max(1, self.tile * self.tile // width)
        return max(1, int((self.tile_bytes - fixed_bytes) // (token_bytes * width)))

    def _tile_count(self, step: Step) -> int:
        shape = self.shapes[step.reads()[0]]
        height = shape[2]
        if isinstance(step, SpatialAttentionStep):
            rows = self._attention_rows(shape)
            return 1 if rows is None else 2 * len(_bands(height, rows))
        if isinstance(step, TokenStep):
            return len(_bands(height, self._band_rows(shape[3], step.pixel_bytes(self.shapes))))
        if isinstance(step, TransformerBlockStep):
            return 2 * len(_bands(height, self._transformer_rows(step)))
        side = self._side(step.tile_bytes_per_pixel(self.shapes))
        _, _, out_height, out_width = self.shapes[step.output]
        return -(-out_height // side) * -(-out_width // side)

    def _done_tile(self) -> None:
        self.tiles += 1
        if self.bar is not None:
            self.bar.update(1)

    def _write(self, target: FeatureMap, rows: slice, cols: slice, tile: torch.Tensor) -> None:
        target.write(rows, cols, tile)
        if target.name in self.normalised:
            self._add_moments(target, tile)
        self._done_tile()

    # -- reading and statistics ---------------------------------------------------------------------
    def _add_moments(self, target: FeatureMap, tile: torch.Tensor) -> None:
        part = tuple(t.double() for t in ops.group_norm_moments(tile, tile.shape[1]))
        target.moments = part if target.moments is None else ops.combine_moments([target.moments, part])

    def _stats(self, sources: Sequence[str], norm: GroupNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, rstd), each (B, G) fp32, of the maps ``sources`` concatenated along channels."""
        return group_stats([self.maps[name].moments for name in sources], norm.num_groups, norm.eps)

    def _read(self, sources: Union[str, Sequence[str]], rows: slice, cols: slice) -> torch.Tensor:
        parts = [self.maps[name].read(rows, cols, self.device).to(self.dtype) for name in names(sources)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- convolutions -------------------------------------------------------------------------------
    def _conv(self, step: ConvStep) -> None:
        target = self.maps[step.output]
        stats = self._stats(names(step.source), step.norm) if step.norm is not None else None
        _, _, height, width = target.shape
        side = self._side(step.tile_bytes_per_pixel(self.shapes))
        for top in range(0, height, side):
            for left in range(0, width, side):
                rows, cols = slice(top, min(top + side, height)), slice(left, min(left + side, width))
                tile = self._conv_tile(step, stats, rows, cols)  # (B, Cout, r, c)
                if step.bias is not None:
                    tile += step.bias.to(tile.dtype)[:, :, None, None]
                if step.residual is not None:
                    shortcut = self._read(step.residual, rows, cols)
                    if step.shortcut is not None:
                        shortcut = step.shortcut(shortcut)
                    tile = tile.add_(shortcut)
                if step.pointwise_after is not None:
                    tile = step.pointwise_after(tile)
                self._write(target, rows, cols, tile)

    def _prologue(self, step: ConvStep, window: torch.Tensor, stats) -> torch.Tensor:
        if step.norm is not None:
            norm = step.norm
            return ops.group_norm(window, norm.num_groups, norm.weight, norm.bias, norm.eps, "silu", stats=stats)
        if step.pointwise_before is not None:
            return step.pointwise_before(window)
        return window

    def _conv_tile(self, step: ConvStep, stats, rows: slice, cols: slice) -> torch.Tensor:
        """Output rows × cols of the step's conv (before bias, residual and pointwise_after), (B, Cout, r, c)."""
        conv = step.conv
        extent = step.input_extent(*self.shapes[names(step.source)[0]][2:])
        windows = [conv_input_window(span.start, span.stop, conv.kernel_size, conv.stride, conv.padding)
                   for span in (rows, cols)]
        # the window clipped to the input space; outside it the conv sees zeros
        inside = [(max(first, 0), min(last, n)) for (first, last, _), n in zip(windows, extent)]
        if step.upsample:
            # source pixels under the clipped upsampled window; nearest 2× maps u to u // 2
            spans = [slice(low // 2, (high - 1) // 2 + 1) for low, high in inside]
            block = F.interpolate(self._prologue(step, self._read(step.source, *spans), stats), scale_factor=2.0,
                                  mode="nearest")
            block = block[:, :, inside[0][0] - 2 * spans[0].start : inside[0][1] - 2 * spans[0].start,
                                inside[1][0] - 2 * spans[1].start : inside[1][1] - 2 * spans[1].start]
        else:
            block = self._prologue(step, self._read(step.source, *(slice(low, high) for low, high in inside)), stats)
        (row_first, row_last, row_skip), (col_first, col_last, col_skip) = windows
        block = F.pad(block, (inside[1][0] - col_first, col_last - inside[1][1],
                              inside[0][0] - row_first, row_last - inside[0][1]))
        out = conv(block)
        return out[:, :, row_skip : row_skip + rows.stop - rows.start, col_skip : col_skip + cols.stop - cols.start]

    # -- per-pixel steps ----------------------------------------------------------------------------
    def _token_step(self, step: TokenStep) -> None:
        target = self.maps[step.output]
        norm = step.norm
        stats = self._stats((step.source,), norm) if norm is not None else None
        _, _, height, width = target.shape
        for band in _bands(height, self._band_rows(width, step.pixel_bytes(self.shapes))):
            window = self._read(step.source, band, slice(None))
            if norm is not None:
                window = ops.group_norm(window, norm.num_groups, norm.weight, norm.bias, norm.eps, stats=stats)
            out = step.fn(window)
            if step.residual is not None:
                out = residual_add(self._read(step.residual, band, slice(None)), out)
            self._write(target, band, slice(None), out)

    # -- attention ----------------------------------------------------------------------------------
    def _attention_rows(self, shape: Sequence[int]) -> Optional[int]:
        """Query rows per band of the VAE attention, or None to run the whole map through the module."""
        batch, channels, height, width = shape
        if self.tile is not None:
            pixels = self.tile * self.tile
            return None if height * width <= pixels else max(1, pixels // width)
        row_bytes = 4.0 * ATTENTION_COPIES * batch * width * channels
        rows = int(self.tile_bytes // row_bytes)
        return None if rows >= height else max(1, rows)

    def _spatial_attention(self, step: SpatialAttentionStep) -> None:
        source, target = self.maps[step.source], self.maps[step.output]
        rows = self._attention_rows(source.shape)
        if rows is None:
            self.attention_mode = "whole"
            out = step.attention(source.whole(self.device).to(self.dtype))
            self._write(target, slice(None), slice(None), out)
            return
        self.attention_mode = f"{rows}-row query bands"
        attention, norm = step.attention, step.attention.group_norm
        stats = self._stats((step.source,), norm)

        def tokens_of(band: slice) -> Tuple[torch.Tensor, torch.Tensor]:
            window = self._read(step.source, band, slice(None))  # (B, C, r, W)
            normed = ops.group_norm(window, norm.num_groups, norm.weight, norm.bias, norm.eps, stats=stats)
            return window, _tokens(normed)  # (B, rW, C)

        def project(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return attention.to_k(tokens).unsqueeze(1), attention.to_v(tokens).unsqueeze(1)

        def finish(window: torch.Tensor, tokens: torch.Tensor, keys, values) -> torch.Tensor:
            query = attention.to_q(tokens).unsqueeze(1)  # (B, 1, rW, C)
            out = attention.to_out[0](ops.attention(query, keys, values).squeeze(1))
            return residual_add(window, out.transpose(1, 2).view(window.shape))  # (B, C, r, W)

        self._attention_in_bands(step, rows, tokens_of, project, finish)

    def _transformer_rows(self, step: TransformerBlockStep) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self._band_rows(self.shapes[step.source][3], step.token_bytes(self.shapes),
                               step.key_value_bytes(self.shapes, element_size))

    def _transformer_block(self, step: TransformerBlockStep) -> None:
        """x + attn1(norm1(x)) with keys and values of the whole map, then cross-attention and feed-forward
        per token, as ``BasicTransformerBlock.forward``; the map's pixels are its tokens, row-major."""
        rows = self._transformer_rows(step)
        block, context = step.block, step.context
        attention = block.attn1
        self.attention_mode = f"{rows}-row query bands"

        def tokens_of(band: slice) -> Tuple[torch.Tensor, torch.Tensor]:
            tokens = _tokens(self._read(step.source, band, slice(None)))  # (B, rW, C)
            return tokens, block.norm1(tokens)

        def project(normed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return attention.to_k(normed), attention.to_v(normed)

        def finish(tokens: torch.Tensor, normed: torch.Tensor, keys, values) -> torch.Tensor:
            query = split_heads(attention.to_q(normed), attention.heads)
            out = attention.to_out[0](merge_heads(ops.attention(query, split_heads(keys, attention.heads),
                                                                split_heads(values, attention.heads))))
            x = out.add_(tokens)
            x = block.attn2(block.norm2(x), context).add_(x)
            x = block.ff(block.norm3(x)).add_(x)  # (B, rW, C)
            batch, _, channels = x.shape
            return x.transpose(1, 2).reshape(batch, channels, -1, self.shapes[step.source][3])

        self._attention_in_bands(step, rows, tokens_of, project, finish)

    def _attention_in_bands(self, step, rows: int, tokens_of, project, finish) -> None:
        """Two passes over bands of ``rows`` rows: keys and values of every band into (B, HW, C) buffers on the
        device, then each band's queries against all of them; ``finish`` makes the band's output map."""
        batch, channels, height, width = self.shapes[step.source]
        target = self.maps[step.output]
        bands = _bands(height, rows)
        keys = values = None
        for band in bands:
            key, value = project(tokens_of(band)[1])
            if keys is None:
                keys = key.new_empty(key.shape[:-2] + (height * width, key.shape[-1]))
                values = torch.empty_like(keys)
            keys[..., band.start * width : band.stop * width, :] = key
            values[..., band.start * width : band.stop * width, :] = value
            self._done_tile()
        for band in bands:
            tokens, normed = tokens_of(band)
            self._write(target, band, slice(None), finish(tokens, normed, keys, values))
