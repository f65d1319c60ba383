"""S3Diff (ArcticHare105/S3Diff): SD-Turbo with a degradation-guided LoRA, one step, guidance 1.07.

    d       = DEResNet(lq)                                  (B, 2) blur and noise degrees of the LR input
    M_unet, M_vae = modulation(d)                           (B, 10, 32, 32), (B, 6, 16, 16) mixing matrices
    z       = 0.18215 · E_LoRA(M_vae)(pad(2·bilinear(lq) - 1))
    ε±      = UNet_LoRA(M_unet)([z, z], 999, [c₊, c₋])     both branches in ONE batched UNet call
    ε       = ε₋ + 1.07 · (ε₊ - ε₋)
    x̂0      = (z - √(1-ᾱ)·ε) / √ᾱ;   y = D(x̂0 / 0.18215), wavelet colour fix against bilinear(lq)

The LoRA is applied per image through ``flashstep.ops.conv2d``/``linear`` with the image's mixing matrix
(``scale · B · Mᵀ · A``), never as a rebuilt copy of the weights. Bilinear upsampling uses
align_corners=True as the reference inference script does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..models.layers import LoRAHost
from ..models.s3diff_modulation import unet_block_index, vae_block_index
from ..runner import Stage
from .diffusion_sr import DiffusionSRPipeline
from .schedules import LAST_STEP, x0_from_epsilon

POSITIVE_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                   "and natural lighting.")
NEGATIVE_PROMPT = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, "
                   "oversmooth")
GUIDANCE_SCALE = 1.07


def modulated_layers(model: torch.nn.Module, block_index, prefix: str = "") -> List[Tuple[LoRAHost, int]]:
    """(layer, block index) for every layer of ``model`` that carries an unmerged LoRA."""
    return [(module, block_index(prefix + name)) for name, module in model.named_modules()
            if isinstance(module, LoRAHost) and module.lora is not None]


def set_mixes(layers: Sequence[Tuple[LoRAHost, int]], mix: Optional[torch.Tensor]) -> None:
    """Give each layer its block's (Batch, r, r) mixing matrices (None clears them)."""
    for layer, block in layers:
        layer.lora_mix = None if mix is None else mix[:, block]


class S3DiffPipeline(DiffusionSRPipeline):
    kind = "s3diff"
    upsample_mode = "bilinear"
    upsample_align_corners = True
    default_scale = 4.0
    default_color_fix = "wavelet"
    unet_batch = 2

    def __init__(self, unet, vae, text_encoder, tokenizer, de_net, modulation, *, guidance_scale: float = GUIDANCE_SCALE,
                 negative_prompt: str = NEGATIVE_PROMPT, **options):
        self.de_net_module, self.modulation_module = de_net, modulation
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        super().__init__(unet, vae, text_encoder, tokenizer, **options)
        self.de_net = de_net.to(self.device, self.dtype).eval()
        self.modulation = modulation.to(self.device, torch.float32).eval()
        self.unet_layers = modulated_layers(self.unet, unet_block_index)
        self.vae_layers = modulated_layers(self.vae.encoder, vae_block_index, prefix="encoder.")
        if not self.unet_layers:
            raise ValueError("s3diff: the UNet carries no per-image LoRA; load it with the s3diff.pkl adapter")

    def _stages(self) -> List[Stage]:
        stages = super()._stages()
        stages.insert(1, Stage("degradation", self._degradation, ("lq",), ("unet_mix", "vae_mix"), dtype=self.dtype))
        for stage in stages:
            if stage.name == "prompt":
                stage.outputs = ("context", "negative_context")
            elif stage.name == "encode":
                stage.inputs = ("x", "seed", "vae_mix")
            elif stage.name == "denoise":
                stage.inputs = ("latent", "context", "negative_context", "unet_mix")
        return stages

    def _degradation(self, lq: torch.Tensor):
        scores = self.de_net(lq).float()
        unet_mix, vae_mix = self.modulation(scores)
        return unet_mix.to(self.dtype), vae_mix.to(self.dtype)

    def _encode_prompt(self, prompts: List[str]):
        positive = [p if p else POSITIVE_PROMPT for p in prompts]
        context = super()._encode_prompt(positive)
        negative = super()._encode_prompt([self.negative_prompt] * len(prompts))
        return context, negative

    def _encode(self, x: torch.Tensor, seed: int, vae_mix: torch.Tensor) -> torch.Tensor:
        set_mixes(self.vae_layers, vae_mix)
        try:
            return super()._encode(x, seed)
        finally:
            set_mixes(self.vae_layers, None)

    def _denoise(self, latent: torch.Tensor, context: torch.Tensor, negative_context: torch.Tensor,
                 unet_mix: torch.Tensor) -> torch.Tensor:
        set_mixes(self.unet_layers, torch.cat([unet_mix, unet_mix]))
        try:
            batch = latent.shape[0]
            timestep = torch.full((2 * batch,), LAST_STEP, device=latent.device, dtype=torch.long)
            eps = self.latent_tiler.unet(torch.cat([latent, latent]), timestep, torch.cat([context, negative_context]))
        finally:
            set_mixes(self.unet_layers, None)
        eps_positive, eps_negative = eps.float().chunk(2)
        eps = eps_negative + self.guidance_scale * (eps_positive - eps_negative)
        return x0_from_epsilon(latent, eps).to(latent.dtype)


def build_s3diff(base, lora, de_net, **options) -> S3DiffPipeline:
    """S3Diff from an SD-Turbo folder/file, s3diff.pkl and de_net.pth."""
    from ..loaders import LoaderError, S3DiffAdapter, load_components, load_lora, read_state_dict
    from ..models.de_net import DEResNet
    from ..models.s3diff_modulation import S3DiffModulation

    pipeline_options = {k: options.pop(k) for k in list(options) if k in ("device", "dtype", "max_memory", "progress", "cuda_graphs", "latent_tiling")}
    if options:
        raise ValueError(f"unknown option(s) for s3diff: {sorted(options)}")
    components = load_components(base)
    adapter = load_lora(lora)
    if not isinstance(adapter, S3DiffAdapter):
        raise LoaderError(f"{lora}: is not an s3diff.pkl adapter (found {type(adapter).__name__})")
    adapter.apply(unet=components["unet"], vae=components["vae"])
    modulation = S3DiffModulation(unet_rank=adapter.rank_unet, vae_rank=adapter.rank_vae)
    modulation.load_state_dict(adapter.modulation_state_dict(), strict=True)
    estimator = DEResNet()
    state_dict = read_state_dict(str(de_net))
    missing = sorted(set(estimator.state_dict()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(estimator.state_dict()))
    if missing or unexpected:
        raise LoaderError(f"{de_net}: is not S3Diff's de_net.pth: missing {missing[:3]}, unexpected {unexpected[:3]}")
    estimator.load_state_dict(state_dict, strict=True)
    return S3DiffPipeline(components["unet"], components["vae"], components.get("text_encoder"),
                          components.get("tokenizer"), estimator, modulation, **pipeline_options)
