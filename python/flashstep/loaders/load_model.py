"""Checkpoint path -> built model, with one copy of the weights at most.

The model is built on the meta device (no memory, no initialisation), its expected keys and shapes are
checked against the file's, then each tensor is moved to the target device and dtype on its own (a
memory-mapped tensor already in the target dtype on the CPU is used as is, without a copy) and
assigned with ``load_state_dict(..., assign=True)``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..models.clip import CLIPTextModel
from ..models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from ..models.layers import LoRASpec
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet2DCondition
from ..models.vae import AutoencoderKL
from .adapters_pkl import OSEDiffAdapter, S3DiffAdapter, read_adapter_pkl
from .detect import Component, PathContents, inspect_path
from .files import LoaderError, describe_keys
from .lora_files import load_lora_file
from .sr_nets import build_sr_net

Device = Union[str, torch.device, None]


def _model_factory(component: Component) -> Callable[[], nn.Module]:
    """The constructor of the component's model; LoaderError when its config is not supported."""
    try:
        if component.arch == "unet":
            unet_config = UNetConfig.from_diffusers(component.config)
            return lambda: UNet2DCondition(unet_config)
        if component.arch == "vae":
            vae_config = VAEConfig.from_diffusers(component.config)
            return lambda: AutoencoderKL(vae_config)
        if component.arch == "text_encoder":
            clip_config = CLIPTextConfig.from_transformers(component.config)
            return lambda: CLIPTextModel(clip_config)
        return lambda: build_sr_net(component.config)
    except (ValueError, TypeError) as error:
        raise LoaderError(f"{component.source}: the {component.name} config ({component.config_source}) is not "
                          f"supported: {error}") from None


def default_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The file's floating dtype when all its floating tensors share one, else float32."""
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """LoaderError naming the missing and unexpected keys and the shape mismatches (the first few of each)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    not_floating = sorted(k for k in floating if k in state_dict and not state_dict[k].is_floating_point())
    problems = []
    if missing:
        problems.append(f"missing keys the model needs: {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys the model does not have: {describe_keys(unexpected)}")
    if mismatched:
        shown = "; ".join(f"{k}: file {tuple(state_dict[k].shape)}, model {expected[k]}"
                          for k in sorted(mismatched)[:5])
        problems.append(f"shape mismatches ({len(mismatched)}): {shown}")
    if not_floating:
        shown = "; ".join(f"{k}: {state_dict[k].dtype}" for k in not_floating[:5])
        problems.append(f"tensors the model needs in floating point are not ({len(not_floating)}): {shown}")
    if problems:
        raise LoaderError(f"{source}: the weights do not fit the {what}: " + "; ".join(problems))


def load_weights(factory: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], *, source: str,
                 what: str, device: Device = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build on the meta device, check, then assign the weights one tensor at a time; eval mode, no grad."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else default_dtype(state_dict)
    try:
        with torch.device("meta"):
            model = factory()
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise LoaderError(f"{source}: cannot build the {what}: {error}") from None
    check_state_dict(model, state_dict, source, what)
    placed = {}
    for key in model.state_dict():
        tensor = state_dict[key]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        placed[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(placed, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LoaderError(f"{source}: the {what} has tensors no checkpoint fills: {describe_keys(left)}")
    return model.eval().requires_grad_(False)


def build_component(component: Component, *, device: Device = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    what = f"{component.name} ({component.arch}, config {component.config_source})"
    return load_weights(_model_factory(component), component.read_state_dict(), source=component.source,
                        what=what, device=device, dtype=dtype)


def load_model(path, *, arch: Optional[str] = None, device: Device = None,
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model a checkpoint file or folder holds.

    ``arch``: "unet", "vae", "text_encoder", "text_encoder_2", "rrdbnet", "srvgg" or "swinir"; needed when
    the path holds several components (a pipeline folder, a single-file SD checkpoint). ``device``
    defaults to the CPU, ``dtype`` to the file's. Raises :class:`LoaderError` naming the file.
    """
    return build_component(inspect_path(path).pick(arch), device=device, dtype=dtype)


def load_components(path, *, device: Device = None, dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Every component of a pipeline folder or single file: {"unet": model, "vae": model, "text_encoder":
    model, ..., "tokenizer": CLIPTokenizer, ..., "scheduler_config": dict} (what the path has)."""
    contents: PathContents = inspect_path(path)
    if not contents.components:
        raise LoaderError(f"{contents.path}: holds a {contents.layout} checkpoint, no models")
    out: Dict[str, Any] = {name: build_component(c, device=device, dtype=dtype)
                           for name, c in contents.components.items()}
    for name, folder in contents.tokenizers.items():
        try:
            out[name] = CLIPTokenizer.from_folder(folder)
        except (OSError, ValueError, KeyError) as error:
            raise LoaderError(f"{folder}: unreadable tokenizer ({error})") from None
    if contents.scheduler_config is not None:
        out["scheduler_config"] = contents.scheduler_config
    return out


def load_lora(path, component: Optional[str] = None) -> Union[LoRASpec, OSEDiffAdapter, S3DiffAdapter]:
    """A LoRA file or folder -> :class:`LoRASpec` (of ``component`` when the file holds several), or the
    :class:`OSEDiffAdapter` / :class:`S3DiffAdapter` of an OSEDiff / S3Diff ``.pkl``."""
    contents = inspect_path(path)
    if contents.layout in ("osediff", "s3diff"):
        return read_adapter_pkl(contents.checkpoint, contents.path)
    if contents.layout != "lora":
        raise LoaderError(f"{path}: holds {sorted(contents.components)} ({contents.layout}), not a LoRA")
    return load_lora_file(path, component)
