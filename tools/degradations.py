"""The degradation model of the bundled SR nets: HR photo -> realistic LR input (training and evaluation).

A lighter version of Real-ESRGAN's first-order model, applied to one image x (3, H, W) in [0, 1]
with H and W multiples of the scale s:

    y = quantize(jpeg_q(downscale_s,mode(x ⊛ k) + n))         y: (3, H/s, W/s), on the 8-bit grid

* k: a Gaussian blur kernel, isotropic or anisotropic (σx, σy, rotation θ), applied at HR resolution;
* downscale by s with a random interpolation: bicubic or bilinear (both antialiased) or area;
* n: Gaussian noise N(0, σ²) or Poisson noise (Poisson(255·v)/255 - v, times a strength), either per
  channel (colour) or the same for the three channels (grey);
* jpeg_q: a JPEG round trip with quality q (PIL, in memory).

Each stage is drawn on its own probability, and a fraction ``clean_prob`` of the samples is only
bicubic-downscaled (:func:`bicubic_downscale`), so that a net trained on the model does not over-smooth
clean inputs. All randomness comes from one ``torch.Generator``: the same seed gives the same LR image.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("bicubic", "bilinear", "area")


@dataclass(frozen=True)
class DegradationConfig:
    """Probabilities of each stage and the ranges its strength is drawn from (uniformly).

    Blur σ is in HR pixels, for ×4; at scale s the range is multiplied by (s + 1) / 5 (0.6 at ×2), as
    the blur a camera leaves at the LR resolution does not depend on the SR factor. Noise σ is on the
    [0, 255] scale.

    Lighter than Real-ESRGAN's first order (blur σ ≤ 3, noise σ ≤ 30, Poisson ≤ 3, JPEG ≥ 30). Noise
    starts at a visible level (σ 3, Poisson 0.3), which keeps noisy inputs apart from clean ones (in
    pilots, starting at σ 1 cost the clean held-out photos 0.1 dB more against bicubic); JPEG quality
    starts at 60, as on the web: below it JPEG turns the noise into blotches that no 3×3-conv net of
    this size undoes.
    """

    clean_prob: float = 0.4
    blur_prob: float = 0.6
    anisotropic_prob: float = 0.4
    blur_sigma: Tuple[float, float] = (0.2, 1.6)
    noise_prob: float = 0.8
    poisson_prob: float = 0.4
    grey_noise_prob: float = 0.4
    gaussian_sigma: Tuple[float, float] = (3.0, 25.0)
    poisson_strength: Tuple[float, float] = (0.3, 2.5)
    jpeg_prob: float = 0.7
    jpeg_quality: Tuple[int, int] = (60, 95)


TRAINING = DegradationConfig()
# Every stage on, strengths drawn from the training ranges: the "degraded" setting of the evaluation.
EVALUATION = replace(TRAINING, clean_prob=0.0, blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)


@dataclass(frozen=True)
class Degradation:
    """One draw of the model: None for a stage that is skipped."""

    clean: bool
    blur: Optional[Tuple[float, float, float]]  # (σx, σy, θ)
    resize_mode: str
    noise: Optional[Tuple[str, float, bool]]  # ("gaussian" σ | "poisson" strength, grey)
    jpeg_quality: Optional[int]

    def describe(self) -> str:
        if self.clean:
            return "bicubic only"
        parts = []
        if self.blur is not None:
            sigma_x, sigma_y, theta = self.blur
            parts.append(f"blur σ=({sigma_x:.2f}, {sigma_y:.2f}) θ={math.degrees(theta):.0f}°")
        parts.append(self.resize_mode)
        if self.noise is not None:
            kind, strength, grey = self.noise
            parts.append(f"{'grey ' if grey else ''}{kind} {'σ' if kind == 'gaussian' else 'strength'}={strength:.2f}")
        if self.jpeg_quality is not None:
            parts.append(f"JPEG q={self.jpeg_quality}")
        return ", ".join(parts)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def sample_degradation(generator: torch.Generator, scale: int, config: DegradationConfig = TRAINING) -> Degradation:
    """Draw the parameters of one degradation (always the same number of draws, whatever is skipped)."""
    clean = _chance(generator, config.clean_prob)
    sigma_low, sigma_high = (value * (scale + 1) / 5 for value in config.blur_sigma)
    blur_on = _chance(generator, config.blur_prob)
    anisotropic = _chance(generator, config.anisotropic_prob)
    sigma_x = _uniform(generator, sigma_low, sigma_high)
    sigma_y = _uniform(generator, sigma_low, sigma_high) if anisotropic else sigma_x
    theta = _uniform(generator, -math.pi, math.pi) if anisotropic else 0.0
    resize_mode = RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (), generator=generator))]
    noise_on = _chance(generator, config.noise_prob)
    poisson = _chance(generator, config.poisson_prob)
    grey = _chance(generator, config.grey_noise_prob)
    strength = _uniform(generator, *(config.poisson_strength if poisson else config.gaussian_sigma))
    jpeg_on = _chance(generator, config.jpeg_prob)
    quality = int(torch.randint(config.jpeg_quality[0], config.jpeg_quality[1] + 1, (), generator=generator))
    return Degradation(
        clean=clean,
        blur=(sigma_x, sigma_y, theta) if blur_on else None,
        resize_mode=resize_mode,
        noise=("poisson" if poisson else "gaussian", strength, grey) if noise_on else None,
        jpeg_quality=quality if jpeg_on else None,
    )


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """k(p) ∝ exp(-½ pᵀ Σ⁻¹ p), Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, on a (K, K) grid, K = 2·⌈3·max σ⌉ + 1; Σk = 1."""
    radius = math.ceil(3 * max(sigma_x, sigma_y))
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    covariance = rotation @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rotation.T
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1)  # (K, K, 2) as (x, y)
    exponent = -0.5 * torch.einsum("hwi,ij,hwj->hw", points, torch.linalg.inv(covariance), points)
    kernel = torch.exp(exponent)
    return (kernel / kernel.sum()).float()


def blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """image (3, H, W) ⊛ kernel (K, K), reflect-padded (replicate where the image is smaller than K/2)."""
    radius = kernel.shape[-1] // 2
    mode = "reflect" if radius < min(image.shape[-2:]) else "replicate"
    padded = F.pad(image[None], (radius, radius, radius, radius), mode=mode)  # (1, 3, H + 2r, W + 2r)
    weight = kernel.expand(image.shape[0], 1, *kernel.shape)  # (3, 1, K, K)
    return F.conv2d(padded, weight, groups=image.shape[0])[0]


def downscale(image: torch.Tensor, scale: int, mode: str) -> torch.Tensor:
    """(3, H, W) -> (3, H/s, W/s) with ``mode`` in :data:`RESIZE_MODES` (bicubic and bilinear antialiased)."""
    size = (image.shape[-2] // scale, image.shape[-1] // scale)
    if mode == "area":
        return F.interpolate(image[None], size=size, mode="area")[0]
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=True)[0]


def bicubic_downscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """The clean LR: antialiased bicubic downscaling by s, on the 8-bit grid. (3, H, W) -> (3, H/s, W/s)."""
    return quantize(downscale(image, scale, "bicubic"))


def add_noise(image: torch.Tensor, kind: str, strength: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Gaussian: x + N(0, (σ/255)²). Poisson: x + strength·(Poisson(255·v)/255 - v), v = x (or its luma, grey)."""
    channels = 1 if grey else image.shape[0]
    if kind == "gaussian":
        noise = torch.randn((channels, *image.shape[1:]), generator=generator) * (strength / 255)
    else:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        values = (image * luma).sum(0, keepdim=True) if grey else image
        values = values.clamp(0, 1) * 255
        noise = (torch.poisson(values, generator=generator) - values) / 255 * strength
    return image + noise


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip through PIL (4:2:0 chroma, the encoder's default); (3, H, W) in, on the 8-bit grid out."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid, as a saved image would be."""
    return (image.clamp(0, 1) * 255).round() / 255


def apply_degradation(hr: torch.Tensor, scale: int, degradation: Degradation, generator: torch.Generator) -> torch.Tensor:
    """hr (3, H, W) in [0, 1], H and W multiples of s -> LR (3, H/s, W/s) on the 8-bit grid.

    The generator draws the noise only; the parameters come from ``degradation``.
    """
    if degradation.clean:
        return bicubic_downscale(hr, scale)
    image = hr
    if degradation.blur is not None:
        image = blur(image, gaussian_kernel(*degradation.blur))
    image = downscale(image, scale, degradation.resize_mode)
    if degradation.noise is not None:
        image = add_noise(image, *degradation.noise, generator=generator)
    if degradation.jpeg_quality is not None:
        image = jpeg(image, degradation.jpeg_quality)
    return quantize(image)


def degrade(hr: torch.Tensor, scale: int, generator: torch.Generator, config: DegradationConfig = TRAINING) -> torch.Tensor:
    """Draw a degradation from ``config`` and apply it: hr (3, H, W) -> LR (3, H/s, W/s)."""
    return apply_degradation(hr, scale, sample_degradation(generator, scale, config), generator)
