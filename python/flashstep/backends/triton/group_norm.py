"""group_norm as three Triton kernels: split statistics, their combine, and one normalise pass.

For x (B, C, *spatial) seen as (B, C, S) with G groups of C/G channels, per (b, g)::

    mean = E[x_bg],  rstd = 1 / sqrt(Var[x_bg] + eps)        (biased variance over C/G · S values)
    y    = (x - mean) · rstd · weight[c] + bias[c]
    y    = y · sigmoid(y)                                     if activation == "silu"
    y    = y + residual                                       if residual is given

The statistics run in two levels so that a group of millions of values (the VAE decoder at 2048²:
4 channels × 4 M positions per group) spreads over the whole GPU and stays exact in fp32:

1. ``_group_norm_partials_kernel``: a program per (batch, channel block, spatial chunk) walks its
   chunk tile by tile; each tile gives per-channel (count, mean, m2 = Σ(x - mean)²) exactly from
   registers, and tiles merge with Chan et al.'s formula
   ``mean += δ·n_t/n,  m2 += m2_t + δ²·n_old·n_t/n``. Output: per-channel partials (B, C, chunks).
2. ``_group_norm_combine_kernel``: per (b, g), the C/G · chunks partials of the group, with
   ``mean = Σ n_i·mean_i / n`` and then ``m2 = Σ m2_i + n_i·(mean_i - mean)²`` (two passes over
   the partials, so no E[x²] - E[x]² cancellation anywhere).
3. ``_group_norm_apply_kernel``: one read of x (and of the residual), one write of y, one tile per
   program over (batch, channel block, spatial block).

Given ``stats=(mean, rstd)`` (each (B, G) fp32), steps 1 and 2 are skipped. The (channel, spatial)
tiles read x through its strides: NCHW (spatial stride 1) and channels_last (channel stride 1) are
both native and coalesced, since Triton specialises unit strides and orders each tile along the
contiguous axis; the output keeps x's memory format. Only a 4-D view whose H and W cannot merge into
one spatial stride (a crop along W) is copied first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...ops._checks import same_memory_format
from . import interpreting, tensors_on_supported_device
from ._utils import device_guard, multiprocessor_count, next_power_of_2, num_warps_for


@triton.jit
def _group_norm_partials_kernel(
    x_ptr, partial_mean_ptr, partial_m2_ptr,
    channels, spatial, stride_xb, stride_xc, stride_xs,
    num_channel_blocks, num_chunks, tiles_per_chunk,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per-channel (mean, m2) of one spatial chunk of tiles_per_chunk · BLOCK_S positions.

    Grid: (chunks · B · channel blocks,), chunk fastest. Partials: (B, C, chunks) fp32, contiguous.
    """
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    batch_block = pid // num_chunks
    batch = (batch_block // num_channel_blocks).to(tl.int64)
    offs_c = (batch_block % num_channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_mask = offs_c < channels
    x_base = x_ptr + batch * stride_xb + offs_c[:, None] * stride_xc

    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    chunk_start = chunk.to(tl.int64) * tiles_per_chunk * BLOCK_S
    for tile in range(0, tiles_per_chunk):
        tile_start = chunk_start + tile * BLOCK_S
        offs_s = tile_start + tl.arange(0, BLOCK_S)  # (BLOCK_S,) int64
        mask = c_mask[:, None] & (offs_s < spatial)[None, :]
        x = tl.load(x_base + offs_s[None, :] * stride_xs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_S)

        tile_count = tl.minimum(tl.maximum(spatial - tile_start, 0), BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, 1) / tl.maximum(tile_count, 1.0)
        centred = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centred * centred, 1)

        new_count = count + tile_count
        delta = tile_mean - mean
        weight = tile_count / tl.maximum(new_count, 1.0)
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
        count = new_count

    partial = (batch * channels + offs_c) * num_chunks + chunk
    tl.store(partial_mean_ptr + partial, mean, mask=c_mask)
    tl.store(partial_m2_ptr + partial, m2, mask=c_mask)


@triton.jit
def _group_norm_combine_kernel(
    partial_mean_ptr, partial_m2_ptr, mean_ptr, rstd_ptr,
    num_groups_total, partials_per_group, num_chunks, chunk_length, spatial, group_count, eps,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """(mean, rstd) of BLOCK_G groups from their partials.

    The partials of group (b, g) are the C/G · chunks contiguous entries from (b·G + g)·(C/G)·chunks
    on; entry p belongs to chunk p % chunks, which counts min(chunk_length, S - chunk·chunk_length)
    positions. group_count = C/G · S. Grid: (ceil(B·G / BLOCK_G),).
    """
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,) flat (b, g)
    g_mask = offs_g < num_groups_total
    row = offs_g.to(tl.int64)[:, None] * partials_per_group

    weighted_sum = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, partials_per_group, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = g_mask[:, None] & (offs_p < partials_per_group)[None, :]
        part_mean = tl.load(partial_mean_ptr + row + offs_p[None, :], mask=mask, other=0.0)
        part_count = tl.minimum(chunk_length, spatial - (offs_p % num_chunks) * chunk_length).to(tl.float32)
        weighted_sum += tl.sum(part_mean * part_count[None, :], 1)
    mean = weighted_sum / group_count

    m2 = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, partials_per_group, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = g_mask[:, None] & (offs_p < partials_per_group)[None, :]
        part_mean = tl.load(partial_mean_ptr + row + offs_p[None, :], mask=mask, other=0.0)
        part_m2 = tl.load(partial_m2_ptr + row + offs_p[None, :], mask=mask, other=0.0)
        part_count = tl.minimum(chunk_length, spatial - (offs_p % num_chunks) * chunk_length).to(tl.float32)
        delta = tl.where(mask, part_mean - mean[:, None], 0.0)
        m2 += tl.sum(part_m2 + part_count[None, :] * delta * delta, 1)

    tl.store(mean_ptr + offs_g, mean, mask=g_mask)
    tl.store(rstd_ptr + offs_g, tl.math.rsqrt(m2 / group_count + eps), mask=g_mask)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr, out_ptr, residual_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    channels, spatial, num_groups, channels_per_group,
    stride_xb, stride_xc, stride_xs,
    stride_ob, stride_oc, stride_os,
    stride_rb, stride_rc, stride_rs,
    num_channel_blocks, num_spatial_blocks,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """y = act((x - mean)·rstd·w + b) (+ residual) on one (BLOCK_C, BLOCK_S) tile.

    Grid: (spatial blocks · B · channel blocks,), spatial block fastest. Channel blocks need not
    align with groups: each channel gathers its group's (mean, rstd).
    """
    pid = tl.program_id(0)
    spatial_block = pid % num_spatial_blocks
    batch_block = pid // num_spatial_blocks
    batch = (batch_block // num_channel_blocks).to(tl.int64)
    offs_c = (batch_block % num_channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    offs_s = spatial_block * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    c_mask = offs_c < channels
    mask = c_mask[:, None] & (offs_s < spatial)[None, :]

    group = batch * num_groups + offs_c // channels_per_group
    mean = tl.load(mean_ptr + group, mask=c_mask, other=0.0).to(tl.float32)
    scale = tl.load(rstd_ptr + group, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)

    x_ptrs = x_ptr + batch * stride_xb + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_S)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + batch * stride_rb + offs_c[:, None] * stride_rc + offs_s[None, :] * stride_rs
        y += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + batch * stride_ob + offs_c[:, None] * stride_oc + offs_s[None, :] * stride_os
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


class ChannelsSpatial(NamedTuple):
    """A (B, C, *spatial) tensor addressed as (B, C, S) through three strides."""

    tensor: torch.Tensor
    stride_b: int
    stride_c: int
    stride_s: int

    @property
    def strides(self) -> Tuple[int, int, int]:
        return self.stride_b, self.stride_c, self.stride_s


def channels_spatial(t: torch.Tensor) -> ChannelsSpatial:
    """t as (B, C, S) without a copy when its spatial dims merge into one stride, else a copy."""
    if t.dim() == 3:
        return ChannelsSpatial(t, t.stride(0), t.stride(1), t.stride(2))
    height, width = t.shape[2:]
    stride_h, stride_w = t.stride(2), t.stride(3)
    if width == 1:
        return ChannelsSpatial(t, t.stride(0), t.stride(1), stride_h)
    if height == 1 or stride_h == width * stride_w:
        return ChannelsSpatial(t, t.stride(0), t.stride(1), stride_w)
    return channels_spatial(t.contiguous(memory_format=same_memory_format(t)))


@dataclass(frozen=True)
class GroupNormBlocks:
    """Tiles of the three kernels.

    block_c × block_s is the (channels, positions) tile of the partials and apply kernels;
    tiles_per_chunk is how many spatial tiles one partials program folds together.
    """

    block_c: int
    block_s: int
    tiles_per_chunk: int


# Values per (channel, position) tile. NOTE: 4096 is 16 values a thread at 8 warps; for the UNet and VAE
# shapes both the partials and the apply kernels then compile to 16-byte vector loads at 32-79
# registers, without spills (Triton 3.8, ptxas for sm_90a). The interpreter costs about the same per
# program whatever the tile, so it takes larger tiles.
GPU_TILE = 4096
INTERPRETER_TILE = 16384
# NOTE: a few programs per SM keep enough loads in flight; on an H100 (132 SMs) the VAE decoder's 32
# groups of 4 M values become 530 (channels_last) to 640 (NCHW) partials programs instead of 32.
PROGRAMS_PER_SM = 4


def default_blocks(x: ChannelsSpatial, batch: int, channels: int, spatial: int) -> GroupNormBlocks:
    """Tile shape from the layout, chunk length from the size of the problem.

    Positions contiguous (NCHW): the tile runs along S, up to the whole tile, and stacks channels
    when S is short. Channels contiguous (channels_last): up to 64 channels a row (128 bytes in
    fp16) and positions below them.
    """
    tile = INTERPRETER_TILE if interpreting() else GPU_TILE
    if x.stride_c == 1 and x.stride_s != 1:
        block_c = min(next_power_of_2(channels), 64)
        block_s = min(next_power_of_2(spatial), tile // block_c)
    else:
        block_s = min(next_power_of_2(spatial), tile)
        block_c = min(next_power_of_2(channels), tile // block_s)
    tiles = batch * triton.cdiv(channels, block_c) * triton.cdiv(spatial, block_s)
    target_programs = 1 if interpreting() else PROGRAMS_PER_SM * multiprocessor_count(x.tensor.device)
    return GroupNormBlocks(block_c, block_s, tiles_per_chunk=max(1, tiles // target_programs))


def group_norm_statistics(
    x: ChannelsSpatial, num_groups: int, eps: float, blocks: GroupNormBlocks
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each (B, G) fp32, of x (B, C, S) in two levels (see the module docstring)."""
    batch, channels = x.tensor.shape[:2]
    spatial = math.prod(x.tensor.shape[2:])
    device = x.tensor.device
    chunk_length = blocks.tiles_per_chunk * blocks.block_s
    num_chunks = triton.cdiv(spatial, chunk_length)
    num_channel_blocks = triton.cdiv(channels, blocks.block_c)
    partial_mean = torch.empty((batch, channels, num_chunks), dtype=torch.float32, device=device)
    partial_m2 = torch.empty_like(partial_mean)
    _group_norm_partials_kernel[(num_chunks * batch * num_channel_blocks,)](
        x.tensor, partial_mean, partial_m2,
        channels, spatial, *x.strides,
        num_channel_blocks, num_chunks, blocks.tiles_per_chunk,
        BLOCK_C=blocks.block_c,
        BLOCK_S=blocks.block_s,
        num_warps=num_warps_for(blocks.block_c * blocks.block_s),
    )

    channels_per_group = channels // num_groups
    partials_per_group = channels_per_group * num_chunks
    groups_total = batch * num_groups
    block_p = min(next_power_of_2(partials_per_group), 1024)
    block_g = min(next_power_of_2(groups_total), max(1, 1024 // block_p))
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=device)
    rstd = torch.empty_like(mean)
    _group_norm_combine_kernel[(triton.cdiv(groups_total, block_g),)](
        partial_mean, partial_m2, mean, rstd,
        groups_total, partials_per_group, num_chunks, chunk_length, spatial,
        float(channels_per_group * spatial), eps,
        BLOCK_G=block_g,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return mean, rstd


def group_norm_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: Optional[str],
    residual: Optional[torch.Tensor],
    stats: Optional[Tuple[torch.Tensor, torch.Tensor]],
    blocks: Optional[GroupNormBlocks] = None,
) -> torch.Tensor:
    """The launcher; ``blocks`` None picks :func:`default_blocks`."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=same_memory_format(x))
    if out.numel() == 0:
        return out
    batch, channels = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    source = channels_spatial(x)
    target = channels_spatial(out)
    blocks = default_blocks(source, batch, channels, spatial) if blocks is None else blocks
    with device_guard(x):
        if stats is None:
            mean, rstd = group_norm_statistics(source, num_groups, eps, blocks)
        else:
            mean, rstd = (s.to(device=x.device, dtype=torch.float32).contiguous() for s in stats)
        residual_view = channels_spatial(residual) if residual is not None else source
        num_channel_blocks = triton.cdiv(channels, blocks.block_c)
        num_spatial_blocks = triton.cdiv(spatial, blocks.block_s)
        _group_norm_apply_kernel[(num_spatial_blocks * batch * num_channel_blocks,)](
            source.tensor, out, residual_view.tensor, mean, rstd,
            x if weight is None else weight, x if bias is None else bias,
            channels, spatial, num_groups, channels // num_groups,
            *source.strides, *target.strides, *residual_view.strides,
            num_channel_blocks, num_spatial_blocks,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            SILU=activation == "silu",
            HAS_RESIDUAL=residual is not None,
            BLOCK_C=blocks.block_c,
            BLOCK_S=blocks.block_s,
            num_warps=num_warps_for(blocks.block_c * blocks.block_s),
        )
    return out


def forward(x, num_groups, weight, bias, eps, activation, residual, stats):
    """GroupNorm(+SiLU)(+residual) of x (B, C, L) or (B, C, H, W), NCHW or channels_last."""
    return group_norm_fwd(x, num_groups, weight, bias, eps, activation, residual, stats)


def why_not(x, num_groups, weight, bias, eps, activation, residual, stats):
    reason = tensors_on_supported_device(x, weight, bias, residual, *(stats or ()))
    if reason is not None:
        return reason
    if x.dim() not in (3, 4):
        return f"x has {x.dim()} dims; the triton group_norm takes (B, C, L) or (B, C, H, W)"
    return None
