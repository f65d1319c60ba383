"""OSEDiff (cswry/OSEDiff): SD 2.1-base with a rank-4 LoRA on the UNet and the VAE encoder, one step.

    z  = 0.18215 · E_LoRA(2·bicubic(lq) - 1)            posterior mean (default) or a seeded sample
    ε  = UNet_LoRA(z, t = 999, c)                        c: CLIP (OpenCLIP-H) embedding of the prompt, "" by default
    x̂0 = (z - √(1-ᾱ₉₉₉)·ε) / √ᾱ₉₉₉ = 14.64882·z - 14.61465·ε
    y  = D(x̂0 / 0.18215), then AdaIN colour fix against the bicubic upsample

The LoRA (scale 8/4 = 2) is merged into the weights at load, and the fine-tuned ``conv_in`` replaces the
base one (pipelines.md §1.4), so the UNet runs at the plain model's cost.
"""
from __future__ import annotations

import torch

from .diffusion_sr import DiffusionSRPipeline
from .schedules import LAST_STEP, x0_from_epsilon


class OSEDiffPipeline(DiffusionSRPipeline):
    kind = "osediff"
    upsample_mode = "bicubic"
    default_scale = 4.0
    default_color_fix = "adain"

    def _denoise(self, latent: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        timestep = torch.full((latent.shape[0],), LAST_STEP, device=latent.device, dtype=torch.long)
        eps = self.latent_tiler.unet(latent, timestep, context)
        return x0_from_epsilon(latent, eps).to(latent.dtype)


def build_osediff(base, lora, **options) -> OSEDiffPipeline:
    """OSEDiff from an SD 2.1-base folder/file and the osediff.pkl adapter."""
    from ..loaders import LoaderError, OSEDiffAdapter, load_components, load_lora

    pipeline_options = {k: options.pop(k) for k in list(options) if k in ("device", "dtype", "max_memory", "progress", "cuda_graphs", "latent_tiling")}
    sample_posterior = bool(options.pop("sample_posterior", False))
    if options:
        raise ValueError(f"unknown option(s) for osediff: {sorted(options)}")
    components = load_components(base)
    adapter = load_lora(lora)
    if not isinstance(adapter, OSEDiffAdapter):
        raise LoaderError(f"{lora}: is not an osediff.pkl adapter (found {type(adapter).__name__})")
    adapter.apply(unet=components["unet"], vae=components["vae"])
    return OSEDiffPipeline(components["unet"], components["vae"], components.get("text_encoder"),
                           components.get("tokenizer"), sample_posterior=sample_posterior, **pipeline_options)
