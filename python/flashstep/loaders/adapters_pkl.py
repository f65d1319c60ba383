"""The OSEDiff and S3Diff checkpoints: ``torch.save`` of a plain dict (pipelines.md §1.4, §2.4).

OSEDiff (``osediff.pkl``)::

    unet_lora_{encoder,decoder,others}_modules, vae_lora_encoder_modules   lists of module paths
    rank_unet, rank_vae                                                    ints (LoraConfig without alpha)
    state_dict_unet   UNet entries with "lora" or "conv_in" in the name:
                      <m>.lora_A.default_{encoder,decoder,others}.weight (r, in[, kh, kw]), lora_B (out, r[, 1, 1]),
                      conv_in.base_layer.weight/bias (conv_in is trained in full, plus its LoRA)
    state_dict_vae    <m>.lora_A.default_encoder.weight ... (VAE encoder and quant_conv)

S3Diff (``s3diff.pkl``)::

    unet_lora_target_modules, vae_lora_target_modules, rank_unet (32), rank_vae (16)
    state_dict_unet   <m>.lora_A.default.weight ..., conv_in.weight/bias (trained in full)
    state_dict_vae    encoder.<m>.lora_A.vae_skip.weight ...
    state_dict_{unet,vae}_{de,block}_mlp   {"0.weight", "0.bias"}  (Linear + ReLU)
    state_dict_{unet,vae}_fuse_mlp         {"weight", "bias"}      (Linear 320 -> r·r)
    w                 (64,) Fourier frequencies
    state_embeddings  {"state_dict_unet_block": {"weight": (10, 64)}, "state_dict_vae_block": {"weight": (6, 64)}}

Both use peft's default ``lora_alpha = 8``: the LoRA scale is 8 / r (OSEDiff r=4: 2.0; S3Diff UNet
r=32: 0.25, VAE r=16: 0.5). OSEDiff's LoRA is static (merged at load); S3Diff's is mixed per image by
an r×r matrix built from the degradation scores (:mod:`flashstep.models.s3diff_modulation`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..models.layers import LoRASpec, apply_lora
from .files import LoaderError, describe_keys
from .lora_files import parse_lora_state_dict

OSEDIFF_KEYS = ("unet_lora_encoder_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")
S3DIFF_KEYS = ("unet_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae",
               "state_dict_unet_de_mlp", "state_dict_unet_fuse_mlp", "w", "state_embeddings")


def pkl_kind(obj: Any) -> Optional[str]:
    """``"osediff"``, ``"s3diff"`` or None for a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        return None
    if all(k in obj for k in S3DIFF_KEYS):
        return "s3diff"
    if all(k in obj for k in OSEDIFF_KEYS):
        return "osediff"
    return None


@dataclass
class MLPWeights:
    """One ``nn.Linear``: y = x Wᵀ + b with W (out, in), b (out,)."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class DegradationMLPs:
    """One branch (UNet or VAE) of S3Diff's modulation network (pipelines.md §2.3).

    de_mlp (256 -> 256, ReLU), block_mlp (64 -> 64, ReLU), fuse_mlp (320 -> r·r),
    block_embeddings (K, 64): K = 10 UNet blocks, 6 VAE-encoder blocks.
    """

    de_mlp: MLPWeights
    block_mlp: MLPWeights
    fuse_mlp: MLPWeights
    block_embeddings: torch.Tensor


@dataclass
class OSEDiffAdapter:
    """OSEDiff's UNet and VAE-encoder LoRAs, and the fully trained UNet ``conv_in``."""

    unet_lora: LoRASpec
    vae_lora: LoRASpec
    unet_weights: Dict[str, torch.Tensor]   # full UNet parameters replacing the base ones ("conv_in.weight" ...)
    rank_unet: int
    rank_vae: int

    def apply(self, unet: nn.Module, vae: nn.Module) -> None:
        """Replace the UNet's conv_in, then merge both LoRAs (W <- W + 8/r · B · A)."""
        _assign_parameters(unet, self.unet_weights, "UNet")
        apply_lora(unet, self.unet_lora, merge=True)
        apply_lora(vae, self.vae_lora, merge=True)


