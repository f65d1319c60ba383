"""The Stable Diffusion UNet (SD 1.x, 2.x, Turbo, XL) on flashstep.ops, with diffusers' state-dict keys.

    emb      = time_embedding(sinusoid(t))  [+ add_embedding([text_embeds, sinusoid(time_ids)])]   (SDXL)
    h        = conv_in(sample)
    h, skips = down blocks (resnets + spatial transformers attending to ``context``, stride-2 convs)
    h        = mid block
    h        = up blocks (each resnet on [h, skip]; nearest 2× + conv)
    out      = conv_out(silu(conv_norm_out(h)))

sample (B, in_channels, h, w), any h and w (upsampling follows the skips' sizes), timestep a scalar or
(B,), context (B, M, cross_attention_dim) -> (B, out_channels, h, w). A diffusers
``UNet2DConditionModel`` state dict loads with ``strict=True``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .configs import UNetConfig
from .embeddings import TimestepEmbedding, sinusoidal_embedding
from .layers import Conv2d, GroupNorm, LoRAModelMixin
from .unet_blocks import (BlockSpec, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
                          UpBlock2D)


class UNet2DCondition(nn.Module, LoRAModelMixin):
    """diffusers ``UNet2DConditionModel`` for the configs :class:`UNetConfig` describes (see the module docstring)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        heads, depths = config.heads_per_block, config.depth_per_block
        levels = len(channels)
        temb_channels = config.time_embed_dim
        spec = BlockSpec(temb_channels, config.norm_num_groups, config.norm_eps, config.cross_attention_dim,
                         config.use_linear_projection)

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_channels)

        self.down_blocks = nn.ModuleList()
        for level, block_type in enumerate(config.down_block_types):
            in_channels = channels[max(level - 1, 0)]
            add_downsample = level < levels - 1
            if block_type == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(spec, in_channels, channels[level], config.layers_per_block, add_downsample,
                                             heads[level], depths[level])
            else:
                block = DownBlock2D(spec, in_channels, channels[level], config.layers_per_block, add_downsample)
            self.down_blocks.append(block)

        self.mid_block = UNetMidBlock2DCrossAttn(spec, channels[-1], heads[-1], depths[-1])

        self.up_blocks = nn.ModuleList()
        reversed_channels, reversed_heads, reversed_depths = channels[::-1], heads[::-1], depths[::-1]
        for level, block_type in enumerate(config.up_block_types):
            out_channels = reversed_channels[level]
            prev_channels = reversed_channels[max(level - 1, 0)]
            in_channels = reversed_channels[min(level + 1, levels - 1)]
            add_upsample = level < levels - 1
            layers = config.layers_per_block + 1
            if block_type == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(spec, in_channels, prev_channels, out_channels, layers, add_upsample,
                                           reversed_heads[level], reversed_depths[level])
            else:
                block = UpBlock2D(spec, in_channels, prev_channels, out_channels, layers, add_upsample)
            self.up_blocks.append(block)

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        self.requires_grad_(False)

    def time_embed(self, timestep: Union[torch.Tensor, float, int], batch: int, dtype: torch.dtype,
                   device: torch.device, text_embeds: Optional[torch.Tensor],
                   time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The time embedding (B, 4·C0) in ``dtype``, with SDXL's text/size conditioning added."""
        config = self.config
        timesteps = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        t_emb = sinusoidal_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb.to(dtype))
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs text_embeds (B, D) and time_ids (B, 6)")
            time_emb = sinusoidal_embedding(time_ids.flatten(), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                            config.freq_shift).reshape(batch, -1)  # (B, 6·addition_time_embed_dim)
            emb = emb + self.add_embedding(torch.cat([text_embeds.to(dtype), time_emb.to(dtype)], dim=-1))
        return emb

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], context: torch.Tensor,
                text_embeds: Optional[torch.Tensor] = None, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample (B, C, h, w), timestep scalar or (B,), context (B, M, D) [, text_embeds (B, D'), time_ids (B, 6)]
        -> (B, C_out, h, w)."""
        emb = self.time_embed(timestep, sample.shape[0], sample.dtype, sample.device, text_embeds, time_ids)
        temb_act = F.silu(emb)  # (B, 4·C0): every resnet's time_emb_proj reads silu(emb)

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb_act, context)
            skips.extend(block_skips)

        h = self.mid_block(h, temb_act, context)

        for block in self.up_blocks:
            # The skips this block leaves behind end with the next level's size: upsample to it, so odd sizes
            # round-trip through the stride-2 convs.
            remaining = len(skips) - len(block.resnets)
            upsample_size = skips[remaining - 1].shape[-2:] if block.upsamplers is not None else None
            h = block(h, skips, temb_act, context, upsample_size)

        return self.conv_out(self.conv_norm_out(h, activation="silu"))
