"""What the one-step diffusion SR pipelines (OSEDiff, S3Diff) share.

    lq_up  = upsample(lq, scale)                           (B, 3, H, W) in [0, 1]; bicubic (OSEDiff) or bilinear (S3Diff)
    x      = pad(2·lq_up - 1)                              reflect-padded to a multiple of 64 (latent multiple of 8)
    z      = scaling · E(x)                                the posterior mean, or a seeded sample mean + σ·n
    x̂0     = denoise(z, context)                           the paper's one step (subclasses)
    y      = crop(clamp(D(x̂0 / scaling), -1, 1)) / 2 + 1/2
    image  = colour_fix(y, lq_up)                          AdaIN or wavelet

Stages: upsample -> prompt -> encode -> denoise (latent tiles) -> decode (NaN-checked) -> color_fix. When
the latent is larger than ``tile`` or the memory budget allows, the denoise stage streams the UNet layer by
layer with whole-latent statistics and attention (``latent_tiling="exact"``, the default: equal to the
untiled result up to rounding) or blends Gaussian-weighted latent tiles as the reference does
(``"gaussian"``), see :mod:`flashstep.pipelines.latent_tiling`. The VAE stages run whole when they fit the
budget and otherwise streamed tile by tile with whole-image GroupNorm statistics (exact: no seam, no
brightness step). ``tile=0`` never tiles.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..runner import Stage
from .base import ImagePipeline, RunOptions
from .colorfix import METHODS as COLOR_FIX_METHODS
from .colorfix import color_fix as apply_color_fix
from .latent_tiling import LatentTiling
from .precision import SafeCopy
from .vae_runner import SafeVAERunner, VAERunner

PAD_MULTIPLE = 64


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Reflect-pad the bottom/right of x (B, C, H, W) to multiples; returns (padded, (H, W))."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (height, width)


class DiffusionSRPipeline(ImagePipeline):
    """See the module docstring. Subclasses set ``upsample_mode``, ``default_scale``,
    ``default_color_fix`` and implement :meth:`_denoise`."""

    upsample_mode = "bicubic"
    upsample_align_corners = False
    default_scale = 4.0
    default_color_fix = "adain"

    # UNet samples per latent (S3Diff runs both guidance branches in one call)
    unet_batch = 1

    def __init__(self, unet, vae, text_encoder=None, tokenizer=None, *, sample_posterior: bool = False,
                 latent_tiling: str = "exact", **options):
        super().__init__(**options)
        self.unet = unet.to(self.device, self.dtype).eval()
        self.vae = vae.to(self.device, self.dtype).eval()
        self.text_encoder = None if text_encoder is None else text_encoder.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.sample_posterior = sample_posterior
        self.scaling_factor = float(vae.scaling_factor)
        self._safe_vae = SafeCopy(self.vae)
        self.vae_runner = VAERunner(self.vae, self.runner.memory, self.runner.progress)
        self._safe_vae_runner = SafeVAERunner(self._safe_vae, self.runner.memory, self.runner.progress)
        self._prompt_cache: Dict[str, torch.Tensor] = {}
        self.latent_tiler = LatentTiling(self.unet, self.runner.memory, latent_tiling, self.runner.progress,
                                         unet_batch=self.unet_batch)
        self.graph.inputs = ("lq", "scale", "prompts", "seed", "color_fix")
        for stage in self._stages():
            self.graph.append(stage)

    def _stages(self) -> List[Stage]:
        return [
            Stage("upsample", self._upsample, ("lq", "scale"), ("lq_up", "x", "size")),
            Stage("prompt", self._encode_prompt, ("prompts",), ("context",)),
            Stage("encode", self._encode, ("x", "seed"), ("latent",), dtype=self.dtype),
            Stage("denoise", self._denoise, ("latent", "context"), ("x0",), dtype=self.dtype, tiler=self.latent_tiler,
                  graphable=True),
            Stage("decode", self._decode, ("x0", "size"), ("restored",), dtype=self.dtype,
                  safe_fn=self._decode_safe if self.dtype != torch.float32 else None),
            Stage("color_fix", self._color_fix, ("restored", "lq_up", "color_fix"), ("image",)),
        ]

    # -- stages ----------------------------------------------------------------------------------------
    def _upsample(self, lq: torch.Tensor, scale: float):
        height, width = lq.shape[-2:]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        lq_up = F.interpolate(lq.float(), size=size, mode=self.upsample_mode,
                              align_corners=self.upsample_align_corners).clamp(0, 1)
        x, size = pad_to_multiple(lq_up * 2 - 1, PAD_MULTIPLE)
        return lq_up, x, size

    def _encode_prompt(self, prompts: List[str]) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{self.kind}: no text encoder was loaded; pass prompt_embeds or load a base model "
                             "folder that holds text_encoder/ and tokenizer/")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            with torch.inference_mode():
                hidden = self.text_encoder(tokens)
            for prompt, embedding in zip(missing, hidden):
                self._prompt_cache[prompt] = embedding
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        mean, logvar = self.vae_runner.encode(x)
        if self.sample_posterior:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scaling_factor

    def _denoise(self, latent: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_with(self, vae_runner: VAERunner, x0: torch.Tensor, size) -> torch.Tensor:
        decoded = vae_runner.decode(x0.to(next(vae_runner.vae.parameters()).dtype) / self.scaling_factor)
        image = decoded.float().clamp(-1, 1) * 0.5 + 0.5
        return image[..., : size[0], : size[1]]

    def _decode(self, x0: torch.Tensor, size) -> torch.Tensor:
        return self._decode_with(self.vae_runner, x0, size)

    def _decode_safe(self, x0: torch.Tensor, size) -> torch.Tensor:
        return self._decode_with(self._safe_vae_runner.get(self.vae_runner.allow_tiling), x0.float(), size)

    def _color_fix(self, restored: torch.Tensor, lq_up: torch.Tensor, color_fix: str) -> torch.Tensor:
        return apply_color_fix(restored.float(), lq_up.float(), color_fix)

    # -- calls -----------------------------------------------------------------------------------------
    def upscale_tensor(self, lq: torch.Tensor, prompts: Optional[List[str]], prompt_embeds: Optional[torch.Tensor],
                       options: RunOptions) -> torch.Tensor:
        method = options.color_fix or self.default_color_fix
        if method not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix={method!r}; valid: {', '.join(COLOR_FIX_METHODS)}")
        self.vae_runner.allow_tiling = options.tile != 0
        self.latent_tiler.tile = options.tile
        values = {
            "lq": lq,
            "scale": options.scale if options.scale is not None else self.default_scale,
            "prompts": prompts if prompts is not None else [""] * lq.shape[0],
            "seed": options.seed,
            "color_fix": method,
        }
        if prompt_embeds is not None:
            values["context"] = prompt_embeds.to(self.device)
        return self._run(values)
