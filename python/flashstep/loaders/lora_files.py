"""LoRA files -> :class:`~flashstep.models.layers.LoRASpec`, one per model component.

Key styles read (``<m>`` is a module path as in diffusers' / transformers' ``named_modules``, which
flashstep's models share):

* peft / diffusers: ``[<component>.][base_model.model.]<m>.lora_A[.<adapter>].weight`` and ``lora_B``
  (conv: A (r, in, kh, kw), B (out, r, 1, 1)), or ``<m>.lora.down.weight`` / ``lora.up.weight``, or the
  attention-processor form ``<m>.processor.to_q_lora.down.weight``; optional ``<m>.alpha``.
* kohya: ``lora_unet_<m with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, and
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders; SDXL files name UNet modules in
  the SGM layout (``input_blocks_4_1_...``), converted like single-file checkpoints (two resnets per
  level, as every SD UNet has).

Text-encoder paths saved by transformers >= 5 (no ``text_model.`` level) get it back.

The delta is ``scale · B · A`` with ``scale = alpha / r``. Where the file gives no alpha, each style's
own convention applies: a peft ``adapter_config.json`` (or diffusers' ``lora_adapter_metadata``) when
present; peft's default ``lora_alpha = 8`` for raw peft state dicts (adapter-name infix or
``base_model.model.``); ``alpha = r`` (scale 1) for diffusers and kohya files, as their loaders do.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..models.layers import LoRASpec, LoRAWeights
from .files import LoaderError, describe_keys, read_file, read_safetensors_metadata, sniff_format, tensors_of
from .single_file import ldm_unet_module_to_diffusers
from .state_dict_config import CLIP_TEXT_MODEL_ROOTS

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
PEFT_DEFAULT_ALPHA = 8.0

# Multi-word names of the diffusers / transformers / LDM module trees, to put the dots back into kohya names.
_COMPOUND_NAMES = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "conv_in", "conv_out", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "conv_norm_out", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "input_blocks", "middle_block",
    "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    "token_embedding", "position_embedding", "text_projection", "group_norm", "quant_conv", "post_quant_conv",
}, key=len, reverse=True)

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
_UNSUPPORTED_MARKERS = {
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)", "dora_scale": "DoRA (weight-decomposed LoRA)",
    "hada_w1": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "lora_mid": "LoCon with a mid (Tucker) factor",
}


@dataclass
class _ModuleEntry:
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    keys: List[str] = field(default_factory=list)


def kohya_name_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` -> ``down_blocks.0.attentions.0...to_q``."""
    parts, position = [], 0
    while position < len(name):
        for compound in _COMPOUND_NAMES:
            end = position + len(compound)
            if name.startswith(compound, position) and (end == len(name) or name[end] == "_"):
                parts.append(compound)
                position = end + 1
                break
        else:
            end = name.find("_", position)
            end = len(name) if end < 0 else end
            parts.append(name[position:end])
            position = end + 1
    return ".".join(parts)


def _component_of_path(path: str) -> str:
    if path.startswith(("text_model.",) + CLIP_TEXT_MODEL_ROOTS):
        return "text_encoder"
    if path.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")):
        return "vae"
    return "unet"


def _split_key(key: str) -> Optional[Tuple[str, str, str, str]]:
    """A LoRA key -> (component, module path, role in {"down", "up", "alpha"}, style), or None."""
    for prefix, component in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            match = re.match(r"(.*)\.(lora_down\.weight|lora_up\.weight|alpha)$", key[len(prefix):])
            if not match:
                return None
            path = kohya_name_to_path(match.group(1))
            if component == "unet" and path.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed",
                                                        "label_emb", "out.")):
                path = ldm_unet_module_to_diffusers(path, layers_per_block=2) or path
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match.group(2)]
            return component, path, role, "kohya"
    component = None
    for candidate in COMPONENTS:
        if key.startswith(candidate + "."):
            component, key = candidate, key[len(candidate) + 1:]
            break
    style = "diffusers"
    if key.startswith("base_model.model."):
        key, style = key[len("base_model.model."):], "peft"
    match = re.match(r"(.*)\.lora_([AB])(?:\.([\w-]+))?\.weight$", key)
    if match:
        path, role = match.group(1), "down" if match.group(2) == "A" else "up"
        if match.group(3) is not None:
            style = "peft"
    elif match := re.match(r"(.*)\.lora\.(down|up)\.weight$", key):
        path, role = match.group(1), match.group(2)
    elif match := re.match(r"(.*)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", key):
        target = "to_out.0" if match.group(2) == "to_out" else match.group(2)
        path, role = f"{match.group(1)}.{target}", match.group(3)
    elif match := re.match(r"(.*)\.alpha$", key):
        path, role = match.group(1), "alpha"
    else:
        return None
    component = component or _component_of_path(path)
    if component.startswith("text_encoder") and path.startswith(CLIP_TEXT_MODEL_ROOTS):
        path = "text_model." + path
    return component, path, role, style


