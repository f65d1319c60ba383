"""Original (LDM / SGM) single-file Stable Diffusion checkpoints -> diffusers / transformers key names.

A single file holds every component under a prefix:

===================================== ============================================================
``model.diffusion_model.``            UNet, LDM layout (``input_blocks`` / ``middle_block`` / ``output_blocks``)
``first_stage_model.``                VAE, LDM layout (``encoder.down.N.block.M``, ``mid.attn_1`` ...)
``cond_stage_model.transformer.``     SD1 CLIP-L, already in the transformers layout
``cond_stage_model.model.``           SD2 OpenCLIP-H (``transformer.resblocks.N``, fused ``in_proj``)
``conditioner.embedders.0.transformer.`` SDXL CLIP-L (transformers layout)
``conditioner.embedders.1.model.``    SDXL OpenCLIP-bigG (OpenCLIP layout, with ``text_projection``)
===================================== ============================================================

The conversion only renames keys and takes views (the fused q/k/v rows, 1×1 conv weights seen as
linear ones), so the tensors stay memory-mapped; the one copy is the transposed OpenCLIP
``text_projection`` (at most 1280×1280). SD2 keeps 23 of the 24 OpenCLIP
layers and no projection (its diffusers text encoder stops at the penultimate layer); SDXL keeps all
32 bigG layers and the projection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .state_dict_config import with_text_model_prefix

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

SINGLE_FILE_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.")

StateDict = Dict[str, torch.Tensor]


class KeyConversionError(ValueError):
    """Keys that no rule of the conversion knows (the caller adds the file name)."""

    def __init__(self, component: str, keys: List[str]):
        self.component, self.keys = component, sorted(keys)
        shown = ", ".join(repr(k) for k in self.keys[:5])
        super().__init__(f"{len(self.keys)} {component} keys of the LDM layout have no diffusers name, e.g. [{shown}]")


@dataclass
class SingleFileComponent:
    """One component of a single-file checkpoint: its diffusers-named state dict and what it is."""

    name: str                      # "unet", "vae", "text_encoder", "text_encoder_2"
    state_dict: StateDict
    text_encoder_kind: Optional[str] = None   # "clip_l" (quick_gelu) or "openclip" (gelu)


@dataclass
class SingleFile:
    family: str                                      # "sd1", "sd2" or "sdxl"
    components: Dict[str, SingleFileComponent] = field(default_factory=dict)


def is_single_file(keys) -> bool:
    return any(k.startswith(SINGLE_FILE_PREFIXES) for k in keys)


def is_ldm_vae(keys) -> bool:
    """A bare LDM VAE file (no ``first_stage_model.`` prefix), e.g. ``vae-ft-mse-840000-ema-pruned``."""
    keys = list(keys)
    return any(k.startswith("encoder.down.") for k in keys) and any(k.startswith("decoder.up.") for k in keys)


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- UNet

_RESNET_RENAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_UNET_TOP_RENAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}


def _rename_prefix(rest: str, renames: Mapping[str, str]) -> Optional[str]:
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _resnet(rest: str) -> Optional[str]:
    return _rename_prefix(rest, _RESNET_RENAMES)


def unet_layers_per_block(keys) -> int:
    """L of the LDM UNet: the first downsampler sits at ``input_blocks.(L+1).0.op``."""
    indices = set()
    downsamplers = set()
    for key in keys:
        match = re.match(r"input_blocks\.(\d+)\.0\.(op\.)?", key)
        if match:
            indices.add(int(match.group(1)))
            if match.group(2):
                downsamplers.add(int(match.group(1)))
    if downsamplers:
        return min(downsamplers) - 1
    return max(indices) if indices else 0


def ldm_unet_module_to_diffusers(path: str, layers_per_block: int) -> Optional[str]:
    """An LDM UNet key or module path (without ``model.diffusion_model.``) -> its diffusers name."""
    top = _rename_prefix(path, _UNET_TOP_RENAMES)
    if top is not None:
        return top
    group = layers_per_block + 1
    match = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if match:
        index, part, rest = int(match.group(1)), int(match.group(2)), match.group(3) or ""
        level, position = (index - 1) // group, (index - 1) % group
        if part == 0 and (rest == "op" or rest.startswith("op.")):
            return f"down_blocks.{level}.downsamplers.0.conv" + rest[2:]
        if part == 0:
            renamed = _resnet(rest)
            return None if renamed is None else f"down_blocks.{level}.resnets.{position}.{renamed}"
        if part == 1:
            return f"down_blocks.{level}.attentions.{position}" + ("." + rest if rest else "")
        return None
    match = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if match:
        part, rest = int(match.group(1)), match.group(2) or ""
        if part == 1:
            return "mid_block.attentions.0" + ("." + rest if rest else "")
        renamed = _resnet(rest)
        return None if renamed is None or part not in (0, 2) else f"mid_block.resnets.{part // 2}.{renamed}"
    match = re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if match:
        index, part, rest = int(match.group(1)), int(match.group(2)), match.group(3) or ""
        level, position = index // group, index % group
        if part == 0:
            renamed = _resnet(rest)
            return None if renamed is None else f"up_blocks.{level}.resnets.{position}.{renamed}"
        if rest == "conv" or rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        if part == 1:
            return f"up_blocks.{level}.attentions.{position}" + ("." + rest if rest else "")
        return None
    return None


def convert_unet(ldm: Mapping[str, torch.Tensor]) -> StateDict:
    """LDM UNet state dict (prefix removed) -> diffusers ``UNet2DConditionModel`` names."""
    layers_per_block = unet_layers_per_block(ldm.keys())
    converted, unknown = {}, []
    for key, tensor in ldm.items():
        new = ldm_unet_module_to_diffusers(key, layers_per_block)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = tensor
    if unknown:
        raise KeyConversionError("UNet", unknown)
    return converted


# ----------------------------------------------------------------------------------------------- VAE

_VAE_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut", "norm1": "norm1", "conv1": "conv1", "norm2": "norm2",
                       "conv2": "conv2"}
_VAE_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def convert_vae(ldm: Mapping[str, torch.Tensor]) -> StateDict:
    """LDM ``AutoencoderKL`` state dict (prefix removed) -> diffusers names.

    The decoder's ``up.i`` runs last-to-first: ``up.i`` is diffusers' ``up_blocks.(n-1-i)``. The mid
    attention's 1×1 convolutions q/k/v/proj_out (C, C, 1, 1) become linear weights (C, C) (a view).
    """
    up_levels = {int(m.group(1)) for k in ldm for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m}
    num_up = max(up_levels) + 1 if up_levels else 0
    converted, unknown = {}, []
    for key, tensor in ldm.items():
        new = _vae_key(key, num_up)
        if new is None:
            unknown.append(key)
            continue
        if ".attentions." in new and new.endswith("weight") and tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (C, C, 1, 1) -> (C, C)
        converted[new] = tensor
    if unknown:
        raise KeyConversionError("VAE", unknown)
    return converted


def _vae_key(key: str, num_up: int) -> Optional[str]:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    match = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not match:
        return None
    side, rest = match.groups()
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out." + rest[len("norm_out."):]
    match = re.match(r"(down|up)\.(\d+)\.block\.(\d+)\.(.*)$", rest)
    if match:
        direction, level, index, inner = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        renamed = _rename_prefix(inner, _VAE_RESNET_RENAMES)
        if renamed is None:
            return None
        level = level if direction == "down" else num_up - 1 - level
        return f"{side}.{direction}_blocks.{level}.resnets.{index}.{renamed}"
    match = re.match(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(.*)$", rest)
    if match:
        direction, level, sampler, tail = match.groups()
        level = int(level) if direction == "down" else num_up - 1 - int(level)
        return f"{side}.{direction}_blocks.{level}.{sampler}rs.0.conv.{tail}"
    match = re.match(r"mid\.block_([12])\.(.*)$", rest)
    if match:
        renamed = _rename_prefix(match.group(2), _VAE_RESNET_RENAMES)
        return None if renamed is None else f"{side}.mid_block.resnets.{int(match.group(1)) - 1}.{renamed}"
    match = re.match(r"mid\.attn_1\.(.*)$", rest)
    if match:
        renamed = _rename_prefix(match.group(1), _VAE_ATTENTION_RENAMES)
        return None if renamed is None else f"{side}.mid_block.attentions.0.{renamed}"
    return None


# ------------------------------------------------------------------------------------- text encoders

def convert_clip_l(hf: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIP-L stored in the transformers layout: only the ``position_ids`` buffer is dropped."""
    return with_text_model_prefix({k: v for k, v in hf.items() if not k.endswith("embeddings.position_ids")})


