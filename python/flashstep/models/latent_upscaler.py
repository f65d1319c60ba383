"""The latent upscaler (LUA-style adapter, arXiv 2511.10629): a SwinIR backbone on a generator's latent with
one pixel-shuffle head per scale, run once between the denoiser and the VAE decoder.

    z   : (B, C, h, w) latent in the UNet's scaled space, C = the VAE's latent channels (4 for SD / SDXL,
          16 for SD3 / FLUX-style VAEs); scaled space is what the denoiser produces and the pipeline divides
          by the VAE's ``scaling_factor`` before decoding (z_vae · scaling_factor, 0.18215 for SD)
    f   = conv_first(z)                                   (B, E, h, w)
    t   = RSTB_L(… RSTB_1(patch_embed(f)))                 tokens (B, h·w, E); SwinIR's residual Swin blocks
    g   = conv_after_body(unembed(norm(t))) + f           the long skip
    Δ_s = conv_last(PS₂(conv(… PS₂(conv(lrelu₀.₀₁(conv_before_upsample(g))))))), log2(s) conv + shuffle pairs
    ẑ_s = Δ_s + interp_s(z)                               (B, C, s·h, s·w), interp = bicubic (or nearest)

The latent enters as it is: no mean, no range scaling (SwinIR's ``img_range`` 1 and zero mean). h and w are
reflect-padded to a multiple of the window and the output is cropped back to s·h × s·w; the interpolated
residual is taken from the unpadded latent. ``conv_last`` of every head starts at zero, so an untrained
head returns exactly the interpolated latent. The conv + shuffle pairs run as
:func:`flashstep.ops.conv2d_pixel_shuffle`.

No reference checkpoint exists; the key layout is ours. The backbone has SwinIR's names (``conv_first``,
``patch_embed.norm``, ``layers.{i}.residual_group.blocks.{j}.…``, ``layers.{i}.conv``, ``norm``,
``conv_after_body``) and head s has SwinIR's pixelshuffle names under ``heads.x{s}.`` (``conv_before_upsample.0``,
``upsample.{0,2,…}``, ``conv_last``). Files: :func:`save_latent_upscaler` writes safetensors with the config in
the metadata (``{"arch": "latent_upscaler", "config": json}``); :func:`load_latent_upscaler` reads those, or
any state dict (``.pth`` via ``torch.load(weights_only=True)``) whose config it infers from keys and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import Conv2d
from .sr_base import pad_to_multiple
from .swinir import RSTB, PatchEmbed, is_power_of_two, residual_conv, tokens_to_image

ARCH = "latent_upscaler"
RESIDUAL_MODES = ("bicubic", "nearest")
RESIDUAL_CONNECTIONS = ("1conv", "3conv")


@dataclass(frozen=True)
class LatentUpscalerConfig:
    """Hyper-parameters; the backbone's are named as in :class:`flashstep.models.swinir.SwinIRConfig`.

    ``scales``: one head per entry, each a power of two ≥ 2. ``residual_mode``: how the input is upsampled
    for the residual added to every head's output ("bicubic" or "nearest").
    """

    latent_channels: int = 4
    embed_dim: int = 180
    depths: Tuple[int, ...] = (6, 6, 6, 6)
    num_heads: Tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    num_feat: int = 64
    scales: Tuple[int, ...] = (2, 4)
    resi_connection: str = "1conv"
    qkv_bias: bool = True
    patch_norm: bool = True
    residual_mode: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("depths", "num_heads", "scales"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.latent_channels < 1 or self.embed_dim < 1 or self.num_feat < 1:
            raise ValueError(f"latent_channels, embed_dim and num_feat must be positive, got {self.latent_channels}, "
                             f"{self.embed_dim}, {self.num_feat}")
        if len(self.depths) != len(self.num_heads) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be non-empty, of one length, "
                             f"with at least one block per layer")
        for heads in self.num_heads:
            if heads < 1 or self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible into {heads} heads")
        if self.window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {self.window_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not self.scales or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be distinct and at least one, got {self.scales}")
        for scale in self.scales:
            if scale < 2 or not is_power_of_two(scale):
                raise ValueError(f"every scale must be a power of two >= 2 (×2 pixel-shuffle stages), got {scale}")
        if self.resi_connection not in RESIDUAL_CONNECTIONS:
            raise ValueError(f"resi_connection {self.resi_connection!r}; valid: {RESIDUAL_CONNECTIONS}")
        if self.residual_mode not in RESIDUAL_MODES:
            raise ValueError(f"residual_mode {self.residual_mode!r}; valid: {RESIDUAL_MODES}")

    @property
    def mlp_hidden_dim(self) -> int:
        # NOTE: rounded to 6 decimals first so that a ratio inferred as hidden/embed_dim gives hidden back.
        return int(round(self.embed_dim * self.mlp_ratio, 6))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LatentUpscalerConfig":
        """The config of a dict from :meth:`to_dict`; ValueError naming unknown keys and bad values."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a latent upscaler config is a dict, got a {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown latent upscaler config keys {unknown}; valid: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(f"bad latent upscaler config {dict(values)}: {error}") from None


