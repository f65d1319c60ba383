"""What the one-step generators (SD-Turbo, SDXL-Turbo, InstaFlow) share.

    n     ~ N(0, I)  (B, 4, H/8, W/8), drawn on the CPU from ``seed`` so results do not depend on the device
    x̂0    = step(n, context)                    the model's one step (subclasses)
    image = clamp(D(x̂0 / scaling), -1, 1) / 2 + 1/2

Stages: prompt -> denoise -> decode (NaN-checked, re-run in float32). ``pipe(prompt, seed=0, height=512,
width=512, output_type="pil")`` returns a list of images (one per prompt).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..runner import Stage
from .base import Pipeline
from .images import ImageInfo, from_tensor
from .precision import SafeCopy
from .vae_runner import SafeVAERunner, VAERunner

LATENT_FACTOR = 8


class GeneratorPipeline(Pipeline):
    """See the module docstring. Subclasses implement :meth:`_denoise` (and may extend the prompt stage)."""

    latent_channels = 4
    prompt_outputs = ("context",)
    denoise_extra_inputs: tuple = ()

    def __init__(self, unet, vae, text_encoder=None, tokenizer=None, **options):
        super().__init__(**options)
        self.unet = unet.to(self.device, self.dtype).eval()
        vae_dtype = torch.float32 if getattr(vae, "force_upcast", False) else self.dtype
        self.vae = vae.to(self.device, vae_dtype).eval()
        self.text_encoder = None if text_encoder is None else text_encoder.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.scaling_factor = float(vae.scaling_factor)
        self._safe_vae = SafeCopy(self.vae)
        self.vae_runner = VAERunner(self.vae, self.runner.memory, self.runner.progress)
        self._safe_vae_runner = SafeVAERunner(self._safe_vae, self.runner.memory, self.runner.progress)
        self._prompt_cache: Dict[str, Any] = {}
        self.graph.inputs = ("prompts", "noise")
        self.graph.append(Stage("prompt", self._encode_prompt, ("prompts",), self.prompt_outputs))
        self.graph.append(Stage("denoise", self._denoise, ("noise",) + self.prompt_outputs + self.denoise_extra_inputs,
                                ("x0",), dtype=self.dtype, graphable=True))
        self.graph.append(Stage("decode", self._decode, ("x0",), ("image",), dtype=vae_dtype,
                                safe_fn=self._decode_safe if vae_dtype != torch.float32 else None))

    def _encode_prompt(self, prompts: List[str]):
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{self.kind}: no text encoder was loaded; pass prompt_embeds or load a folder with "
                             "text_encoder/ and tokenizer/")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            hidden = self.text_encoder(self.tokenizer(missing).to(self.device))
            for prompt, embedding in zip(missing, hidden):
                self._prompt_cache[prompt] = embedding
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _denoise(self, noise: torch.Tensor, context: torch.Tensor, **conditions) -> torch.Tensor:
        raise NotImplementedError

    def _decode_with(self, vae_runner: VAERunner, x0: torch.Tensor) -> torch.Tensor:
        decoded = vae_runner.decode(x0.to(next(vae_runner.vae.parameters()).dtype) / self.scaling_factor)
        return decoded.float().clamp(-1, 1) * 0.5 + 0.5

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self._decode_with(self.vae_runner, x0)

    def _decode_safe(self, x0: torch.Tensor) -> torch.Tensor:
        return self._decode_with(self._safe_vae_runner.get(True), x0.float())

    def noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        if height % LATENT_FACTOR or width % LATENT_FACTOR or height < 64 or width < 64:
            raise ValueError(f"height and width must be multiples of 8 and at least 64, got {height}×{width}")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (batch, self.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def __call__(self, prompt: Union[str, Sequence[str]] = "", seed: int = 0, height: int = 512, width: int = 512,
                 prompt_embeds: Optional[Any] = None, output_type: Optional[str] = "pil", **extra) -> Any:
        """One image per prompt, or per row of ``prompt_embeds`` (see :meth:`_given_embeddings`), which then
        replace the prompts and skip the text encoder."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        given = {} if prompt_embeds is None else self._given_embeddings(prompt_embeds)
        batch = len(prompts) if not given else given["context"].shape[0]
        with self._lock:
            values = {"prompts": prompts if not given else [""] * batch,
                      "noise": self.noise(batch, int(height), int(width), seed)}
            values.update(self._extra_inputs(batch, int(height), int(width), **extra))
            values.update(given)
            images = self._run(values)
        kind = "torch" if output_type in (None, "torch") else output_type
        info = ImageInfo(kind)
        return [from_tensor(image, info, output_type) for image in images]

    def _given_embeddings(self, prompt_embeds: Any) -> Dict[str, Any]:
        """The prompt stage's outputs from ``prompt_embeds``: the context (B, 77, D) (or (77, D) for one image),
        or a tuple with one tensor per output of the prompt stage (SDXL-Turbo: (context, pooled))."""
        given = tuple(prompt_embeds) if isinstance(prompt_embeds, (tuple, list)) else (prompt_embeds,)
        if len(given) != len(self.prompt_outputs):
            raise ValueError(f"{self.kind}: prompt_embeds must give {', '.join(self.prompt_outputs)} (a tuple of "
                             f"{len(self.prompt_outputs)} tensors), got {len(given)}")
        values = {name: None if t is None else t.to(self.device) for name, t in zip(self.prompt_outputs, given)}
        if values["context"].dim() == 2:
            values["context"] = values["context"][None]
        return values

    def _extra_inputs(self, batch: int, height: int, width: int, **extra) -> Dict[str, Any]:
        if extra:
            raise ValueError(f"unknown argument(s) {sorted(extra)} for {self.kind}")
        return {}