_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")


def openclip_num_layers(openclip: Mapping[str, torch.Tensor]) -> int:
    layers = {int(m.group(1)) for k in openclip for m in [re.match(r"transformer\.resblocks\.(\d+)\.", k)] if m}
    return max(layers) + 1 if layers else 0


def convert_openclip(openclip: Mapping[str, torch.Tensor], *, num_layers: Optional[int] = None,
                     with_projection: bool = True) -> StateDict:
    """OpenCLIP text tower -> transformers ``CLIPTextModel`` (``WithProjection``) names.

    ``attn.in_proj_weight`` (3D, D) splits into q, k, v (D, D) row blocks; ``text_projection`` (D, P),
    used as ``x @ P``, becomes the linear weight (P, D). Layers from ``num_layers`` on are dropped.
    """
    num_layers = openclip_num_layers(openclip) if num_layers is None else num_layers
    converted, unknown = {}, []
    for key, tensor in openclip.items():
        if key in _OPENCLIP_TOP:
            converted[_OPENCLIP_TOP[key]] = tensor
            continue
        if key == "text_projection":
            if with_projection:
                converted["text_projection.weight"] = tensor.t().contiguous()
            continue
        if key in _OPENCLIP_IGNORED:
            continue
        match = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key)
        if not match:
            unknown.append(key)
            continue
        layer, rest = int(match.group(1)), match.group(2)
        if layer >= num_layers:
            continue
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{base}self_attn.{name}.{kind}"] = part
            continue
        renamed = _rename_prefix(rest, _OPENCLIP_LAYER)
        if renamed is None:
            unknown.append(key)
        else:
            converted[base + renamed] = tensor
    if unknown:
        raise KeyConversionError("OpenCLIP text encoder", unknown)
    return converted