# The default for real use (8.4 M parameters with both heads); the small one is for tests and examples.
PRESETS = {
    "default": LatentUpscalerConfig(),
    "small": LatentUpscalerConfig(embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4, num_feat=16),
}


class UpscaleHead(nn.Module):
    """One scale's head: Δ_s of the module docstring; (B, E, H, W) -> (B, C, s·H, s·W)."""

    def __init__(self, embed_dim: int, num_feat: int, out_channels: int, scale: int):
        super().__init__()
        self.conv_before_upsample = nn.Sequential(Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                  nn.LeakyReLU(0.01, inplace=True))
        stages = []
        for _ in range(int(math.log2(scale))):
            stages += [Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*stages)
        self.conv_last = Conv2d(num_feat, out_channels, 3, 1, 1)
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        y = self.conv_before_upsample(features)  # (B, F, H, W), F = num_feat
        for conv in self.upsample[0::2]:
            y = ops.conv2d_pixel_shuffle(y, conv.weight, conv.bias, 2)  # (B, F, 2H, 2W)
        return self.conv_last(y)  # (B, C, s·H, s·W)


class LatentUpscaler(nn.Module):
    """See the module docstring. ``forward(latent, scale)``: (B, C, h, w) -> (B, C, s·h, s·w)."""

    # NOTE: as SwinIR (spandrel marks it bf16-only): the attention logits and MLP activations of the Swin
    # blocks are not bounded for fp16.
    supports_fp16 = False
    supports_bf16 = True

    def __init__(self, config: LatentUpscalerConfig = LatentUpscalerConfig()):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.conv_first = Conv2d(config.latent_channels, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, config.patch_norm)
        self.layers = nn.ModuleList(
            RSTB(dim, depth, heads, config.window_size, config.mlp_hidden_dim, config.qkv_bias, config.resi_connection)
            for depth, heads in zip(config.depths, config.num_heads)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, config.resi_connection)
        self.heads = nn.ModuleDict(
            {f"x{s}": UpscaleHead(dim, config.num_feat, config.latent_channels, s) for s in config.scales}
        )

    @property
    def scales(self) -> Tuple[int, ...]:
        return self.config.scales

    def forward_features(self, latent: torch.Tensor) -> torch.Tensor:
        """g = conv_after_body(norm(RSTBs(f))) + f, f = conv_first(z); (B, C, H, W) -> (B, E, H, W).

        H and W are multiples of the window (see :meth:`forward`)."""
        height, width = latent.shape[-2:]
        feat = self.conv_first(latent)  # (B, E, H, W)
        tokens = self.patch_embed(feat)  # (B, H·W, E)
        for layer in self.layers:
            tokens = layer(tokens, height, width)
        body = tokens_to_image(self.norm(tokens), height, width)  # (B, E, H, W)
        return self.conv_after_body(body) + feat

    def interpolate(self, latent: torch.Tensor, scale: int) -> torch.Tensor:
        """interp_s(z): (B, C, h, w) -> (B, C, s·h, s·w), the residual every head adds to."""
        if self.config.residual_mode == "nearest":
            return F.interpolate(latent, scale_factor=scale, mode="nearest")
        return F.interpolate(latent, scale_factor=scale, mode="bicubic", align_corners=False)

    def forward(self, latent: torch.Tensor, scale: int) -> torch.Tensor:
        """ẑ_s = Δ_s(g(pad(z)))[crop] + interp_s(z); latent (B, C, h, w) -> (B, C, s·h, s·w)."""
        channels = self.config.latent_channels
        if latent.dim() != 4 or latent.shape[1] != channels:
            raise ValueError(f"the latent upscaler takes latents of shape (B, {channels}, h, w), "
                             f"got {tuple(latent.shape)}")
        if scale not in self.config.scales:
            raise ValueError(f"scale {scale!r}: this latent upscaler has heads for {list(self.config.scales)} only")
        height, width = latent.shape[-2:]
        features = self.forward_features(pad_to_multiple(latent, self.config.window_size))  # (B, E, H, W)
        delta = self.heads[f"x{scale}"](features)[:, :, : height * scale, : width * scale]  # (B, C, s·h, s·w)
        return delta + self.interpolate(latent, scale)


# -- files -----------------------------------------------------------------------------------------------

StateDict = Dict[str, torch.Tensor]
BLOCK = "layers.{layer}.residual_group.blocks.{block}."
ANCHOR_KEYS = ("conv_first.weight", BLOCK.format(layer=0, block=0) + "attn.relative_position_bias_table")
HEAD_PATTERN = re.compile(r"heads\.x(\d+)\..+")


