"""The one-step formulas' constants, computed the way diffusers computes them (fp32).

scaled_linear betas: β = linspace(√0.00085, √0.012, 1000)², ᾱ_t = Π_{s≤t} (1 - β_s). At t = 999:
ᾱ = 0.00466009, √ᾱ = 0.0682649, √(1-ᾱ) = 0.9976672, σ = √((1-ᾱ)/ᾱ) = 14.61466, √(σ²+1) = 14.64883.
"""
from __future__ import annotations

import functools

import torch

TRAIN_STEPS = 1000
LAST_STEP = TRAIN_STEPS - 1


@functools.lru_cache(maxsize=None)
def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = TRAIN_STEPS) -> torch.Tensor:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_bar(t: int = LAST_STEP) -> float:
    return float(alphas_cumprod()[t])


def ddpm_x0_coefficients(t: int = LAST_STEP):
    """(1/√ᾱ, √(1-ᾱ)/√ᾱ): x̂0 = z/√ᾱ - √(1-ᾱ)/√ᾱ · ε."""
    a = alphas_cumprod()[t]
    return float(1.0 / a.sqrt()), float((1.0 - a).sqrt() / a.sqrt())


def x0_from_epsilon(z: torch.Tensor, eps: torch.Tensor, t: int = LAST_STEP) -> torch.Tensor:
    """The DDPM one-step estimate x̂0 = (z - √(1-ᾱ_t)·ε) / √ᾱ_t, in fp32."""
    a = alphas_cumprod()[t]
    return (z.float() - (1.0 - a).sqrt() * eps.float()) / a.sqrt()


def euler_sigma(t: int = LAST_STEP) -> float:
    """σ_t = √((1-ᾱ_t)/ᾱ_t), the Euler (k-diffusion) noise level of timestep t."""
    a = alphas_cumprod()[t]
    return float(((1.0 - a) / a).sqrt())
