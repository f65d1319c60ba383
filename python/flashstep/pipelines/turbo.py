"""SD-Turbo and SDXL-Turbo, one Euler step from pure noise (diffusers' EulerDiscreteScheduler, "trailing"
spacing, one step: t = 999).

    x  = σ·n,  σ = √((1-ᾱ₉₉₉)/ᾱ₉₉₉) = 14.61465       (init_noise_sigma is σ for trailing spacing)
    ε  = UNet(x / √(σ²+1), t = 999, c)               = UNet(0.9976672·n, ...)
    x̂0 = x - σ·ε                                      Euler to σ = 0 (EulerAncestral gives the same at the last step)

SDXL-Turbo adds the pooled text embedding (1280) and the time ids [H, W, 0, 0, H, W] (original size, crop
top-left, target size) as the UNet's added conditions; its VAE (scaling 0.13025) runs in float32.
"""
from __future__ import annotations

from typing import List

import torch

from .generator import GeneratorPipeline
from .schedules import LAST_STEP, euler_sigma


class SDTurboPipeline(GeneratorPipeline):
    kind = "sd-turbo"

    def _denoise(self, noise: torch.Tensor, context: torch.Tensor, **conditions) -> torch.Tensor:
        sigma = euler_sigma(LAST_STEP)
        x = noise.float() * sigma
        timestep = torch.full((noise.shape[0],), float(LAST_STEP), device=noise.device)
        eps = self.unet((x / (sigma**2 + 1) ** 0.5).to(noise.dtype), timestep, context, **conditions)
        return (x - sigma * eps.float()).to(noise.dtype)


class SDXLTurboPipeline(SDTurboPipeline):
    """SDXL-Turbo: two text encoders (penultimate states concatenated to 2048, pooled 1280) and time ids."""

    kind = "sdxl-turbo"
    prompt_outputs = ("context", "pooled")

    def __init__(self, unet, vae, text_encoders, **options):
        super().__init__(unet, vae, text_encoders, tokenizer=text_encoders, **options)

    def _encode_prompt(self, prompts: List[str]):
        """(context (B, 77, 2048), pooled (B, 1280)) from the two encoders."""
        context, pooled = self.text_encoder.encode_prompt(prompts)
        return context, pooled

    def _denoise(self, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        height, width = noise.shape[-2] * 8, noise.shape[-1] * 8
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=noise.dtype, device=noise.device)
        return super()._denoise(noise, context, text_embeds=pooled, time_ids=time_ids.expand(noise.shape[0], -1))


def _split(options: dict) -> dict:
    allowed = ("device", "dtype", "max_memory", "progress", "cuda_graphs")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {', '.join(allowed)}")
    return options


def build_sd_turbo(base, **options) -> SDTurboPipeline:
    from ..loaders import load_components

    components = load_components(base)
    return SDTurboPipeline(components["unet"], components["vae"], components.get("text_encoder"),
                           components.get("tokenizer"), **_split(options))


def build_sdxl_turbo(base, **options) -> SDXLTurboPipeline:
    from ..loaders import load_components
    from ..models.clip import SDXLTextEncoders

    components = load_components(base)
    encoders = SDXLTextEncoders(components["text_encoder"], components["text_encoder_2"],
                                components["tokenizer"], components["tokenizer_2"])
    return SDXLTurboPipeline(components["unet"], components["vae"], encoders, **_split(options))