def save_latent_upscaler(model: LatentUpscaler, path: Union[str, os.PathLike]) -> None:
    """Write the weights as safetensors with ``{"arch": "latent_upscaler", "config": json}`` metadata.

    The file is written beside its destination and renamed into place, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    metadata = {"arch": ARCH, "config": json.dumps(model.config.to_dict())}
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".safetensors.part")
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def infer_config(state: StateDict) -> LatentUpscalerConfig:
    """The config of a state dict in this module's key layout, from key names and tensor shapes.

    Latent channels and embed dim from ``conv_first``, depths from the block indices, heads from the
    columns of each layer's relative position bias table, the window from its (2w − 1)² rows (checked
    against ``relative_position_index`` / ``attn_mask`` when the file has them), the MLP ratio from
    ``fc1``, the scales from the ``heads.x{s}`` keys, the residual connection and ``qkv_bias`` /
    ``patch_norm`` from which keys exist. ``residual_mode`` has no key: the default (bicubic) is taken.
    ValueError naming the key when one the layout needs is absent or has the wrong rank.
    """
    from ..loaders.sr_nets import count, shape_of, swinir_window

    missing = [key for key in ANCHOR_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a latent upscaler state dict: it lacks {missing}")
    embed_dim, channels = shape_of(state, "conv_first.weight", 4)[:2]
    num_layers = count(state, r"layers\.(\d+)\..*", "RSTB layers")
    depths = tuple(count(state, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\..*", f"blocks in layers.{i}")
                   for i in range(num_layers))
    heads = tuple(shape_of(state, BLOCK.format(layer=i, block=0) + "attn.relative_position_bias_table", 2)[1]
                  for i in range(num_layers))
    scales = sorted({int(m.group(1)) for key in state if (m := HEAD_PATTERN.fullmatch(key))})
    if not scales:
        raise ValueError("the state dict has no upscaling head (no key starts with 'heads.x<scale>.')")
    if "conv_after_body.weight" in state:
        resi_connection = "1conv"
    elif "conv_after_body.0.weight" in state:
        resi_connection = "3conv"
    else:
        raise ValueError("the state dict lacks 'conv_after_body.weight' (or 'conv_after_body.0.weight' for '3conv')")
    hidden = shape_of(state, BLOCK.format(layer=0, block=0) + "mlp.fc1.weight", 2)[0]
    return LatentUpscalerConfig(
        latent_channels=channels,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=swinir_window(state),
        mlp_ratio=hidden / embed_dim,
        num_feat=shape_of(state, f"heads.x{scales[0]}.conv_before_upsample.0.weight", 4)[0],
        scales=tuple(scales),
        resi_connection=resi_connection,
        qkv_bias=BLOCK.format(layer=0, block=0) + "attn.qkv.bias" in state,
        patch_norm="patch_embed.norm.weight" in state,
    )


def _config_from_metadata(metadata: Mapping[str, str], path: str) -> Optional[LatentUpscalerConfig]:
    """The config stored by :func:`save_latent_upscaler`, or None when the file has no ``arch`` entry."""
    if "arch" not in metadata:
        return None
    if metadata["arch"] != ARCH:
        raise ValueError(f"{path}: the metadata says arch {metadata['arch']!r}, not {ARCH!r}")
    try:
        return LatentUpscalerConfig.from_dict(json.loads(metadata.get("config", "")))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the metadata's 'config' is not valid JSON ({error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: the metadata's config is not usable: {error}") from None


def load_latent_upscaler(path: Union[str, os.PathLike], *, device: Any = None,
                         dtype: Optional[torch.dtype] = None) -> LatentUpscaler:
    """The latent upscaler in a safetensors or torch file (see the module docstring), in eval mode.

    ``device`` defaults to the CPU, ``dtype`` to the file's. Every problem with the file (unreadable, not
    this layout, missing or unexpected keys, shapes that do not fit the config) is a ValueError naming it.
    """
    from ..loaders.files import LoaderError, read_file, read_safetensors_metadata, sniff_format
    from ..loaders.load_model import load_weights
    from ..loaders.sr_nets import is_swinir_buffer, unwrap_state_dict

    path = os.fspath(path)
    try:
        metadata = read_safetensors_metadata(path) if sniff_format(path) == "safetensors" else {}
        checkpoint = read_file(path)
    except LoaderError as error:
        raise ValueError(str(error)) from None
    state = unwrap_state_dict(checkpoint) if isinstance(checkpoint, Mapping) else None
    if state is None:
        raise ValueError(f"{path}: holds no state dict of tensors (found a {type(checkpoint).__name__})")
    config = _config_from_metadata(metadata, path)
    try:
        if config is None:
            config = infer_config(state)
        state = {key: value for key, value in state.items() if not is_swinir_buffer(key)}
        return load_weights(lambda: LatentUpscaler(config), state, source=path,
                            what=f"latent upscaler ({config})", device=device, dtype=dtype)
    except LoaderError as error:
        raise ValueError(str(error)) from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
