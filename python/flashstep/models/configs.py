"""Config dataclasses of the Stable Diffusion architectures: UNet, VAE (AutoencoderKL), CLIP text encoder.

Field names and defaults are those of the public config files (diffusers ``config.json`` of ``unet/`` and
``vae/``, transformers ``config.json`` of ``text_encoder/``), so ``from_diffusers`` / ``from_transformers``
read a file's dict and ``to_diffusers`` / ``to_transformers`` write one back. A diffusers key the
architectures do not implement must hold diffusers' default (as every SD 1.x / 2.x / XL file does), and a
key diffusers does not know raises ValueError; the generic transformers keys (dropout, init, generation)
are skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

IntOrTuple = Union[int, Tuple[int, ...]]

# Keys of the diffusers UNet2DConditionModel config that must keep diffusers' default value here.
_UNET_FIXED = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}

_VAE_FIXED = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _per_block(value: IntOrTuple, blocks: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * blocks
    if len(value) != blocks or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be one int or one int per block ({blocks}), got {value!r}")
    return tuple(value)


def _split_fixed(config: Mapping[str, Any], fields: Tuple[str, ...], fixed: Mapping[str, Any], what: str) -> Dict[str, Any]:
    """The dict's dataclass fields; ValueError on fixed keys with other values and on unknown keys."""
    known, problems = {}, []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in fields:
            known[key] = _tupled(value)
        elif key in fixed:
            if _tupled(value) != fixed[key]:
                problems.append(f"{key}={value!r} (only {fixed[key]!r} is implemented)")
        else:
            problems.append(f"{key}={value!r} (unknown key)")
    if problems:
        raise ValueError(f"unsupported {what} config: " + "; ".join(problems))
    return known


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config (SD 1.x, 2.x, Turbo and XL); defaults are diffusers'.

    In the SD configs ``attention_head_dim`` is the number of heads (a naming slip diffusers keeps);
    ``num_attention_heads``, when set, takes precedence. The head dim is channels / heads.
    ``upcast_attention`` (fp32 scores and softmax) is kept for the file round trip: flashstep's attention
    always computes them in fp32.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    sample_size: Optional[int] = None

    def __post_init__(self):
        blocks = len(self.block_out_channels)
        if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
            raise ValueError(
                f"{blocks} block_out_channels need as many down and up blocks, got {self.down_block_types} "
                f"and {self.up_block_types}"
            )
        for kind, valid in ((self.down_block_types, UNET_DOWN_BLOCKS), (self.up_block_types, UNET_UP_BLOCKS)):
            unknown = [t for t in kind if t not in valid]
            if unknown:
                raise ValueError(f"unsupported UNet block types {unknown}; implemented: {valid}")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"layers_per_block must be one int, got {self.layers_per_block!r}")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups must be an int (GroupNorm everywhere), got {self.norm_num_groups!r}")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim must be one int, got {self.cross_attention_dim!r}")
        for channels, heads in zip(self.block_out_channels, self.heads_per_block):
            if channels % heads:
                raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        _per_block(self.transformer_layers_per_block, blocks, "transformer_layers_per_block")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r}; implemented: None, 'text_time'")
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim")

    @property
    def heads_per_block(self) -> Tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "attention heads")

    @property
    def depth_per_block(self) -> Tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels), "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        fields = tuple(f.name for f in dataclasses.fields(cls))
        known = _split_fixed(config, fields, _UNET_FIXED, "UNet")
        for flag in ("upcast_attention", "use_linear_projection"):
            if flag in known:
                known[flag] = bool(known[flag])  # SDXL's file writes upcast_attention: null
        return cls(**known)

    def to_diffusers(self) -> Dict[str, Any]:
        """A dict ``diffusers.UNet2DConditionModel(**d)`` accepts (heads written as attention_head_dim)."""
        out = {f.name: _listed(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if out.pop("num_attention_heads") is not None:
            out["attention_head_dim"] = list(self.heads_per_block)
        return out

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """SD 1.x (and InstaFlow): 8 heads everywhere, CLIP-L context 768, 1×1-conv projections."""
        return cls(attention_head_dim=8, cross_attention_dim=768, sample_size=64)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """SD 2.x-base and SD-Turbo: heads of dim 64, OpenCLIP-H context 1024, linear projections."""
        return cls(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                   sample_size=64)

    @classmethod
    def sdxl(cls, sample_size: int = 128) -> "UNetConfig":
        """SDXL and SDXL-Turbo (whose file says sample_size 64): 3 levels, depth 1/2/10, text_time embedding."""
        return cls(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=sample_size,
        )


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (the SD / SDXL f8 VAE); defaults are diffusers'.

    ``force_upcast`` is the file's advice that the VAE overflows in fp16 and should run in fp32 (SDXL);
    the runner reads it, the model does not.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    sample_size: int = 32
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)

    def __post_init__(self):
        blocks = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * blocks or self.up_block_types != ("UpDecoderBlock2D",) * blocks:
            raise ValueError(
                f"the VAE takes {blocks} DownEncoderBlock2D and UpDecoderBlock2D blocks, got "
                f"{self.down_block_types} and {self.up_block_types}"
            )

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        fields = tuple(f.name for f in dataclasses.fields(cls))
        return cls(**_split_fixed(config, fields, _VAE_FIXED, "VAE"))

    def to_diffusers(self) -> Dict[str, Any]:
        return {f.name: _listed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def _sd_family(cls, scaling_factor: float, force_upcast: bool, sample_size: int) -> "VAEConfig":
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=scaling_factor,
            force_upcast=force_upcast,
            sample_size=sample_size,
        )

    @classmethod
    def sd(cls) -> "VAEConfig":
        # NOTE: diffusers' SD 1.x/2.x pipelines never upcast this VAE; it runs in fp16 without overflow.
        return cls._sd_family(0.18215, force_upcast=False, sample_size=512)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        return cls._sd_family(0.13025, force_upcast=True, sample_size=1024)


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig``; defaults are transformers' (CLIP ViT-B/32 text tower).

    ``with_projection`` adds ``text_projection`` (``CLIPTextModelWithProjection``, SDXL's second encoder).
    Pooling follows transformers: with the legacy ``eos_token_id`` 2 of the SD configs the pooled token is
    the one with the largest id (the end token, 49407), else the first ``eos_token_id``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    with_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; implemented: {CLIP_ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a ``text_encoder/config.json`` dict (or a full CLIPConfig dict with ``text_config``).

        Keys other than the fields are the generic transformers ones (dropout, init, generation) that do not
        change the inference graph, and are skipped.
        """
        if "text_config" in config:
            config = config["text_config"]
        fields = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        known = {key: value for key, value in config.items() if key in fields}
        architectures = config.get("architectures") or ()
        return cls(**known, with_projection="CLIPTextModelWithProjection" in architectures)

    def to_transformers(self) -> Dict[str, Any]:
        """A dict ``transformers.CLIPTextConfig(**d)`` accepts."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "with_projection"}
        out["architectures"] = ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"]
        return out

    @classmethod
    def clip_l(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower: SD 1.x, and SDXL's first encoder (used without projection)."""
        return cls(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2)

    @classmethod
    def openclip_h(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text tower as SD 2.x ships it: 23 of its 24 layers, exact GELU."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2)

    @classmethod
    def openclip_bigg(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text tower with its projection: SDXL's second encoder."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, with_projection=True)


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
