"""S3Diff's degradation-guided LoRA modulation: from the degradation scores to one r×r mixing matrix per
image and per block (pipelines.md §2.3).

    p      = 2π · d[..., None] · w                       d: (B, 2) scores, w: (64,) fixed frequencies
    f      = [sin p₀, cos p₀, sin p₁, cos p₁]            (B, 256)
    u      = ReLU(de_mlp(f))                             (B, 256)
    e_k    = ReLU(block_mlp(E[k]))                       (K, 64), E: the block embedding table
    M[b,k] = fuse_mlp([u_b, e_k]).reshape(r, r)          (B, K, r, r)

K = 10 blocks and r = 32 for the UNet, K = 6 and r = 16 for the VAE encoder. A LoRA'd layer in block k
then computes y = W x + s · B (M[b,k]ᵀ (A x)), i.e. W_b = W + s · B · M[b,k]ᵀ · A
(``flashstep.ops.LoRA(mix=M[:, k])``). Parameter names follow the s3diff.pkl entries.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Linear


class _LinearReLU(nn.Module):
    """Linear + ReLU saved as ``0.weight``/``0.bias`` (an nn.Sequential in the reference)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.add_module("0", Linear(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(getattr(self, "0")(x))


class DegradationModulation(nn.Module):
    """One branch (UNet or VAE) of the modulation: ``de_mlp``, ``block_mlp``, ``fuse_mlp``, ``block_embeddings``."""

    def __init__(self, rank: int, num_blocks: int, num_frequencies: int = 64, block_dim: int = 64):
        super().__init__()
        self.rank = rank
        self.de_mlp = _LinearReLU(4 * num_frequencies, 256)
        self.block_mlp = _LinearReLU(block_dim, 64)
        self.fuse_mlp = Linear(256 + 64, rank * rank)
        self.block_embeddings = nn.Embedding(num_blocks, block_dim)

    def forward(self, fourier: torch.Tensor) -> torch.Tensor:
        """fourier (B, 256) -> mixing matrices (B, K, r, r)."""
        u = self.de_mlp(fourier)  # (B, 256)
        e = self.block_mlp(self.block_embeddings.weight)  # (K, 64)
        batch, blocks = u.shape[0], e.shape[0]
        fused = torch.cat([u[:, None, :].expand(batch, blocks, -1), e[None].expand(batch, blocks, -1)], dim=-1)
        return self.fuse_mlp(fused).reshape(batch, blocks, self.rank, self.rank)


class S3DiffModulation(nn.Module):
    """Both branches and the fixed frequencies ``w``: ``forward(scores) -> (unet_mix, vae_mix)``."""

    def __init__(self, unet_rank: int = 32, vae_rank: int = 16, num_frequencies: int = 64):
        super().__init__()
        self.register_buffer("w", torch.zeros(num_frequencies))
        self.unet = DegradationModulation(unet_rank, num_blocks=10, num_frequencies=num_frequencies)
        self.vae = DegradationModulation(vae_rank, num_blocks=6, num_frequencies=num_frequencies)

    def fourier_features(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, 2) -> [sin(2π d₀ w), cos(2π d₀ w), sin(2π d₁ w), cos(2π d₁ w)] (B, 4·64)."""
        projected = scores.float()[..., None] * self.w.float()[None, None, :] * (2 * math.pi)  # (B, 2, 64)
        features = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)  # (B, 2, 128)
        return torch.cat([features[:, 0], features[:, 1]], dim=-1)

    def forward(self, scores: torch.Tensor):
        fourier = self.fourier_features(scores).to(self.unet.fuse_mlp.weight.dtype)
        return self.unet(fourier), self.vae(fourier)


def unet_block_index(module_path: str) -> int:
    """down_blocks.i -> i, mid_block -> 4, up_blocks.i -> 5 + i, anything else (conv_out) -> 9."""
    parts = module_path.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return 9


def vae_block_index(module_path: str) -> int:
    """encoder.down_blocks.i -> i, encoder.mid_block -> 4, anything else (conv_in, conv_out) -> 5."""
    parts = module_path.split(".")
    if len(parts) > 2 and parts[1] == "down_blocks":
        return int(parts[2])
    if len(parts) > 1 and parts[1] == "mid_block":
        return 4
    return 5
