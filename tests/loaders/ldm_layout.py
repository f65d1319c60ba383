"""diffusers / transformers names -> the original LDM / SGM / OpenCLIP names, written independently of
flashstep's converter from the original repositories' module trees:

* UNet (``ldm/modules/diffusionmodules/openaimodel.py``): ``input_blocks`` is a list of
  ``TimestepEmbedSequential``; block 0 is the input conv, then per level L × [ResBlock, SpatialTransformer?]
  and a ``Downsample`` (``op``) except at the last level; ``middle_block`` = [ResBlock, SpatialTransformer,
  ResBlock]; ``output_blocks`` per level (L+1) × [ResBlock, SpatialTransformer?, Upsample (``conv``) on the
  last one except at the last level]; ResBlock = ``in_layers`` [GroupNorm, SiLU, conv], ``emb_layers``
  [SiLU, Linear], ``out_layers`` [GroupNorm, SiLU, Dropout, conv], ``skip_connection``.
* VAE (``ldm/modules/diffusionmodules/model.py``): ``encoder.down[i].block[j]``, ``down[i].downsample``,
  ``mid.block_1 / attn_1 / block_2`` (AttnBlock with 1×1 conv ``q k v proj_out``), ``norm_out``;
  the decoder's ``up`` list is built last level first (``up.insert(0, ...)``).
* OpenCLIP text tower (``open_clip/transformer.py``): ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks[i]`` with ``ln_1``, ``attn`` (``nn.MultiheadAttention``: fused ``in_proj_weight``),
  ``ln_2``, ``mlp.c_fc`` / ``mlp.c_proj``, then ``ln_final`` and ``text_projection`` used as ``x @ P``.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state_dict: Dict[str, torch.Tensor], layers_per_block: int) -> Dict[str, torch.Tensor]:
    group = layers_per_block + 1
    has_attention = {m.group(1) for k in state_dict for m in [re.match(r"(up_blocks\.\d+)\.attentions\.", k)] if m}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[len("conv_in."):]
        elif key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + key.split(".")[-1]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + key.split(".")[-1]
        elif key.startswith("add_embedding.linear_1."):
            new = "label_emb.0.0." + key.split(".")[-1]
        elif key.startswith("add_embedding.linear_2."):
            new = "label_emb.0.2." + key.split(".")[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key.split(".")[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + key.split(".")[-1]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            level, pos, layer, tail = int(m[1]), int(m[2]), m[3], m[4]
            new = f"input_blocks.{1 + level * group + pos}.0.{RESNET_TO_LDM[layer]}.{tail}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * group + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * group}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{RESNET_TO_LDM[m[2]]}.{m[3]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * group + int(m[2])}.0.{RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * group + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            part = 2 if f"up_blocks.{m[1]}" in has_attention else 1
            new = f"output_blocks.{int(m[1]) * group + layers_per_block}.{part}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return out


VAE_RESNET_TO_LDM = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    num_up = 1 + max(int(m[1]) for k in state_dict for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")) or re.match(r"(en|de)coder\.conv_(in|out)\.", key):
            new = key
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{VAE_RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{VAE_RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{VAE_RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.(.*)",
                           key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value.reshape(value.shape[0], value.shape[1], 1, 1)  # linear -> 1×1 conv
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return out


def clip_to_openclip(state_dict: Dict[str, torch.Tensor], extra_layers: int = 0) -> Dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP text tower; ``extra_layers`` random
    resblocks are appended (SD2 files hold 24 layers of which diffusers keeps 23)."""
    out = {}
    layers = {int(m[1]) for k in state_dict for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)] if m}
    for key, value in state_dict.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # used as x @ P
        elif key.endswith("position_ids"):
            continue
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            layer, rest = m[1], m[2]
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.split(".")[-1]
                parts = [state_dict[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts, 0)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                        .replace("self_attn.out_proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc")
                        .replace("mlp.fc2", "mlp.c_proj"))
                out[base + rest] = value
        else:
            raise KeyError(f"no OpenCLIP name for {key}")
    top = max(layers)
    for extra in range(1, extra_layers + 1):
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{top}.")]:
            out[key.replace(f"resblocks.{top}.", f"resblocks.{top + extra}.")] = torch.randn_like(out[key])
    out["logit_scale"] = torch.tensor(4.6)
    return out
