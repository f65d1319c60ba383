"""Generation at s× the size for the cost of one decode: a one-step generator's latent, upscaled in latent
space by the latent upscaler (LUA-style adapter), decoded once at the large size.

    x̂0   = step(n, context)                      (B, 4, H/8, W/8), the generator's denoise stage at H × W
    x̂0_s = LatentUpscaler(x̂0, s)                 (B, 4, s·H/8, s·W/8), in the UNet's scaled space
    image = clamp(D(x̂0_s / scaling), -1, 1) / 2 + 1/2          (B, 3, s·H, s·W)

The graph is the generator's (SD-Turbo, SDXL-Turbo or InstaFlow) with one stage inserted:
prompt -> denoise (-> ``x0_small``) -> upscale_latent (``x0_small``, ``scale`` -> ``x0``) -> decode, so the
runner's casts, CUDA graphs and NaN fallback apply to it as to the others. The adapter runs in the
pipeline's dtype where it supports it (bf16 in place of fp16) and is re-run in fp32 when its output is not
finite. ``pipe(prompt, seed=0, scale=2, height=512, width=512, output_type="pil")``; ``scale`` is one of the
adapter's head scales (default: its smallest).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from ..models.latent_upscaler import LatentUpscaler, load_latent_upscaler
from ..runner import Stage, StageRecord
from .instaflow import InstaFlowPipeline
from .precision import SafeCopy, supported_dtype
from .turbo import SDTurboPipeline, SDXLTurboPipeline, _split

GENERATORS = ("sd-turbo", "sdxl-turbo", "instaflow")
SD15_CONTEXT_DIM = 768  # CLIP ViT-L: SD 1.x, whose architecture InstaFlow keeps (SD 2.x: 1024)


class LatentUpscaleMixin:
    """The latent-upscale stage on top of a generator pipeline class (see the module docstring).

    Comes first in the bases, before the generator class, whose ``__init__`` builds the graph it edits.
    """

    kind = "latent-upscale"
    generator_kind: str  # the generator pipeline's kind, set by each concrete class

    def __init__(self, *generator_args: Any, adapter: LatentUpscaler, **options: Any):
        super().__init__(*generator_args, **options)
        if adapter.config.latent_channels != self.latent_channels:
            raise ValueError(f"the latent upscaler takes {adapter.config.latent_channels}-channel latents, the "
                             f"{self.generator_kind} generator makes {self.latent_channels}-channel ones")
        adapter_dtype = supported_dtype(self.dtype, adapter.supports_fp16, adapter.supports_bf16)
        self.adapter = adapter.to(self.device, adapter_dtype).eval()
        self._safe_adapter = SafeCopy(self.adapter)
        denoise = self.graph["denoise"]
        self.graph.replace("denoise", dataclasses.replace(denoise, outputs=("x0_small",), record=StageRecord()))
        self.graph.inputs = self.graph.inputs + ("scale",)
        self.graph.insert_after("denoise", Stage(
            "upscale_latent", self._upscale_latent, ("x0_small", "scale"), ("x0",), dtype=adapter_dtype,
            safe_fn=self._upscale_latent_safe if adapter_dtype != torch.float32 else None, graphable=True,
        ))

    @property
    def scales(self) -> Sequence[int]:
        return self.adapter.scales

    def _upscale_latent(self, x0_small: torch.Tensor, scale: int) -> torch.Tensor:
        return self.adapter(x0_small, scale)  # (B, 4, s·h, s·w)

    def _upscale_latent_safe(self, x0_small: torch.Tensor, scale: int) -> torch.Tensor:
        return self._safe_adapter.get()(x0_small.float(), scale)

    def __call__(self, prompt: Union[str, Sequence[str]] = "", seed: int = 0, scale: Optional[int] = None,
                 height: int = 512, width: int = 512, prompt_embeds: Optional[Any] = None,
                 output_type: Optional[str] = "pil", **extra: Any) -> Any:
        """Images of (s·height) × (s·width), one per prompt; ``scale`` None: the adapter's smallest; ``extra``:
        the generator's own options (InstaFlow's ``guidance_scale``)."""
        return super().__call__(prompt, seed=seed, height=height, width=width, prompt_embeds=prompt_embeds,
                                output_type=output_type, scale=scale, **extra)

    def _extra_inputs(self, batch: int, height: int, width: int, scale: Optional[int] = None,
                      **extra: Any) -> Dict[str, Any]:
        scale = min(self.scales) if scale is None else scale
        if scale not in self.scales:
            raise ValueError(f"scale={scale!r}: the latent upscaler has heads for {list(self.scales)}")
        values = super()._extra_inputs(batch, height, width, **extra)
        values["scale"] = int(scale)
        return values


class SDTurboLatentUpscalePipeline(LatentUpscaleMixin, SDTurboPipeline):
    generator_kind = "sd-turbo"


class SDXLTurboLatentUpscalePipeline(LatentUpscaleMixin, SDXLTurboPipeline):
    generator_kind = "sdxl-turbo"


class InstaFlowLatentUpscalePipeline(LatentUpscaleMixin, InstaFlowPipeline):
    generator_kind = "instaflow"


def detect_generator(components: Mapping[str, Any]) -> str:
    """The generator kind of loaded components: "sdxl-turbo" when the UNet takes SDXL's text-time
    conditions (or a second text encoder is present), "instaflow" for the SD 1.x architecture (768-wide
    context), "sd-turbo" otherwise (SD 2.x)."""
    unet_config = components["unet"].config
    if "text_encoder_2" in components or unet_config.addition_embed_type == "text_time":
        return "sdxl-turbo"
    if unet_config.cross_attention_dim == SD15_CONTEXT_DIM:
        return "instaflow"
    return "sd-turbo"


def build_latent_upscale(base, adapter: Union[str, os.PathLike, LatentUpscaler], generator: Optional[str] = None,
                         **options: Any) -> LatentUpscaleMixin:
    """The latent-upscale pipeline of ``base`` (the generator's weights: a diffusers folder or single file)
    and ``adapter`` (a latent upscaler file, see :func:`flashstep.models.latent_upscaler.load_latent_upscaler`,
    or a model). ``generator``: "sd-turbo", "sdxl-turbo" or "instaflow"; detected from the base when None.
    ``options``: device, dtype, max_memory, progress, cuda_graphs."""
    from ..loaders import load_components
    from ..models.clip import SDXLTextEncoders

    if generator is not None and generator not in GENERATORS:
        raise ValueError(f"generator={generator!r}; valid: {', '.join(GENERATORS)} (or None to detect it)")
    options = _split(options)
    model = adapter if isinstance(adapter, LatentUpscaler) else load_latent_upscaler(adapter)
    components = load_components(base)
    kind = generator or detect_generator(components)
    unet, vae = components["unet"], components["vae"]
    if kind == "sdxl-turbo":
        encoders = SDXLTextEncoders(components["text_encoder"], components["text_encoder_2"],
                                    components["tokenizer"], components["tokenizer_2"])
        return SDXLTurboLatentUpscalePipeline(unet, vae, encoders, adapter=model, **options)
    cls = SDTurboLatentUpscalePipeline if kind == "sd-turbo" else InstaFlowLatentUpscalePipeline
    return cls(unet, vae, components.get("text_encoder"), components.get("tokenizer"), adapter=model, **options)
