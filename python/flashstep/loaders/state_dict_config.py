"""Which SD component a diffusers-named state dict is, and its config, from its keys and shapes alone.

Used for single-file checkpoints (after :mod:`.single_file` renamed them) and bare component files
that come without a ``config.json``. The rules:

* UNet: levels and widths from ``down_blocks.i.resnets.0.conv1`` (Cout), ``layers_per_block`` from the
  resnets of level 0, cross-attention where a level has ``attentions``, its depth from the
  ``transformer_blocks`` count, the context width from ``attn2.to_k`` (Cin), linear vs 1×1-conv
  ``proj_in`` from the weight's rank, SDXL's ``add_embedding`` input width. Heads: context 768 is SD 1.x
  with 8 heads at every level; otherwise heads of dim 64 (SD 2.x: 5/10/20/20, SDXL: 5/10/20).
* VAE: widths from ``encoder.down_blocks.i.resnets.0.conv1``, latent channels from ``decoder.conv_in``;
  scaling 0.13025 (and fp32 upcast advised) for SDXL checkpoints, 0.18215 otherwise.
* CLIP text encoder: widths and counts from the embedding and layer shapes, heads of dim 64; OpenAI
  CLIP-L uses quick_gelu, the OpenCLIP towers (SD 2.x H, SDXL bigG) exact gelu. A single file says which
  tower it holds by its prefix; a bare CLIP file 768 wide is taken as CLIP-L, any other width as OpenCLIP.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import torch

from .files import LoaderError, describe_keys

StateDict = Mapping[str, torch.Tensor]

SD1_CONTEXT_DIM = 768
SD1_HEADS = 8
HEAD_DIM = 64
SDXL_ADD_TIME_DIM = 256
VAE_SCALING = {"sdxl": 0.13025}
DEFAULT_VAE_SCALING = 0.18215


# transformers >= 5 saves CLIPTextModel without its ``text_model.`` level (CLIPTextModelWithProjection and
# every earlier version keep it); flashstep's CLIPTextModel has it.
CLIP_TEXT_MODEL_ROOTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")


def with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CLIP text-encoder keys under ``text_model.`` whatever the transformers version that saved them."""
    return {("text_model." + k if k.startswith(CLIP_TEXT_MODEL_ROOTS) else k): v for k, v in state_dict.items()}


def component_of(keys) -> Optional[str]:
    """``"unet"``, ``"vae"``, ``"text_encoder"`` (CLIP, with or without projection) or None."""
    keys = set(keys)
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        return "unet"
    if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= keys:
        return "vae"
    if {"text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"} & keys:
        return "text_encoder"
    return None


def _indices(keys, pattern: str) -> list:
    found = set()
    for key in keys:
        match = re.match(pattern, key)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def _shape(state_dict: StateDict, key: str, source: str, ndim: int) -> tuple:
    if key not in state_dict:
        raise LoaderError(f"{source}: expected the key {key!r} to work out the architecture; the file has "
                          f"{describe_keys(state_dict.keys())}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise LoaderError(f"{source}: {key!r} has the shape {shape}; expected {ndim} dimensions")
    return shape


def infer_unet_config(state_dict: StateDict, source: str, family: Optional[str] = None) -> Dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config dict for a diffusers-named UNet state dict."""
    keys = list(state_dict.keys())
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    if not levels:
        raise LoaderError(f"{source}: no down_blocks in the UNet keys {describe_keys(keys)}")
    channels = [_shape(state_dict, f"down_blocks.{i}.resnets.0.conv1.weight", source, 4)[0] for i in levels]
    layers_per_block = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    down_types, up_types, depths = [], [], []
    for i in levels:
        has_attention = any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys)
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        depth = _indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depths.append(len(depth) if depth else 1)
    for i in levels:
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
    to_k = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise LoaderError(f"{source}: a UNet without cross-attention (no '...attn2.to_k.weight'); only the "
                          f"text-conditioned SD UNets are supported")
    context_dim = state_dict[to_k[0]].shape[1]
    proj_in = sorted(k for k in keys if k.endswith("proj_in.weight"))
    linear_projection = bool(proj_in) and state_dict[proj_in[0]].dim() == 2
    if context_dim == SD1_CONTEXT_DIM:
        heads: Any = SD1_HEADS
    else:
        heads = [max(c // HEAD_DIM, 1) for c in channels]
    config: Dict[str, Any] = {
        "in_channels": _shape(state_dict, "conv_in.weight", source, 4)[1],
        "out_channels": _shape(state_dict, "conv_out.weight", source, 4)[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "attention_head_dim": heads,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        "use_linear_projection": linear_projection,
        "sample_size": 128 if family == "sdxl" else 64,
    }
    if "add_embedding.linear_1.weight" in state_dict:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_ADD_TIME_DIM,
                      projection_class_embeddings_input_dim=state_dict["add_embedding.linear_1.weight"].shape[1])
    return config


def infer_vae_config(state_dict: StateDict, source: str, family: Optional[str] = None) -> Dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config dict for a diffusers-named VAE state dict."""
    keys = list(state_dict.keys())
    levels = _indices(keys, r"encoder\.down_blocks\.(\d+)\.")
    channels = [_shape(state_dict, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source, 4)[0] for i in levels]
    return {
        "in_channels": _shape(state_dict, "encoder.conv_in.weight", source, 4)[1],
        "out_channels": _shape(state_dict, "decoder.conv_out.weight", source, 4)[0],
        "latent_channels": _shape(state_dict, "decoder.conv_in.weight", source, 4)[1],
        "block_out_channels": channels,
        "layers_per_block": len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "scaling_factor": VAE_SCALING.get(family, DEFAULT_VAE_SCALING),
        "force_upcast": family == "sdxl",
        "sample_size": 1024 if family == "sdxl" else 512,
    }


def infer_clip_config(state_dict: StateDict, source: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict; ``kind`` "clip_l" (quick_gelu) or "openclip" (gelu)."""
    vocab, hidden = _shape(state_dict, "text_model.embeddings.token_embedding.weight", source, 2)
    positions = _shape(state_dict, "text_model.embeddings.position_embedding.weight", source, 2)[0]
    layers = _indices(state_dict.keys(), r"text_model\.encoder\.layers\.(\d+)\.")
    intermediate = _shape(state_dict, "text_model.encoder.layers.0.mlp.fc1.weight", source, 2)[0]
    if kind is None:
        kind = "clip_l" if hidden == SD1_CONTEXT_DIM else "openclip"
    with_projection = "text_projection.weight" in state_dict
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(hidden // HEAD_DIM, 1),
        "max_position_embeddings": positions,
        "hidden_act": "quick_gelu" if kind == "clip_l" else "gelu",
        "projection_dim": state_dict["text_projection.weight"].shape[0] if with_projection else hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
    }


def infer_config(component: str, state_dict: StateDict, source: str, *, family: Optional[str] = None,
                 text_encoder_kind: Optional[str] = None) -> Dict[str, Any]:
    if component == "unet":
        return infer_unet_config(state_dict, source, family)
    if component == "vae":
        return infer_vae_config(state_dict, source, family)
    return infer_clip_config(state_dict, source, text_encoder_kind)