# ------------------------------------------------------------------------------------------ the file

def family_of(keys) -> str:
    """``"sdxl"`` (``conditioner.embedders``), ``"sd2"`` (OpenCLIP ``cond_stage_model.model``) or ``"sd1"``."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    return "sd1"


def split_single_file(state_dict: Mapping[str, torch.Tensor]) -> SingleFile:
    """Every component of a single-file checkpoint, converted to diffusers / transformers names.

    Raises :class:`KeyConversionError` for keys of a component that no rule knows; the entries beside the
    components (the DDPM schedule buffers, EMA copies) are skipped.
    """
    result = SingleFile(family=family_of(state_dict.keys()))
    parts: List[Tuple[str, str, Callable[[StateDict], StateDict], Optional[str]]] = [
        ("unet", UNET_PREFIX, convert_unet, None),
        ("vae", VAE_PREFIX, convert_vae, None),
        ("text_encoder", SD1_CLIP_PREFIX, convert_clip_l, "clip_l"),
        ("text_encoder", SD2_OPENCLIP_PREFIX,
         lambda sd: convert_openclip(sd, num_layers=openclip_num_layers(sd) - 1, with_projection=False), "openclip"),
        ("text_encoder", SDXL_CLIP_PREFIX, convert_clip_l, "clip_l"),
        ("text_encoder_2", SDXL_OPENCLIP_PREFIX, convert_openclip, "openclip"),
    ]
    prefixes = tuple(prefix for _, prefix, _, _ in parts)
    unknown = [k for k in state_dict
               if k.startswith(("cond_stage_model.", "conditioner.")) and not k.startswith(prefixes)]
    if unknown:
        raise KeyConversionError("text encoder", unknown)
    for name, prefix, convert, kind in parts:
        stripped = _strip(state_dict, prefix)
        if stripped:
            result.components[name] = SingleFileComponent(name, convert(stripped), kind)
    return result
