"""Reference models with random weights in small configs (diffusers / transformers), and comparisons.

Widths are multiples of 64 and GroupNorm has 32 groups, like the real models, so the configs the loader
infers from keys and shapes (heads of dim 64, or 8 heads for a 768-wide context) are the ones built here.
"""
from __future__ import annotations

import torch


def small_unet(kind: str):
    """diffusers UNet2DConditionModel: "sd1" (768 context, 8 heads, 1×1-conv projections), "sd2" (heads of
    dim 64, linear projections) or "sdxl" (text_time embedding, two transformer layers at level 1)."""
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=32, sample_size=8)
    if kind == "sd1":
        config = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                      attention_head_dim=8, use_linear_projection=False)
    elif kind == "sd2":
        config = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=96,
                      attention_head_dim=(1, 2), use_linear_projection=True)
    elif kind == "sdxl":
        config = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=160,
                      attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=128 + 6 * 256)
    else:
        raise ValueError(kind)
    torch.manual_seed(1)
    return UNet2DConditionModel(**common, **config).eval()


def small_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(64, 128), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=4,
                         norm_num_groups=32).eval()


def small_clip(hidden: int = 64, layers: int = 2, act: str = "quick_gelu", projection: bool = False, seed: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 64,
                            num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=77, hidden_act=act,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def clip_state(model) -> dict:
    """A transformers CLIP text model's state dict named as the released checkpoints name it
    (``text_model.`` first; transformers >= 5 drops that level for CLIPTextModel)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in model.state_dict().items()}


def unet_inputs(unet, batch: int = 1):
    torch.manual_seed(5)
    sample = torch.randn(batch, 4, 8, 8)
    context = torch.randn(batch, 5, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(batch, 128), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch)}
    return sample, context, extra


@torch.no_grad()
def unet_reference(unet, sample, context, extra):
    added = {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]} if extra else None
    return unet(sample, 999, encoder_hidden_states=context, added_cond_kwargs=added).sample


@torch.no_grad()
def unet_ours(model, sample, context, extra):
    return model(sample, 999, context, **extra)


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, label: str = "output") -> None:
    """fp32 parity: max |ours - reference| <= 1e-4 × the reference's range."""
    from flashstep.testing import assert_close

    span = (reference.max() - reference.min()).item()
    assert_close(ours.float(), reference.float(), atol=1e-4 * max(span, 1e-6), rtol=0, label=label)


def assert_same_weights(model: torch.nn.Module, expected: dict) -> None:
    """Every tensor of the model's state dict equals the expected one of the same name."""
    ours = model.state_dict()
    assert set(ours) == set(expected), sorted(set(ours) ^ set(expected))[:5]
    for key, value in expected.items():
        assert torch.equal(ours[key].float(), value.float()), key
