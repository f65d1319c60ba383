"""The bundled default SR nets: SRVGGNetCompact at ×4 and ×2, so that ``flashstep upscale`` works with no
weights to download.

Each file is ``default_sr_x{scale}.safetensors``; its metadata names the architecture and its config
(``arch`` = "srvgg", ``in_channels``, ``num_feat``, ``num_conv``, ``scale``) and how it was made
(``trained_by`` = tools/train_default.py, ``seed``, the training set-up and time). The training data,
degradation model and measured quality are in tools/ and benchmarks/default_model.md.
"""
from __future__ import annotations

import pathlib
from importlib import resources
from typing import Dict, Optional, Union

import torch

SCALES = (2, 4)


def default_model_path(scale: int) -> pathlib.Path:
    """The file of the bundled ×``scale`` net (scale 2 or 4)."""
    if scale not in SCALES:
        raise ValueError(f"the bundled default SR nets are ×2 and ×4, got scale={scale!r}")
    # NOTE: the package is installed as files (editable or wheel), so the resource is a real path.
    return pathlib.Path(str(resources.files(__name__) / f"default_sr_x{scale}.safetensors"))


def default_model_config(metadata: Dict[str, str], source: str):
    """The :class:`SRVGGConfig` a bundled file's metadata declares; LoaderError when it declares something else."""
    from ..loaders.files import LoaderError
    from ..models.srvgg import SRVGGConfig

    if metadata.get("arch") != "srvgg":
        raise LoaderError(f"{source}: the metadata declares arch={metadata.get('arch')!r}, expected 'srvgg'")
    try:
        return SRVGGConfig(
            in_channels=int(metadata.get("in_channels", "3")),
            num_feat=int(metadata["num_feat"]),
            num_conv=int(metadata["num_conv"]),
            scale=int(metadata["scale"]),
        )
    except (KeyError, ValueError) as error:
        raise LoaderError(f"{source}: the metadata does not give a valid SRVGG config: {error!r}") from None


def load_default_model(scale: int = 4, device: Union[str, torch.device, None] = None,
                       dtype: Optional[torch.dtype] = None):
    """The bundled ×``scale`` :class:`~flashstep.models.srvgg.SRVGGNetCompact`, built from the file's
    metadata, weights loaded with safetensors; on ``device`` (default CPU) in ``dtype`` (default float32),
    in eval mode with gradients off."""
    from ..loaders.files import LoaderError, read_safetensors, read_safetensors_metadata
    from ..loaders.load_model import load_weights
    from ..models.srvgg import SRVGGNetCompact

    path = default_model_path(scale)
    if not path.is_file():
        raise FileNotFoundError(f"the bundled ×{scale} weights are missing: {path} (run tools/train_default.py)")
    source = str(path)
    config = default_model_config(read_safetensors_metadata(source), source)
    if config.scale != scale:
        raise LoaderError(f"{source}: the metadata declares scale {config.scale}, the file name ×{scale}")
    return load_weights(lambda: SRVGGNetCompact(config), read_safetensors(source), source=source,
                        what=f"bundled SRVGG ×{scale} net", device=device, dtype=dtype or torch.float32)