@dataclass
class S3DiffAdapter:
    """S3Diff's per-image-modulated LoRAs, the trained UNet ``conv_in`` and the modulation networks."""

    unet_lora: LoRASpec
    vae_lora: LoRASpec
    unet_weights: Dict[str, torch.Tensor]
    rank_unet: int
    rank_vae: int
    fourier_frequencies: torch.Tensor        # w: (64,)
    unet_mlps: DegradationMLPs
    vae_mlps: DegradationMLPs

    def apply(self, unet: nn.Module, vae: nn.Module) -> None:
        """Replace the UNet's conv_in and attach both LoRAs unmerged (set each layer's ``lora_mix`` per call)."""
        _assign_parameters(unet, self.unet_weights, "UNet")
        apply_lora(unet, self.unet_lora, merge=False)
        apply_lora(vae, self.vae_lora, merge=False)

    def modulation_state_dict(self) -> Dict[str, torch.Tensor]:
        """The modulation weights under :class:`flashstep.models.s3diff_modulation.S3DiffModulation`'s names."""
        out = {"w": self.fourier_frequencies}
        for branch, mlps in (("unet", self.unet_mlps), ("vae", self.vae_mlps)):
            out[f"{branch}.de_mlp.0.weight"], out[f"{branch}.de_mlp.0.bias"] = mlps.de_mlp.weight, mlps.de_mlp.bias
            out[f"{branch}.block_mlp.0.weight"] = mlps.block_mlp.weight
            out[f"{branch}.block_mlp.0.bias"] = mlps.block_mlp.bias
            out[f"{branch}.fuse_mlp.weight"], out[f"{branch}.fuse_mlp.bias"] = mlps.fuse_mlp.weight, mlps.fuse_mlp.bias
            out[f"{branch}.block_embeddings.weight"] = mlps.block_embeddings
        return out


