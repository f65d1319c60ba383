"""InstaFlow (gnobitab/InstaFlow): a one-step rectified flow distilled from SD 1.5.

    n ~ N(0, I);   v = UNet(n, t = 1000, c);   z = n + v;   image = D(z / 0.18215)

With ``guidance_scale`` > 1 the velocity is guided against the empty prompt:
v = v("") + g·(v(c) - v("")), both branches in one batched UNet call.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .generator import GeneratorPipeline

FLOW_TIME = 1000.0


class InstaFlowPipeline(GeneratorPipeline):
    kind = "instaflow"
    prompt_outputs = ("context", "empty_context")
    denoise_extra_inputs = ("guidance",)

    def _encode_prompt(self, prompts):
        """(the prompts' embeddings, the empty prompt's embedding for guidance)."""
        return super()._encode_prompt(prompts), super()._encode_prompt([""])

    def _given_embeddings(self, prompt_embeds: Any) -> Dict[str, Any]:
        """The context alone (no guidance), or (context, the empty prompt's embedding)."""
        if isinstance(prompt_embeds, torch.Tensor):
            prompt_embeds = (prompt_embeds, None)
        return super()._given_embeddings(prompt_embeds)

    def _denoise(self, noise: torch.Tensor, context: torch.Tensor, empty_context: Optional[torch.Tensor],
                 guidance: float) -> torch.Tensor:
        scale = float(guidance)
        batch = noise.shape[0]
        if scale > 1.0 and empty_context is None:
            raise ValueError("guidance_scale > 1 needs the empty prompt's embedding too: pass "
                             "prompt_embeds=(context, empty_context)")
        if scale > 1.0:
            unconditional = empty_context.to(context).expand(batch, -1, -1)
            timestep = torch.full((2 * batch,), FLOW_TIME, device=noise.device)
            velocity = self.unet(torch.cat([noise, noise]), timestep, torch.cat([unconditional, context]))
            v_uncond, v_text = velocity.float().chunk(2)
            v = v_uncond + scale * (v_text - v_uncond)
        else:
            v = self.unet(noise, torch.full((batch,), FLOW_TIME, device=noise.device), context).float()
        return (noise.float() + v).to(noise.dtype)

    def _extra_inputs(self, batch: int, height: int, width: int, guidance_scale: float = 1.0) -> Dict[str, Any]:
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} must be >= 1 (1 disables guidance)")
        return {"guidance": float(guidance_scale)}


def build_instaflow(base, **options) -> InstaFlowPipeline:
    from ..loaders import load_components
    from .turbo import _split

    components = load_components(base)
    return InstaFlowPipeline(components["unet"], components["vae"], components.get("text_encoder"),
                             components.get("tokenizer"), **_split(options))