def _pattern_value(patterns: Mapping[str, float], path: str) -> Optional[float]:
    """peft's ``alpha_pattern`` lookup: a key matches a module whose path ends with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(value)
    return None


@dataclass
class AlphaRules:
    """Where alphas come from when the tensors do not carry them (per component)."""

    lora_alpha: Dict[str, float] = field(default_factory=dict)
    alpha_pattern: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def alpha_for(self, component: str, path: str) -> Optional[float]:
        patterned = _pattern_value(self.alpha_pattern.get(component, {}), path)
        return patterned if patterned is not None else self.lora_alpha.get(component)


def _alpha_rules(path: str) -> AlphaRules:
    """Alphas from a peft ``adapter_config.json`` beside the file, or diffusers' safetensors metadata."""
    rules = AlphaRules()
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise LoaderError(f"{config_path}: unreadable peft adapter config ({error})") from None
        if "lora_alpha" in config:
            for component in COMPONENTS:
                rules.lora_alpha[component] = float(config["lora_alpha"])
                rules.alpha_pattern[component] = dict(config.get("alpha_pattern") or {})
    if sniff_format(path) == "safetensors":
        raw = read_safetensors_metadata(path).get("lora_adapter_metadata")
        if raw:
            try:
                metadata = json.loads(raw)
            except json.JSONDecodeError as error:
                raise LoaderError(f"{path}: the lora_adapter_metadata is not valid JSON ({error})") from None
            for key, value in metadata.items():
                component, _, field_name = key.rpartition(".")
                if field_name == "lora_alpha":
                    rules.lora_alpha[component] = float(value)
                elif field_name == "alpha_pattern" and isinstance(value, dict):
                    rules.alpha_pattern[component] = value
    return rules


def parse_lora_state_dict(state_dict: Mapping[str, torch.Tensor], source: str,
                          rules: Optional[AlphaRules] = None) -> Dict[str, LoRASpec]:
    """A LoRA state dict (any style above) -> {component: LoRASpec}. ``source`` names the file in errors."""
    rules = rules or AlphaRules()
    for marker, what in _UNSUPPORTED_MARKERS.items():
        found = [k for k in state_dict if marker in k]
        if found:
            raise LoaderError(f"{source}: holds {what} weights (e.g. {found[0]!r}); only plain LoRA (A, B, alpha) "
                              f"is supported")
    entries: Dict[Tuple[str, str], _ModuleEntry] = {}
    peft_components = set()
    unknown = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, path, role, style = split
        entry = entries.setdefault((component, path), _ModuleEntry())
        entry.keys.append(key)
        if role == "alpha":
            if tensor.numel() != 1:
                raise LoaderError(f"{source}: {key!r} holds {tensor.numel()} values; a LoRA alpha is one number")
            entry.alpha = float(tensor.float().reshape(-1)[0])
        elif getattr(entry, role) is not None:
            raise LoaderError(f"{source}: module {component}.{path} has two LoRA {role} weights "
                              f"({describe_keys(entry.keys)}); several adapters on one module are not supported")
        else:
            setattr(entry, role, tensor)
        if style == "peft" and role != "alpha":
            peft_components.add(component)
    if unknown:
        raise LoaderError(f"{source}: keys that are not LoRA weights: {describe_keys(unknown)}; expected "
                          f"'<module>.lora_A.weight' / 'lora_B', '<module>.lora.down.weight' or kohya "
                          f"'lora_unet_<module>.lora_down.weight'")
    specs: Dict[str, Dict[str, LoRAWeights]] = {}
    for (component, path), entry in entries.items():
        if entry.down is None or entry.up is None:
            missing = "down (A)" if entry.down is None else "up (B)"
            raise LoaderError(f"{source}: module {component}.{path} has no LoRA {missing} weight; found "
                              f"{describe_keys(entry.keys)}")
        rank = entry.down.shape[0]
        if entry.up.dim() not in (2, 4) or entry.up.shape[1] != rank:
            raise LoaderError(f"{source}: module {component}.{path}: down (A) {tuple(entry.down.shape)} has rank "
                              f"{rank} but up (B) has shape {tuple(entry.up.shape)}")
        alpha = entry.alpha
        if alpha is None:
            alpha = rules.alpha_for(component, path)
        if alpha is None:
            alpha = PEFT_DEFAULT_ALPHA if component in peft_components else float(rank)
        specs.setdefault(component, {})[path] = LoRAWeights(entry.down, entry.up, alpha / rank)
    if not specs:
        raise LoaderError(f"{source}: holds no LoRA weights")
    return {component: LoRASpec(modules) for component, modules in specs.items()}


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin",
                     "pytorch_lora_weights.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise LoaderError(f"{path}: a folder without LoRA weights; expected adapter_model.safetensors or "
                          f"pytorch_lora_weights.safetensors, found {describe_keys(os.listdir(path))}")
    return path


def load_lora_components(path: str) -> Dict[str, LoRASpec]:
    """Every component's LoRA in a file (or a peft / diffusers LoRA folder): {"unet": spec, ...}."""
    path = _weights_file(path)
    state_dict = tensors_of(read_file(path), path, wrappers=("state_dict",))
    return parse_lora_state_dict(state_dict, path, _alpha_rules(path))


def load_lora_file(path: str, component: Optional[str] = None) -> LoRASpec:
    """One component's LoRA; ``component`` may be left out when the file holds only one."""
    specs = load_lora_components(path)
    if component is None:
        if len(specs) > 1:
            raise LoaderError(f"{path}: holds LoRAs for {sorted(specs)}; pass component= one of them")
        return next(iter(specs.values()))
    if component not in specs:
        raise LoaderError(f"{path}: holds no LoRA for {component!r}; it has {sorted(specs)}")
    return specs[component]


_LORA_KEY = re.compile(
    r"(\.lora_[AB][.]|\.lora\.(down|up)\.|\.lora_(down|up)\.|_lora\.(down|up)\.|^lora_(unet|te\d?)_)")


def is_lora_state_dict(keys) -> bool:
    """Whether the keys are a LoRA's (any style of the module docstring)."""
    return any(_LORA_KEY.search(k) for k in keys)
