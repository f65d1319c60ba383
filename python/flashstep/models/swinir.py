"""SwinIR (JingyunLiang/SwinIR): Swin-Transformer image restoration, with the official parameter names.

    x₀ = (x − mean)·img_range                          mean = (0.4488, 0.4371, 0.4040) for RGB, 0 for grey
    f  = conv_first(x₀)
    t  = patch_embed(f)                               tokens (B, H·W, E), LayerNorm
    t  = RSTB_L(… RSTB_1(t)),   RSTB(t) = embed(conv(unembed(SwinBlock_d(… SwinBlock_1(t))))) + t
    g  = conv_after_body(unembed(norm(t))) + f
    y  = head(g)/img_range + mean

    SwinBlock(t) = t' + MLP(LN₂(t')),   t' = t + W-MSA(LN₁(t)) (odd blocks: cyclic shift by window/2, masked)
    W-MSA: per window of w×w tokens and per head, softmax(q·kᵀ/√d + B[rel(i, j)] + M)·v, then proj;
           B is the learned relative position bias table ((2w−1)², heads), M the shifted-window mask
           (−100 between tokens from different image regions) for the actual input size.
    MLP:   fc2(GELU(fc1(·))), hidden = E·mlp_ratio

heads (``upsampler``): "pixelshuffle" (classical SR): conv_last(PS₂(conv(… PS₂(conv(lrelu₀.₀₁(conv(g))))))),
"pixelshuffledirect" (lightweight): PS_s(conv(g)), "nearest+conv" (real-world SR):
conv_last(lrelu(conv_hr(lrelu(conv_up_k(nearest×2(…))))) with lrelu = LeakyReLU(0.2), and "" (denoising,
JPEG): x₀ + conv_last(g). The conv + shuffle pairs run as :func:`flashstep.ops.conv2d_pixel_shuffle`.
'1conv' residual connections are one 3×3 conv, '3conv' are 3×3 (E→E/4), lrelu, 1×1, lrelu, 3×3 (→E).

x: (B, C, H, W) -> y: (B, C, H·s, W·s); the input is reflect-padded to a multiple of the window and the
output cropped back. The relative position index and the shift masks are not parameters: they are
computed from the window size and the input size (the checkpoints' ``relative_position_index`` and
``attn_mask`` buffers are dropped by :mod:`flashstep.loaders.sr_nets`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import Conv2d, Linear
from .sr_base import SRNet

RGB_MEAN = (0.4488, 0.4371, 0.4040)
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
RESIDUAL_CONNECTIONS = ("1conv", "3conv")
MASK_VALUE = -100.0  # the official value; exp(-100) vanishes in every dtype


@dataclass(frozen=True)
class SwinIRConfig:
    """Hyper-parameters, named as in the official ``SwinIR(...)`` constructor (``upscale`` is ``scale``)."""

    in_channels: int = 3
    embed_dim: int = 180
    depths: Tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: Tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    scale: int = 2
    upsampler: str = "pixelshuffle"
    resi_connection: str = "1conv"
    img_range: float = 1.0
    num_feat: int = 64
    qkv_bias: bool = True
    patch_norm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be non-empty, of one length")
        for heads in self.num_heads:
            if heads < 1 or self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible into {heads} heads")
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {self.window_size}")
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler {self.upsampler!r}; valid: {UPSAMPLERS}")
        if self.resi_connection not in RESIDUAL_CONNECTIONS:
            raise ValueError(f"resi_connection {self.resi_connection!r}; valid: {RESIDUAL_CONNECTIONS}")
        if self.upsampler == "" and self.scale != 1:
            raise ValueError(f"the '' head (denoising, JPEG) keeps the size; got scale {self.scale}")
        if self.upsampler == "pixelshuffle" and not (is_power_of_two(self.scale) or self.scale == 3):
            raise ValueError(f"the pixelshuffle head upsamples by 2^n or 3, got scale {self.scale}")
        if self.upsampler == "nearest+conv" and not (is_power_of_two(self.scale) and self.scale >= 2):
            raise ValueError(f"the nearest+conv head upsamples by 2^n (n >= 1), got scale {self.scale}")
        if self.scale < 1:
            raise ValueError(f"scale must be positive, got {self.scale}")

    @property
    def mlp_hidden_dim(self) -> int:
        # NOTE: int() of the product, as the official code; the rounding to 6 decimals first keeps a ratio
        # inferred as hidden/embed_dim exact (int((15/11)·11) is 14).
        return int(round(self.embed_dim * self.mlp_ratio, 6))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# The released models (JingyunLiang/SwinIR, main_test_swinir.py); the scale varies per file.
PRESETS = {
    "classical": SwinIRConfig(),
    "lightweight": SwinIRConfig(embed_dim=60, depths=(6,) * 4, num_heads=(6,) * 4, upsampler="pixelshuffledirect"),
    "real_sr": SwinIRConfig(scale=4, upsampler="nearest+conv"),
    "real_sr_large": SwinIRConfig(
        embed_dim=240, depths=(6,) * 9, num_heads=(8,) * 9, scale=4, upsampler="nearest+conv", resi_connection="3conv"
    ),
    "color_dn": SwinIRConfig(scale=1, upsampler=""),
    "gray_dn": SwinIRConfig(in_channels=1, scale=1, upsampler=""),
    "jpeg_car": SwinIRConfig(in_channels=1, window_size=7, img_range=255.0, scale=1, upsampler=""),
}


@functools.lru_cache(maxsize=None)
def relative_position_index(window_size: int, device: torch.device) -> torch.Tensor:
    """index[i, j] = (Δrow + w − 1)·(2w − 1) + Δcol + w − 1 for tokens i, j of a w×w window: (w², w²) int64."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N)
    delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N)
    return (delta[0] * (2 * window_size - 1) + delta[1]).to(device)


