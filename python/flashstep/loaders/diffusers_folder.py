"""diffusers / transformers folders: a pipeline (``model_index.json`` and one subfolder per component) or
one component folder (``config.json`` + weights).

=============================== ==================================================================
component folder                weights, first found
=============================== ==================================================================
diffusers (``_class_name``)     ``diffusion_pytorch_model[.fp16].safetensors`` (or its sharded
                                ``.safetensors.index.json``), then ``diffusion_pytorch_model[.fp16].bin``
transformers (``architectures``) ``model[.fp16].safetensors`` (or sharded), then ``pytorch_model[.fp16].bin``
=============================== ==================================================================

The class named in the config says what the component is: ``UNet2DConditionModel`` -> unet,
``AutoencoderKL`` -> vae, ``CLIPTextModel`` -> text_encoder, ``CLIPTextModelWithProjection`` ->
text_encoder_2. VAEs saved by diffusers before 0.14 name their attention ``query/key/value/proj_attn``;
those keys are renamed to ``to_q/to_k/to_v/to_out.0``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .files import LoaderError, describe_keys, read_file, tensors_of
from .state_dict_config import with_text_model_prefix

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"

CLASS_TO_ARCH = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_WEIGHT_STEMS = {"diffusers": (("diffusion_pytorch_model", "safetensors"), ("diffusion_pytorch_model", "bin")),
                 "transformers": (("model", "safetensors"), ("pytorch_model", "bin"))}
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class FolderComponent:
    """One component folder: what it is, its config dict and its weight files (several when sharded)."""

    folder: str
    arch: str
    config: Dict[str, Any]
    weight_files: List[str]

    @property
    def source(self) -> str:
        return self.weight_files[0] if len(self.weight_files) == 1 else self.folder

    def read_state_dict(self) -> Dict[str, torch.Tensor]:
        """The tensors of every weight file (memory-mapped where the format allows), diffusers names."""
        state_dict: Dict[str, torch.Tensor] = {}
        for path in self.weight_files:
            state_dict.update(tensors_of(read_file(path), path, wrappers=("state_dict",)))
        if self.arch == "vae":
            state_dict = rename_old_vae_attention(state_dict)
        if self.arch.startswith("text_encoder"):
            state_dict = with_text_model_prefix(state_dict)
        return state_dict


@dataclass
class PipelineFolder:
    folder: str
    components: Dict[str, FolderComponent]
    tokenizers: Dict[str, str]            # "tokenizer", "tokenizer_2" -> folder
    scheduler_config: Optional[Dict[str, Any]]


def rename_old_vae_attention(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (and key, value, proj_attn)."""
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: m.group(1) + _OLD_VAE_ATTENTION[m.group(2)] + ".", k): v
            for k, v in state_dict.items()}


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise LoaderError(f"{path}: unreadable JSON ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise LoaderError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def is_component_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def _weight_files(folder: str, library: str) -> List[str]:
    names = set(os.listdir(folder))
    for variant in ("", ".fp16"):
        for stem, extension in _WEIGHT_STEMS[library]:
            single = f"{stem}{variant}.{extension}"
            if single in names:
                return [os.path.join(folder, single)]
            index = f"{single}.index.json"
            if index in names:
                weight_map = read_json(os.path.join(folder, index)).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise LoaderError(f"{os.path.join(folder, index)}: no weight_map in the shard index")
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if s not in names]
                if missing:
                    raise LoaderError(f"{os.path.join(folder, index)}: the shards {missing[:3]} are missing")
                return [os.path.join(folder, s) for s in shards]
    expected = ", ".join(f"{stem}.{extension}" for stem, extension in _WEIGHT_STEMS[library])
    raise LoaderError(f"{folder}: no weights; expected {expected} (or .fp16 / sharded variants), found "
                      f"{describe_keys(names)}")


def read_component_folder(folder: str) -> FolderComponent:
    """A ``config.json`` + weights folder (raises LoaderError for classes other than the SD components)."""
    config_path = os.path.join(folder, CONFIG)
    config = read_json(config_path)
    if "_class_name" in config:
        class_name, library = config["_class_name"], "diffusers"
    elif isinstance(config.get("architectures"), list) and config["architectures"]:
        class_name, library = config["architectures"][0], "transformers"
    else:
        raise LoaderError(f"{config_path}: names no class (neither '_class_name' nor 'architectures'); found the "
                          f"keys {describe_keys(config.keys())}")
    if not isinstance(class_name, str) or class_name not in CLASS_TO_ARCH:
        raise LoaderError(f"{config_path}: class {class_name!r} is not supported; supported: {sorted(CLASS_TO_ARCH)}")
    return FolderComponent(folder, CLASS_TO_ARCH[class_name], config, _weight_files(folder, library))


def read_pipeline_folder(folder: str) -> PipelineFolder:
    """Every SD component of a diffusers pipeline folder; other entries (safety checker ...) are skipped."""
    index = read_json(os.path.join(folder, MODEL_INDEX))
    components: Dict[str, FolderComponent] = {}
    tokenizers: Dict[str, str] = {}
    scheduler_config = None
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], str):
            continue
        subfolder = os.path.join(folder, name)
        class_name = entry[1]
        if class_name in TOKENIZER_CLASSES:
            tokenizers[name] = subfolder
        elif name == "scheduler":
            path = os.path.join(subfolder, SCHEDULER_CONFIG)
            scheduler_config = read_json(path) if os.path.isfile(path) else None
        elif class_name in CLASS_TO_ARCH:
            if not is_component_folder(subfolder):
                raise LoaderError(f"{folder}: {MODEL_INDEX} lists {name} ({class_name}) but {subfolder} has no "
                                  f"{CONFIG}")
            components[name] = read_component_folder(subfolder)
    if not components:
        raise LoaderError(f"{os.path.join(folder, MODEL_INDEX)}: lists no UNet, VAE or CLIP text encoder; found "
                          f"{describe_keys(k for k in index if not k.startswith('_'))}")
    return PipelineFolder(folder, components, tokenizers, scheduler_config)
