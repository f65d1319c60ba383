"""What a path holds: its layout and the model components in it, each with its config and a reader of
its diffusers-named state dict.

================== =================================================================================
layout             recognised by
================== =================================================================================
diffusers_pipeline a folder with ``model_index.json``
diffusers_component a folder with ``config.json`` (``_class_name`` / ``architectures``)
lora               a peft / diffusers LoRA folder, or a file with LoRA keys (:mod:`.lora_files`)
osediff, s3diff    a ``.pkl`` dict with their entries (:mod:`.adapters_pkl`)
single_file        keys under ``model.diffusion_model.`` / ``first_stage_model.`` / ``cond_stage_model.``
                   / ``conditioner.embedders.`` (:mod:`.single_file`)
component_file     one component's weights: diffusers / transformers names, or a bare LDM VAE; the
                   ``config.json`` beside the file when there is one, else the config inferred from the
                   keys (:mod:`.state_dict_config`)
sr_net             RRDBNet / SRVGGNetCompact / SwinIR (``params_ema`` / ``params`` / bare)
================== =================================================================================

Nothing is read but headers and memory maps until a component's state dict is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from .adapters_pkl import pkl_kind
from .diffusers_folder import (CONFIG, FolderComponent, is_component_folder, is_pipeline_folder,
                               read_component_folder, read_pipeline_folder, rename_old_vae_attention)
from .files import LoaderError, describe_keys, read_file, tensors_of
from .lora_files import is_lora_state_dict
from .sr_nets import detect_sr_net
from .single_file import KeyConversionError, convert_vae, is_ldm_vae, is_single_file, split_single_file
from .state_dict_config import component_of, infer_config, with_text_model_prefix

SR_ARCHS = ("rrdbnet", "srvgg", "swinir")
SD_ARCHS = ("unet", "vae", "text_encoder", "text_encoder_2")
ARCHS = SD_ARCHS + SR_ARCHS


@dataclass
class Component:
    """One loadable model in a path.

    ``name``: its role ("unet", "vae", "text_encoder", "text_encoder_2", or the SR architecture);
    ``arch``: the model to build ("unet", "vae", "text_encoder" for every CLIP text encoder, or an SR
    architecture); ``config``: a diffusers / transformers config dict, or an ``SRNetSpec``.
    """

    name: str
    arch: str
    source: str
    config: Any
    read_state_dict: Callable[[], Mapping[str, torch.Tensor]] = field(repr=False)
    config_source: str = ""


@dataclass
class PathContents:
    path: str
    layout: str
    components: Dict[str, Component] = field(default_factory=dict)
    tokenizers: Dict[str, str] = field(default_factory=dict)
    scheduler_config: Optional[Dict[str, Any]] = None
    checkpoint: Any = field(default=None, repr=False)   # the loaded object of an OSEDiff / S3Diff file

    def pick(self, arch: Optional[str]) -> Component:
        """The component ``arch`` names (or the only one); LoaderError listing what the path holds otherwise."""
        if arch is not None and arch not in ARCHS:
            raise LoaderError(f"unknown arch {arch!r}; expected one of {list(ARCHS)}")
        if not self.components:
            hint = " (load it with flashstep.load_lora)" if self.layout in ("lora", "osediff", "s3diff") else ""
            raise LoaderError(f"{self.path}: holds a {self.layout} checkpoint, not a model{hint}")
        if arch is None:
            if len(self.components) > 1:
                raise LoaderError(f"{self.path}: holds several components {sorted(self.components)}; pass arch= "
                                  f"one of them")
            return next(iter(self.components.values()))
        if arch in self.components:
            return self.components[arch]
        text_encoders = [c for c in self.components.values() if c.arch == "text_encoder"]
        if arch.startswith("text_encoder") and len(self.components) == 1 and text_encoders:
            return text_encoders[0]
        raise LoaderError(f"{self.path}: holds {sorted(self.components)} ({self.layout}), not {arch!r}")


def _folder_component(name: str, part: FolderComponent) -> Component:
    arch = "text_encoder" if part.arch.startswith("text_encoder") else part.arch
    return Component(name, arch, part.source, part.config, part.read_state_dict,
                     os.path.join(part.folder, CONFIG))


def _inspect_folder(path: str) -> PathContents:
    if is_pipeline_folder(path):
        pipeline = read_pipeline_folder(path)
        contents = PathContents(path, "diffusers_pipeline", tokenizers=pipeline.tokenizers,
                                scheduler_config=pipeline.scheduler_config)
        for name, part in pipeline.components.items():
            contents.components[name] = _folder_component(name, part)
        return contents
    if is_component_folder(path):
        part = read_component_folder(path)
        return PathContents(path, "diffusers_component", {part.arch: _folder_component(part.arch, part)})
    names = set(os.listdir(path))
    if names & {"adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors",
                "pytorch_lora_weights.bin"}:
        return PathContents(path, "lora")
    raise LoaderError(f"{path}: a folder without a recognisable layout; expected model_index.json (a diffusers "
                      f"pipeline), config.json + weights (one component) or LoRA weights, found "
                      f"{describe_keys(names)}")


def _fixed(state_dict: Mapping[str, torch.Tensor]) -> Callable[[], Mapping[str, torch.Tensor]]:
    return lambda: state_dict


def _component_file(path: str, tensors: Dict[str, torch.Tensor]) -> Optional[Component]:
    if is_ldm_vae(tensors.keys()):
        try:
            tensors = convert_vae(tensors)
        except KeyConversionError as error:
            raise LoaderError(f"{path}: {error}") from None
    kind = component_of(tensors.keys())
    if kind is None:
        return None
    if kind == "vae":
        tensors = rename_old_vae_attention(tensors)
    if kind == "text_encoder":
        tensors = with_text_model_prefix(tensors)
    beside = os.path.dirname(os.path.abspath(path))
    if is_component_folder(beside):
        part = read_component_folder(beside)
        if (part.arch.startswith("text_encoder") and kind == "text_encoder") or part.arch == kind:
            arch = "text_encoder" if kind == "text_encoder" else kind
            return Component(part.arch, arch, path, part.config, _fixed(tensors), os.path.join(beside, CONFIG))
    config = infer_config(kind, tensors, path)
    name = "text_encoder_2" if kind == "text_encoder" and "text_projection.weight" in tensors else kind
    return Component(name, kind, path, config, _fixed(tensors), "inferred from the keys and shapes")


def _inspect_file(path: str) -> PathContents:
    obj = read_file(path)
    kind = pkl_kind(obj)
    if kind is not None:
        return PathContents(path, kind, checkpoint=obj)
    tensors = tensors_of(obj, path)
    if is_lora_state_dict(tensors.keys()):
        return PathContents(path, "lora")
    if is_single_file(tensors.keys()):
        try:
            single = split_single_file(tensors)
        except KeyConversionError as error:
            raise LoaderError(f"{path}: {error}") from None
        contents = PathContents(path, "single_file")
        for name, part in single.components.items():
            arch = "text_encoder" if name.startswith("text_encoder") else name
            config = infer_config(arch, part.state_dict, path, family=single.family,
                                  text_encoder_kind=part.text_encoder_kind)
            contents.components[name] = Component(name, arch, path, config, _fixed(part.state_dict),
                                                  f"inferred from the keys and shapes ({single.family})")
        if not contents.components:
            raise LoaderError(f"{path}: a single-file checkpoint without UNet, VAE or text encoder weights; found "
                              f"{describe_keys(tensors.keys())}")
        return contents
    component = _component_file(path, tensors)
    if component is not None:
        return PathContents(path, "component_file", {component.name: component})
    try:
        spec = detect_sr_net(obj)
    except ValueError as error:
        raise LoaderError(f"{path}: {error}") from None
    if spec is not None:
        component = Component(spec.architecture, spec.architecture, path, spec, _fixed(spec.state_dict),
                              f"inferred from the keys and shapes ({spec.layout} layout)")
        return PathContents(path, "sr_net", {spec.architecture: component})
    raise LoaderError(
        f"{path}: no known layout; expected a Stable Diffusion checkpoint (diffusers names or "
        f"model.diffusion_model./first_stage_model./cond_stage_model.), a LoRA, an OSEDiff/S3Diff .pkl or an "
        f"RRDBNet/SRVGG/SwinIR state dict, found {describe_keys(tensors.keys())}"
    )


def inspect_path(path: str) -> PathContents:
    """What ``path`` (a file or folder) holds; LoaderError naming the path when it is no known layout."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoaderError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _inspect_folder(path)
    return _inspect_file(path)
