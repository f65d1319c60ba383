"""Pipelines: what a user runs. ``flashstep.load(kind or path, **paths)`` builds one.

==================  ==============================================================================
kind                what it needs
==================  ==============================================================================
default             nothing: the bundled SR net (×4, or ×2 when ``scale`` ≤ 2)
pixel-sr            ``model=``: a Real-ESRGAN (RRDBNet, SRVGG) or SwinIR checkpoint
osediff             ``base=``: SD 2.1-base (folder or single file), ``lora=``: osediff.pkl
s3diff              ``base=``: SD-Turbo, ``lora=``: s3diff.pkl, ``de_net=``: de_net.pth
sd-turbo            ``base=``: SD-Turbo (or any SD 2.x one-step model)
sdxl-turbo          ``base=``: SDXL-Turbo
instaflow           ``base=``: InstaFlow 0.9B (SD 1.5 architecture)
latent-upscale      ``base=``: a generator kind's weights, ``adapter=``: the latent upscaler's weights
==================  ==============================================================================

A single path is detected: an SR checkpoint gives ``pixel-sr``; a diffusers folder or single-file SD
checkpoint gives the matching generator.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from .base import ImagePipeline, Pipeline

# kind -> (module, builder function)
KINDS: Dict[str, Tuple[str, str]] = {
    "default": ("flashstep.pipelines.pixel_sr", "build_default"),
    "pixel-sr": ("flashstep.pipelines.pixel_sr", "build_pixel_sr"),
    "osediff": ("flashstep.pipelines.osediff", "build_osediff"),
    "s3diff": ("flashstep.pipelines.s3diff", "build_s3diff"),
    "sd-turbo": ("flashstep.pipelines.turbo", "build_sd_turbo"),
    "sdxl-turbo": ("flashstep.pipelines.turbo", "build_sdxl_turbo"),
    "instaflow": ("flashstep.pipelines.instaflow", "build_instaflow"),
    "latent-upscale": ("flashstep.pipelines.latent_upscale", "build_latent_upscale"),
}


def _builder(kind: str) -> Callable[..., Pipeline]:
    module_name, function = KINDS[kind]
    return getattr(importlib.import_module(module_name), function)


def load(path_or_kind: Any = "default", **options: Any) -> Pipeline:
    """A pipeline from a kind name (see the module docstring) or a single checkpoint path.

    Options for every kind: ``device`` (cpu, cuda, cuda:N), ``dtype`` (fp32, fp16, bf16), ``max_memory``
    (e.g. "8GB"), ``progress`` (bool), ``cuda_graphs`` (bool).
    """
    key = str(path_or_kind)
    if key in KINDS:
        return _builder(key)(**options)
    path = Path(key)
    if not path.exists():
        raise ValueError(f"{key!r} is neither a pipeline kind ({', '.join(KINDS)}) nor an existing path")
    return _builder(detect_kind(path))(**_path_option(detect_kind(path), path), **options)


def _path_option(kind: str, path: Path) -> Dict[str, Any]:
    return {"model": path} if kind == "pixel-sr" else {"base": path}


def detect_kind(path: Path) -> str:
    """Which pipeline a single checkpoint path is for: an SR net gives pixel-sr; a generator's weights give
    sdxl-turbo (SDXL UNet), instaflow (SD 1.x UNet, 768-wide context) or sd-turbo (SD 2.x UNet)."""
    from ..loaders import inspect_path

    contents = inspect_path(str(path))
    if contents.layout == "sr_net":
        return "pixel-sr"
    if contents.layout in ("osediff", "s3diff"):
        raise ValueError(f"{path} is a {contents.layout} adapter; load it with "
                         f"flashstep.load({contents.layout!r}, base=<SD folder>, lora={str(path)!r})")
    unet = contents.components.get("unet")
    if unet is None:
        raise ValueError(f"{path} holds {sorted(contents.components) or contents.layout}, which is not a pipeline "
                         f"by itself; name a kind: {', '.join(KINDS)}")
    config = unet.config
    if config.get("addition_embed_type") == "text_time":
        return "sdxl-turbo"
    if config.get("cross_attention_dim") == 768:
        return "instaflow"
    return "sd-turbo"


__all__ = ["load", "KINDS", "Pipeline", "ImagePipeline", "detect_kind"]