@functools.lru_cache(maxsize=32)
def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of shifted windows: (nW, N, N), 0 within one region, −100 across regions.

    After the cyclic shift by −shift, the last window row/column holds pixels from up to three regions
    of the image ([0, H−w), [H−w, H−shift), [H−shift, H) per axis); tokens attend within their region only.
    """
    def region(size: int) -> torch.Tensor:
        labels = torch.zeros(size, dtype=torch.int64)
        labels[size - window_size : size - shift] = 1
        labels[size - shift :] = 2
        return labels

    labels = region(height)[:, None] * 3 + region(width)[None, :]  # (H, W)
    windows = partition_windows(labels[None, :, :, None], window_size).squeeze(-1)  # (nW, N)
    different = windows[:, :, None] != windows[:, None, :]  # (nW, N, N)
    mask = torch.zeros(different.shape, dtype=torch.float32).masked_fill_(different, MASK_VALUE)
    return mask.to(device=device, dtype=dtype)


def partition_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, w², C), windows in row-major order, tokens row-major inside a window."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def merge_windows(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: (B·nW, w², C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w×w windows with the relative position bias (and the shift mask)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """B[rel(i, j)] per head: (heads, N, N)."""
        index = relative_position_index(self.window_size, self.relative_position_bias_table.device)
        bias = self.relative_position_bias_table[index.view(-1)]  # (N·N, heads)
        tokens = self.window_size**2
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """windows (B·nW, N, C), mask (nW, N, N) or None -> (B·nW, N, C)."""
        count, tokens, channels = windows.shape
        qkv = self.qkv(windows).view(count, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B·nW, heads, N, d)
        bias = self.position_bias().to(q.dtype).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
            if count != mask.shape[0]:
                bias = bias.repeat(count // mask.shape[0], 1, 1, 1)  # (B·nW, heads, N, N)
        out = window_attention(q, k, v, bias)  # (B·nW, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(count, tokens, channels))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v; q, k, v (B', heads, N, d), bias broadcastable to (B', heads, N, N).

    NOTE: torch's SDPA with the bias as its additive mask rather than ops.attention (which takes no bias) or
    an explicit matmul + softmax. Median of 11 on 2 CPU cores (AMD EPYC, torch 2.14), 64 windows × 6 heads ×
    64 tokens × d 30: fp32 12 ms vs 24 ms explicit; bf16 33 ms vs 427 ms explicit (142 ms with fp32
    scores), with the error of fp32 scores. At 256 windows: fp32 66 vs 227 ms, bf16 82 vs 2839 ms. The bias
    is 4-D: a 5-D broadcast of the window masks over the batch ran 3.4x slower than repeating them.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Mlp(nn.Module):
    """fc2(GELU(fc1(x))); x (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """t' = t + W-MSA(LN₁(t)) (shifted when ``shift`` > 0), out = t' + MLP(LN₂(t')); t (B, H·W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, channels = x.shape
        h = self.norm1(x).view(batch, height, width, channels)
        mask = None
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(height, width, self.window_size, self.shift, x.device, x.dtype)
        windows = self.attn(partition_windows(h, self.window_size), mask)  # (B·nW, N, C)
        h = merge_windows(windows, self.window_size, height, width)  # (B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(batch, length, channels)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks, every second one shifted by window/2 (holds ``blocks`` for the key names)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, window_size // 2 if i % 2 else 0, mlp_hidden, qkv_bias)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, height, width)
        return x


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """'1conv': 3×3 conv; '3conv': 3×3 (dim→dim/4), lrelu 0.2, 1×1, lrelu 0.2, 3×3 (→dim); keys 0, 2, 4."""
    if resi_connection == "1conv":
        return Conv2d(dim, dim, 3, 1, 1)
    quarter = dim // 4
    return nn.Sequential(
        Conv2d(dim, quarter, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
        Conv2d(quarter, quarter, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
        Conv2d(quarter, dim, 3, 1, 1),
    )


def tokens_to_image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W), a channels_last view (no copy)."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C), a view (no copy for channels_last input)."""
    return x.flatten(2).transpose(1, 2)


class RSTB(nn.Module):
    """Residual Swin Transformer block: t + embed(conv(unembed(Swin blocks(t)))); t (B, H·W, C)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_hidden: int, qkv_bias: bool,
                 resi_connection: str):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_hidden, qkv_bias)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h = tokens_to_image(self.residual_group(x, height, width), height, width)  # (B, C, H, W)
        return image_to_tokens(self.conv(h)) + x


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, H·W, C), then LayerNorm when ``patch_norm`` (SwinIR's patch size is 1)."""

    def __init__(self, dim: int, patch_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = image_to_tokens(x)
        return tokens if self.norm is None else self.norm(tokens)


class SwinIR(SRNet):
    """See the module docstring."""

    supports_fp16 = False
    supports_bf16 = True

    def __init__(self, config: SwinIRConfig = SwinIRConfig()):
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.input_channels = self.output_channels = config.in_channels
        self.size_multiple = config.window_size
        dim, feat, out_ch = config.embed_dim, config.num_feat, config.in_channels

        self.conv_first = Conv2d(config.in_channels, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, config.patch_norm)
        self.layers = nn.ModuleList(
            RSTB(dim, depth, heads, config.window_size, config.mlp_hidden_dim, config.qkv_bias, config.resi_connection)
            for depth, heads in zip(config.depths, config.num_heads)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, config.resi_connection)

        self.upsample_names = []
        if config.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU(0.01, inplace=True))
        if config.upsampler == "pixelshuffle":
            factors = [3] if config.scale == 3 else [2] * int(math.log2(config.scale))
            stages = []
            for factor in factors:
                stages += [Conv2d(feat, feat * factor**2, 3, 1, 1), nn.PixelShuffle(factor)]
            self.upsample = nn.Sequential(*stages)
            self.conv_last = Conv2d(feat, out_ch, 3, 1, 1)
        elif config.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                Conv2d(dim, out_ch * config.scale**2, 3, 1, 1), nn.PixelShuffle(config.scale)
            )
        elif config.upsampler == "nearest+conv":
            self.upsample_names = [f"conv_up{k + 1}" for k in range(int(math.log2(config.scale)))]
            for name in self.upsample_names:
                setattr(self, name, Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = Conv2d(feat, feat, 3, 1, 1)
            self.conv_last = Conv2d(feat, out_ch, 3, 1, 1)
        else:
            self.conv_last = Conv2d(dim, out_ch, 3, 1, 1)

    def image_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(1, C, 1, 1): the RGB mean of the training sets for 3 channels, zero otherwise."""
        if x.shape[1] == 3:
            return torch.tensor(RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return torch.zeros((1, x.shape[1], 1, 1), dtype=x.dtype, device=x.device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, H, W) -> (B, E, H, W): the RSTBs on the tokens, then LayerNorm."""
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)  # (B, H·W, E)
        for layer in self.layers:
            tokens = layer(tokens, height, width)
        return tokens_to_image(self.norm(tokens), height, width)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.image_mean(x)
        x = (x - mean) * self.config.img_range  # (B, C, H, W)
        feat = self.conv_first(x)  # (B, E, H, W)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        upsampler = self.config.upsampler
        if upsampler == "pixelshuffle":
            y = self.conv_before_upsample(feat)  # (B, 64, H, W)
            for conv, shuffle in zip(self.upsample[0::2], self.upsample[1::2]):
                y = ops.conv2d_pixel_shuffle(y, conv.weight, conv.bias, shuffle.upscale_factor)
            y = self.conv_last(y)
        elif upsampler == "pixelshuffledirect":
            conv, shuffle = self.upsample
            y = ops.conv2d_pixel_shuffle(feat, conv.weight, conv.bias, shuffle.upscale_factor)
        elif upsampler == "nearest+conv":
            y = self.conv_before_upsample(feat)
            for name in self.upsample_names:
                y = F.leaky_relu_(getattr(self, name)(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            y = self.conv_last(F.leaky_relu_(self.conv_hr(y), 0.2))
        else:
            y = x + self.conv_last(feat)
        return y / self.config.img_range + mean  # (B, C, H·s, W·s)