def _assign_parameters(model: nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    parameters = dict(model.named_parameters())
    for name, tensor in weights.items():
        if name not in parameters:
            raise ValueError(f"the {what} has no parameter {name!r} for the adapter's full weights")
        target = parameters[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"the adapter's {name} is {tuple(tensor.shape)}, the {what}'s is {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))


def _entry(obj: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise LoaderError(f"{source}: entry {key!r} should be a {kind.__name__}, found {type(value).__name__}")
    return value


def _split_unet(state_dict: Mapping[str, torch.Tensor], source: str):
    """LoRA tensors, and the full weights of the base layers (``conv_in.base_layer.weight`` -> ``conv_in.weight``)."""
    lora, full, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            unknown.append(key)
        elif ".lora_" in key:
            lora[key] = tensor
        elif key.startswith("conv_in."):
            full[key.replace(".base_layer.", ".")] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise LoaderError(f"{source}: state_dict_unet holds entries that are neither LoRA nor conv_in: "
                          f"{describe_keys(unknown)}")
    return lora, full


def _lora_spec(lora: Mapping[str, torch.Tensor], rank: int, component: str, source: str) -> LoRASpec:
    specs = parse_lora_state_dict(lora, source)
    if set(specs) != {component}:
        raise LoaderError(f"{source}: the {component} LoRA names modules of {sorted(specs)}")
    spec = specs[component]
    ranks = {w.down.shape[0] for w in spec.modules.values()}
    if ranks != {rank}:
        raise LoaderError(f"{source}: the file says rank_{'unet' if component == 'unet' else 'vae'}={rank} but its "
                          f"{component} LoRA weights have rank {sorted(ranks)}")
    return spec


def _mlp(weights: Any, prefix: str, key: str, source: str) -> MLPWeights:
    if not isinstance(weights, Mapping) or f"{prefix}weight" not in weights or f"{prefix}bias" not in weights:
        found = describe_keys(map(str, weights)) if isinstance(weights, Mapping) else type(weights).__name__
        raise LoaderError(f"{source}: {key} should hold '{prefix}weight' and '{prefix}bias', found {found}")
    return MLPWeights(weights[f"{prefix}weight"], weights[f"{prefix}bias"])


def read_osediff(obj: Mapping[str, Any], source: str) -> OSEDiffAdapter:
    rank_unet, rank_vae = _entry(obj, "rank_unet", int, source), _entry(obj, "rank_vae", int, source)
    lora, full = _split_unet(_entry(obj, "state_dict_unet", Mapping, source), source)
    vae_lora = {k: v for k, v in _entry(obj, "state_dict_vae", Mapping, source).items() if ".lora_" in k}
    return OSEDiffAdapter(
        unet_lora=_lora_spec(lora, rank_unet, "unet", source),
        vae_lora=_lora_spec(vae_lora, rank_vae, "vae", source),
        unet_weights=full, rank_unet=rank_unet, rank_vae=rank_vae,
    )


def read_s3diff(obj: Mapping[str, Any], source: str) -> S3DiffAdapter:
    rank_unet, rank_vae = _entry(obj, "rank_unet", int, source), _entry(obj, "rank_vae", int, source)
    lora, full = _split_unet(_entry(obj, "state_dict_unet", Mapping, source), source)
    # NOTE: "skip_conv" entries (img2img-turbo's decoder skips) are saved by the training code but unused.
    vae_lora = {k: v for k, v in _entry(obj, "state_dict_vae", Mapping, source).items() if ".lora_" in k}
    embeddings = _entry(obj, "state_embeddings", Mapping, source)
    branches = {}
    for branch, rank in (("unet", rank_unet), ("vae", rank_vae)):
        table = embeddings.get(f"state_dict_{branch}_block")
        if not isinstance(table, Mapping) or not isinstance(table.get("weight"), torch.Tensor):
            raise LoaderError(f"{source}: state_embeddings lacks state_dict_{branch}_block.weight")
        fuse = _mlp(obj.get(f"state_dict_{branch}_fuse_mlp"), "", f"state_dict_{branch}_fuse_mlp", source)
        if fuse.weight.shape[0] != rank * rank:
            raise LoaderError(f"{source}: state_dict_{branch}_fuse_mlp.weight is {tuple(fuse.weight.shape)}; with "
                              f"rank_{branch}={rank} it must have {rank * rank} rows")
        branches[branch] = DegradationMLPs(
            de_mlp=_mlp(obj.get(f"state_dict_{branch}_de_mlp"), "0.", f"state_dict_{branch}_de_mlp", source),
            block_mlp=_mlp(obj.get(f"state_dict_{branch}_block_mlp"), "0.", f"state_dict_{branch}_block_mlp", source),
            fuse_mlp=fuse,
            block_embeddings=table["weight"],
        )
    w = obj["w"]
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise LoaderError(f"{source}: entry 'w' should be a 1-D tensor of Fourier frequencies, found {w!r:.60}")
    return S3DiffAdapter(
        unet_lora=_lora_spec(lora, rank_unet, "unet", source),
        vae_lora=_lora_spec(vae_lora, rank_vae, "vae", source),
        unet_weights=full, rank_unet=rank_unet, rank_vae=rank_vae,
        fourier_frequencies=w.detach(), unet_mlps=branches["unet"], vae_mlps=branches["vae"],
    )


def read_adapter_pkl(obj: Any, source: str):
    """An OSEDiff or S3Diff checkpoint object -> :class:`OSEDiffAdapter` / :class:`S3DiffAdapter`."""
    kind = pkl_kind(obj)
    if kind == "osediff":
        return read_osediff(obj, source)
    if kind == "s3diff":
        return read_s3diff(obj, source)
    found = describe_keys(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
    raise LoaderError(f"{source}: not an OSEDiff or S3Diff checkpoint; expected the keys {list(S3DIFF_KEYS)} or "
                      f"{list(OSEDIFF_KEYS)}, found {found}")
