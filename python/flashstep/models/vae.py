"""The SD / SDXL VAE (diffusers ``AutoencoderKL``) on flashstep.ops, with diffusers' state-dict keys.

    encode: x (B, 3, H, W) in [-1, 1] -> quant_conv(encoder(x)) = [mean, logvar], each (B, 4, H/8, W/8),
            logvar clamped to [-30, 20]
    decode: z (B, 4, h, w) -> decoder(post_quant_conv(z)), (B, 3, 8h, 8w)

Latents enter the UNet as ``scaling_factor · z`` (0.18215 SD, 0.13025 SDXL); ``decode`` takes the unscaled z.
The encoder and decoder run their layers in a plain sequence, which
:class:`flashstep.runner.vae_tiling.TiledVAE` follows to stream them tile by tile when they do not fit memory.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .configs import VAEConfig
from .layers import Conv2d, GroupNorm, LoRAModelMixin
from .vae_blocks import VAE_NORM_EPS, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class Encoder(nn.Module):
    """conv_in, down blocks, mid block, silu(GroupNorm), conv_out to 2·latent channels (mean ‖ logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                                   add_downsample=i < len(channels) - 1)
                for i in range(len(channels))
            ]
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2·latent, H/f, W/f)."""
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_norm_out(h, activation="silu"))


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (layers_per_block + 1 resnets each), silu(GroupNorm), conv_out to RGB."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        reversed_channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1,
                                 groups, add_upsample=i < len(reversed_channels) - 1)
                for i in range(len(reversed_channels))
            ]
        )
        self.conv_norm_out = GroupNorm(groups, reversed_channels[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(reversed_channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, h, w) -> (B, 3, f·h, f·w)."""
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h, activation="silu"))


class AutoencoderKL(nn.Module, LoRAModelMixin):
    """diffusers ``AutoencoderKL`` (see the module docstring)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def force_upcast(self) -> bool:
        return self.config.force_upcast

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (mean, logvar) of the latent posterior, each (B, latent, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, h, w), unscaled -> image (B, 3, f·h, f·w), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mean of encode(x)): the deterministic reconstruction, (B, 3, H, W) -> (B, 3, H, W)."""
        return self.decode(self.encode(x)[0])
