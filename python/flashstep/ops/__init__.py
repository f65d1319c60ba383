"""The public fused ops. Each has a torch reference and faster backends; see :mod:`flashstep.registry`.

=======================  ================================================================
op                       what it computes
=======================  ================================================================
attention                softmax(scale·q·kᵀ)·v, flash-style, head dims 32..512
group_norm               GroupNorm (+SiLU) (+residual), NCHW and channels_last
conv2d                   convolution + static or per-sample LoRA
linear                   linear layer + static or per-sample LoRA
geglu                    GEGLU projection with the gate fused
pixel_shuffle            (B, C·r², H, W) -> (B, C, H·r, W·r)
pixel_unshuffle          the inverse
conv2d_pixel_shuffle     the upscaling head's conv written straight into the shuffled layout
=======================  ================================================================
"""
from .attention import attention
from .conv2d import conv2d
from .geglu import geglu
from .group_norm import combine_moments, group_norm, group_norm_moments, stats_from_moments
from .linear import linear
from .lora import LoRA, lora_delta, merge_lora
from .pixel_shuffle import conv2d_pixel_shuffle, pixel_shuffle, pixel_unshuffle

OP_NAMES = (
    "attention",
    "group_norm",
    "conv2d",
    "linear",
    "geglu",
    "pixel_shuffle",
    "pixel_unshuffle",
    "conv2d_pixel_shuffle",
)

__all__ = list(OP_NAMES) + [
    "LoRA",
    "merge_lora",
    "lora_delta",
    "group_norm_moments",
    "combine_moments",
    "stats_from_moments",
]
