"""The shapes the op benchmarks run: the real layers of the target models, by name.

Every shape exists in two forms. The full form is the model's own layer and runs on a GPU. The
reduced form keeps the structure (channels, heads, head dim, groups, shuffle factor, the 77 text
tokens) and shrinks only the sequence length or the image side, so that on a CPU
``pytest benchmarks --benchmark-disable`` runs every case once within CI's time. Each list below is
already the form for this machine (:data:`FULL`), and a case keeps its name in both forms.

Sources (batch 1 unless said otherwise):

* SD 2.1 / SD-Turbo UNet: widths 320/640/1280 at latent sides s, s/2, s/4 (s = 64 for a 512-px image,
  128 for 1024 px); heads of dim 64, 5/10/20 of them; cross-attention to 77 text tokens of width 1024;
  feed-forward GEGLU 4× wide. Batch 2: S3Diff runs the UNet with classifier-free guidance.
* SD VAE: widths 128/256/512 at image sides H, H/2, H/4 (H = 512 or 1024 px); its mid-block
  attention is one head of 512 over the (H/8)² latent pixels.
* LoRA: OSEDiff rank 4 (merged into the weights at load), S3Diff UNet rank 32, scale 8/32, with a
  per-image (r × r) mixing matrix.
* Pixel-shuffle heads for a 512² → 2048² (×4) upscale: Real-ESRGAN SRVGGNetCompact (conv 64 → 3·4²,
  shuffle 4, plus the nearest-upsampled input; also from a 1024² input), SwinIR classical (conv
  64 → 64·2², shuffle 2, twice: at 512² and at 1024²), SwinIR lightweight (conv 60 → 3·4², shuffle 4).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import torch

FULL = torch.cuda.is_available()

TEXT_TOKENS = 77
CFG_BATCH = 2
GROUPS = 32

OSEDIFF_LORA_RANK, OSEDIFF_LORA_SCALE = 4, 2.0
S3DIFF_LORA_RANK, S3DIFF_LORA_SCALE = 32, 0.25

# Reduced forms: sequence lengths and image sides are divided by these (the text tokens stay 77).
CPU_SEQUENCE_DIVISOR = 16
CPU_SIDE_DIVISOR = 8
CPU_SHUFFLE_SIDE_DIVISOR = 16


@dataclass(frozen=True)
class AttentionShape:
    """q (batch, heads, queries, head_dim), k and v (batch, heads, keys, head_dim)."""

    name: str
    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int

    def flops(self) -> int:
        """4·N·M·D per head: q·kᵀ and p·v."""
        return 4 * self.batch * self.heads * self.queries * self.keys * self.head_dim

    def bytes_moved(self, element_size: int) -> int:
        """q, k, v read once, out written once."""
        return element_size * self.batch * self.heads * self.head_dim * 2 * (self.queries + self.keys)

    def reduced(self) -> "AttentionShape":
        keys = self.keys if self.keys == TEXT_TOKENS else self.keys // CPU_SEQUENCE_DIVISOR
        return replace(self, queries=self.queries // CPU_SEQUENCE_DIVISOR, keys=keys)


@dataclass(frozen=True)
class NormShape:
    """x (batch, channels, height, width) in ``groups`` groups."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    groups: int = GROUPS

    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    def bytes_moved(self, element_size: int) -> int:
        """x read once, y written once, weight and bias read once."""
        return element_size * (2 * self.numel() + 2 * self.channels)

    def reduced(self) -> "NormShape":
        return replace(self, height=self.height // CPU_SIDE_DIVISOR, width=self.width // CPU_SIDE_DIVISOR)


@dataclass(frozen=True)
class ConvShape:
    """x (batch, in_channels, height, width) -> (batch, out_channels, height, width), "same" padding."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int = 3

    def flops(self) -> int:
        """2·Cout·Cin·k²·H·W per image: the layer's own work (a LoRA branch is not counted)."""
        return 2 * self.batch * self.out_channels * self.in_channels * self.kernel**2 * self.height * self.width

    def bytes_moved(self, element_size: int) -> int:
        """x and the weight read once, y written once."""
        pixels = self.batch * self.height * self.width
        weight = self.out_channels * self.in_channels * self.kernel**2
        return element_size * (pixels * (self.in_channels + self.out_channels) + weight)

    def reduced(self) -> "ConvShape":
        return replace(self, height=self.height // CPU_SIDE_DIVISOR, width=self.width // CPU_SIDE_DIVISOR)


@dataclass(frozen=True)
class LinearShape:
    """x (batch, tokens, in_features) -> (batch, tokens, out_features)."""

    name: str
    batch: int
    tokens: int
    in_features: int
    out_features: int

    def flops(self) -> int:
        """2·M·N·K with M = batch·tokens."""
        return 2 * self.batch * self.tokens * self.in_features * self.out_features

    def bytes_moved(self, element_size: int, out_features: int = 0) -> int:
        """x and the weight read once, the output (``out_features`` wide, default the GEMM's) written once."""
        rows = self.batch * self.tokens
        written = out_features or self.out_features
        return element_size * (rows * (self.in_features + written) + self.in_features * self.out_features)

    def reduced(self) -> "LinearShape":
        tokens = self.tokens if self.tokens == TEXT_TOKENS else self.tokens // CPU_SEQUENCE_DIVISOR
        return replace(self, tokens=tokens)


@dataclass(frozen=True)
class PixelShuffleShape:
    """pixel_shuffle: (batch, channels·factor², height, width) -> (batch, channels, height·factor, width·factor);
    pixel_unshuffle the reverse."""

    name: str
    batch: int
    channels: int
    factor: int
    height: int
    width: int

    def numel(self) -> int:
        return self.batch * self.channels * self.factor**2 * self.height * self.width

    def bytes_moved(self, element_size: int) -> int:
        """Input read once, output written once."""
        return 2 * self.numel() * element_size

    def reduced(self) -> "PixelShuffleShape":
        return replace(
            self, height=self.height // CPU_SHUFFLE_SIDE_DIVISOR, width=self.width // CPU_SHUFFLE_SIDE_DIVISOR
        )


@dataclass(frozen=True)
class ShuffleHeadShape:
    """An upscaling head: conv x (batch, in_channels, height, width) -> (batch, channels·factor², height, width),
    shuffled to (batch, channels, height·factor, width·factor). ``residual``: a (batch, channels, H·r, W·r)
    tensor is added (SRVGG's nearest-upsampled input)."""

    name: str
    batch: int
    in_channels: int
    channels: int
    factor: int
    height: int
    width: int
    kernel: int = 3
    residual: bool = False

    @property
    def conv_channels(self) -> int:
        return self.channels * self.factor**2

    def flops(self) -> int:
        """The conv's 2·Cout·Cin·k²·H·W per image."""
        return 2 * self.batch * self.conv_channels * self.in_channels * self.kernel**2 * self.height * self.width

    def bytes_moved(self, element_size: int) -> int:
        """x, the weight and the residual read once, the shuffled output written once."""
        x = self.batch * self.in_channels * self.height * self.width
        weight = self.conv_channels * self.in_channels * self.kernel**2
        out = self.batch * self.conv_channels * self.height * self.width
        return element_size * (x + weight + out * (2 if self.residual else 1))

    def reduced(self) -> "ShuffleHeadShape":
        return replace(
            self, height=self.height // CPU_SHUFFLE_SIDE_DIVISOR, width=self.width // CPU_SHUFFLE_SIDE_DIVISOR
        )


@dataclass(frozen=True)
class CopyShape:
    """A device-to-device copy of ``numel`` bytes: the memory-bandwidth ceiling."""

    name: str
    numel: int

    def bytes_moved(self, element_size: int = 1) -> int:
        return 2 * self.numel * element_size

    def reduced(self) -> "CopyShape":
        return replace(self, numel=self.numel // 128)


def for_this_machine(shapes: List) -> List:
    """The full forms on a GPU, the reduced forms elsewhere."""
    return list(shapes) if FULL else [shape.reduced() for shape in shapes]


def name_of(shape) -> str:
    """pytest id: the case's name."""
    return shape.name


# NOTE: in every list the cases named by a performance target come first, so that a time budget that
# cuts a run short (benchmarks/gpu_check.sh) still measures them.
ATTENTION = for_this_machine(
    [
        AttentionShape("unet64_l1_self", CFG_BATCH, 5, 4096, 4096, 64),
        AttentionShape("vae64_mid", 1, 1, 4096, 4096, 512),
        AttentionShape("unet64_l2_self", CFG_BATCH, 10, 1024, 1024, 64),
        AttentionShape("unet64_l3_self", CFG_BATCH, 20, 256, 256, 64),
        AttentionShape("unet64_l1_cross", CFG_BATCH, 5, 4096, TEXT_TOKENS, 64),
        AttentionShape("unet64_l2_cross", CFG_BATCH, 10, 1024, TEXT_TOKENS, 64),
        AttentionShape("unet64_l3_cross", CFG_BATCH, 20, 256, TEXT_TOKENS, 64),
        AttentionShape("unet128_l1_self", CFG_BATCH, 5, 16384, 16384, 64),
        AttentionShape("unet128_l2_self", CFG_BATCH, 10, 4096, 4096, 64),
        AttentionShape("unet128_l3_self", CFG_BATCH, 20, 1024, 1024, 64),
        AttentionShape("unet128_l1_cross", CFG_BATCH, 5, 16384, TEXT_TOKENS, 64),
        AttentionShape("vae128_mid", 1, 1, 16384, 16384, 512),
    ]
)

GROUP_NORM = for_this_machine(
    [
        NormShape("vae512_128", 1, 128, 512, 512),
        NormShape("vae1024_128", 1, 128, 1024, 1024),
        NormShape("vae512_256", 1, 256, 256, 256),
        NormShape("vae512_512", 1, 512, 128, 128),
        NormShape("vae1024_256", 1, 256, 512, 512),
        NormShape("vae1024_512", 1, 512, 256, 256),
        NormShape("unet64_320", CFG_BATCH, 320, 64, 64),
        NormShape("unet64_640", CFG_BATCH, 640, 32, 32),
        NormShape("unet64_1280", CFG_BATCH, 1280, 16, 16),
        NormShape("unet128_320", CFG_BATCH, 320, 128, 128),
    ]
)

DEVICE_COPY = for_this_machine([CopyShape("copy_1gib", 1 << 30)])

CONV = for_this_machine(
    [
        ConvShape("unet64_320", CFG_BATCH, 320, 320, 64, 64),
        ConvShape("unet64_640", CFG_BATCH, 640, 640, 32, 32),
        ConvShape("unet64_1280", CFG_BATCH, 1280, 1280, 16, 16),
        ConvShape("unet128_320", CFG_BATCH, 320, 320, 128, 128),
    ]
)

LINEAR = for_this_machine(
    [
        LinearShape("unet64_l1_to_q", CFG_BATCH, 4096, 320, 320),
        LinearShape("unet64_l1_ff_out", CFG_BATCH, 4096, 1280, 320),
        LinearShape("unet64_l2_to_out", CFG_BATCH, 1024, 640, 640),
        LinearShape("unet64_l3_ff_out", CFG_BATCH, 256, 5120, 1280),
        LinearShape("unet_cross_to_k", CFG_BATCH, TEXT_TOKENS, 1024, 320),
        LinearShape("unet128_l1_proj_in", CFG_BATCH, 16384, 320, 320),
    ]
)

LINEAR_PER_SAMPLE_LORA = for_this_machine(
    [
        LinearShape("unet64_l1_to_q", CFG_BATCH, 4096, 320, 320),
        LinearShape("unet64_l1_ff_out", CFG_BATCH, 4096, 1280, 320),
        LinearShape("unet64_l3_ff_out", CFG_BATCH, 256, 5120, 1280),
    ]
)

# GEGLU: in -> 2·inner with inner = 4·in; out_features is the projection's 2·inner.
GEGLU = for_this_machine(
    [
        LinearShape("unet64_l1_ff", CFG_BATCH, 4096, 320, 2 * 1280),
        LinearShape("unet64_l2_ff", CFG_BATCH, 1024, 640, 2 * 2560),
        LinearShape("unet64_l3_ff", CFG_BATCH, 256, 1280, 2 * 5120),
        LinearShape("unet128_l1_ff", CFG_BATCH, 16384, 320, 2 * 1280),
    ]
)

CONV_PIXEL_SHUFFLE = for_this_machine(
    [
        ShuffleHeadShape("srvgg_x4_512", 1, 64, 3, 4, 512, 512, residual=True),
        ShuffleHeadShape("swinir_x4_up1_512", 1, 64, 64, 2, 512, 512),
        ShuffleHeadShape("swinir_x4_up2_1024", 1, 64, 64, 2, 1024, 1024),
        ShuffleHeadShape("swinir_light_x4_512", 1, 60, 3, 4, 512, 512),
        ShuffleHeadShape("srvgg_x4_1024", 1, 64, 3, 4, 1024, 1024, residual=True),
    ]
)

# The bare shuffles of the same heads' conv outputs.
PIXEL_SHUFFLE = for_this_machine(
    [
        PixelShuffleShape("srvgg_x4_512", 1, 3, 4, 512, 512),
        PixelShuffleShape("swinir_x4_up1_512", 1, 64, 2, 512, 512),
        PixelShuffleShape("swinir_x4_up2_1024", 1, 64, 2, 1024, 1024),
    ]
)

# pixel_unshuffle of the input image by 2 (RRDBNet ×2, AdcSR): a 1024² RGB image to (1, 12, 512, 512).
PIXEL_UNSHUFFLE = for_this_machine(
    [
        PixelShuffleShape("rrdb_x2_in_1024", 1, 3, 2, 512, 512),
    ]
)
