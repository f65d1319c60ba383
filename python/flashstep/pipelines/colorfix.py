"""Colour correction of a restored image against its low-quality source, on tensors.

Both operate per image and per channel on (B, 3, H, W) tensors in [0, 1] and return [0, 1].

AdaIN (OSEDiff's default): ``y = (x - μ_x) / σ_x · σ_s + μ_s`` with σ = sqrt(unbiased var + 1e-5) over H·W.

Wavelet (S3Diff's default): split each image into high frequencies and a low-frequency residual with five
levels of a dilated 3×3 binomial blur (kernel [[1,2,1],[2,4,2],[1,2,1]]/16, dilation r = 1, 2, 4, 8, 16,
replicate padding r): ``high = Σ_r (img_r - blur_r(img_r))``, ``low = img_5``. The output is
``high(content) + low(style)``: detail from the restoration, colour from the source.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet", "none")


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    content_f, style_f = content.float(), style.float()
    c_mean = content_f.mean(dim=(2, 3), keepdim=True)
    c_std = (content_f.var(dim=(2, 3), keepdim=True, unbiased=True) + eps).sqrt()
    s_mean = style_f.mean(dim=(2, 3), keepdim=True)
    s_std = (style_f.var(dim=(2, 3), keepdim=True, unbiased=True) + eps).sqrt()
    return ((content_f - c_mean) / c_std * s_std + s_mean).clamp(0, 1).to(content.dtype)


def _binomial_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device) / 16
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5):
    """(high, low): high = Σ of the detail at every level, low = the last blur."""
    high = torch.zeros_like(image)
    for level in range(levels):
        blurred = _binomial_blur(image, 2**level)
        high = high + (image - blurred)
        image = blurred
    return high, image


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    content_high, _ = wavelet_decomposition(content.float())
    _, style_low = wavelet_decomposition(style.float())
    return (content_high + style_low).clamp(0, 1).to(content.dtype)


def color_fix(content: torch.Tensor, style: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` ("adain", "wavelet" or "none"); style is resized to content's size if needed."""
    if method not in METHODS:
        raise ValueError(f"unknown colour fix {method!r}; valid: {', '.join(METHODS)}")
    if method == "none":
        return content
    if style.shape[-2:] != content.shape[-2:]:
        style = F.interpolate(style.float(), size=content.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    fix = adain_color_fix if method == "adain" else wavelet_color_fix
    return fix(content, style)
