"""The one-pass SR nets (RRDBNet, SRVGGNetCompact, SwinIR) from their state dicts alone, with no config file.

    spec = detect_sr_net(checkpoint)      # None when the keys are no layout of these nets
    model = build_sr_net(spec)            # the architecture, randomly initialised (meta device works)
    model.load_state_dict(spec.state_dict)

Steps (in the spirit of spandrel's detection):

1. Unwrap: the first of ``params_ema``, ``params``, ``state_dict``, ``model_state_dict``, ``model``, ``net``
   that holds a dict (BasicSR files keep the EMA weights under ``params_ema``), a dict of a single dict,
   then a ``module.`` / ``netG.`` prefix common to every key.
2. Canonicalise the keys to the names of our modules: BasicSR RRDBNet names are ours; the old ESRGAN
   ``model.N`` layout and the BSRGAN (``RRDB_trunk``, ``trunk_conv``, ``upconv``, ``HRconv``) layout are
   renamed; SwinIR's ``relative_position_index`` and ``attn_mask`` buffers are checked and dropped (the
   model computes them for the actual input).
3. Infer the hyper-parameters from key names and tensor shapes (block counts, widths, scale, upsampler,
   window, depths, heads, residual connection).
4. Check the whole dict against the model built on the meta device: keys the model does not have mean
   another architecture (None: HAT, Swin2SR, ESRGAN+ share the anchor keys); missing keys or a shape
   that differs raise ValueError naming the keys and the shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from ..models.rrdbnet import RRDBNet, RRDBNetConfig
from ..models.sr_base import SRNet
from ..models.srvgg import SRVGGConfig, SRVGGNetCompact
from ..models.swinir import SwinIR, SwinIRConfig

StateDict = Dict[str, torch.Tensor]
SRNetConfig = Union[RRDBNetConfig, SRVGGConfig, SwinIRConfig]

UNWRAP_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model", "net")
COMMON_PREFIXES = ("module.", "netG.")
ARCHITECTURES: Dict[str, Callable[..., SRNet]] = {"rrdbnet": RRDBNet, "srvgg": SRVGGNetCompact, "swinir": SwinIR}


@dataclass(frozen=True, eq=False)
class SRNetSpec:
    """What :func:`detect_sr_net` found.

    ``architecture``: "rrdbnet", "srvgg" or "swinir"; ``config``: its dataclass; ``layout``: the key layout
    of the file ("basicsr", "esrgan", "bsrgan", "compact", "swinir"); ``state_dict``: the tensors renamed to
    the built model's own keys, ready for ``load_state_dict``.
    """

    architecture: str
    config: SRNetConfig
    layout: str
    state_dict: StateDict = field(repr=False)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def input_channels(self) -> int:
        return self.config.in_channels


# -- step 1: unwrap ---------------------------------------------------------------------------------

def unwrap_state_dict(checkpoint: Mapping) -> Optional[StateDict]:
    """The tensor dict inside a checkpoint (see step 1 of the module docstring), or None if there is none."""
    state = checkpoint
    while isinstance(state, Mapping):
        inner = next((state[key] for key in UNWRAP_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None and len(state) == 1 and isinstance(next(iter(state.values())), Mapping):
            inner = next(iter(state.values()))
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        return None
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        return None
    state = dict(state)
    for prefix in COMMON_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


# -- step 4: the check against the model ------------------------------------------------------------

def expected_shapes(architecture: str, config: SRNetConfig) -> Dict[str, tuple]:
    """Key -> shape of the model's state dict, from a build on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = ARCHITECTURES[architecture](config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def matches_model(architecture: str, config: SRNetConfig, state: StateDict) -> bool:
    """False when ``state`` has keys the model lacks; raises ValueError on missing keys or other shapes."""
    expected = expected_shapes(architecture, config)
    if any(key not in expected for key in state):
        return False
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(
            f"the state dict looks like a {architecture} ({config}) but lacks {len(missing)} of its keys, "
            f"e.g. {missing[:4]}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{key!r} has shape {tuple(state[key].shape)}, but a {architecture} with {config} expects {shape}"
            )
    return True


def shape_of(state: StateDict, key: str, ndim: int) -> tuple:
    """The shape of ``state[key]``; ValueError when the key is absent or the rank differs."""
    if key not in state:
        raise ValueError(f"the state dict lacks {key!r}, which this layout needs")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def indices(state: StateDict, pattern: str) -> List[int]:
    """The sorted distinct integers captured by the first group of ``pattern`` over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.fullmatch(key))})


def count(state: StateDict, pattern: str, what: str) -> int:
    """1 + the largest index of ``pattern`` (a sequence length); ValueError when there is none."""
    found = indices(state, pattern)
    if not found:
        raise ValueError(f"the state dict has no {what} (no key matches {pattern!r})")
    return found[-1] + 1


# -- RRDBNet ----------------------------------------------------------------------------------------

BASICSR_RRDB_KEYS = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight")
BSRGAN_RRDB_KEYS = ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight")
OLD_ESRGAN_KEYS = ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")


def bsrgan_to_basicsr(state: StateDict) -> StateDict:
    """RRDB_trunk.N.RDBk.convj / trunk_conv / upconvK / HRconv -> body.N.rdbk.convj / conv_body / conv_upK / conv_hr."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
        key = re.sub(r"^trunk_conv\.", "conv_body.", key)
        key = re.sub(r"^upconv(\d+)\.", r"conv_up\1.", key)
        key = re.sub(r"^HRconv\.", "conv_hr.", key)
        renamed[key] = value
    return renamed


def old_esrgan_to_basicsr(state: StateDict) -> Optional[StateDict]:
    """The ESRGAN ``model.N`` sequence -> BasicSR names; None when the sequence is not conv/RRDB/upconv.

    model.0 = conv_first; model.1.sub.n.RDBk.convj.0 = body.n.rdbk.convj (n < N); model.1.sub.N = conv_body;
    model.3k = conv_upk (k = 1 … K, each after a ×2 nearest upsampling); model.3K+2 = conv_hr;
    model.3K+4 = conv_last.
    """
    top = [i for i in indices(state, r"model\.(\d+)\.(?:weight|bias)") if i not in (0, 1)]
    if not top or (top[-1] - 4) % 3:
        return None
    num_upsample = (top[-1] - 4) // 3
    names = {0: "conv_first", top[-1] - 2: "conv_hr", top[-1]: "conv_last"}
    names.update({3 * k: f"conv_up{k}" for k in range(1, num_upsample + 1)})
    if sorted(names) != [0] + top:
        return None
    num_block = max(indices(state, r"model\.1\.sub\.(\d+)\..*"))
    renamed = {}
    for key, value in state.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            key = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := re.fullmatch(rf"model\.1\.sub\.{num_block}\.(weight|bias)", key):
            key = f"conv_body.{m.group(1)}"
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)) and int(m.group(1)) in names:
            key = f"{names[int(m.group(1))]}.{m.group(2)}"
        renamed[key] = value
    return renamed


def detect_rrdbnet(state: StateDict) -> Optional[SRNetSpec]:
    if all(key in state for key in BASICSR_RRDB_KEYS):
        layout = "basicsr"
    elif all(key in state for key in BSRGAN_RRDB_KEYS):
        layout, state = "bsrgan", bsrgan_to_basicsr(state)
    elif all(key in state for key in OLD_ESRGAN_KEYS):
        layout, state = "esrgan", old_esrgan_to_basicsr(state)
        if state is None:
            return None
    else:
        return None
    num_feat, in_total = shape_of(state, "conv_first.weight", 4)[:2]
    out_channels = shape_of(state, "conv_last.weight", 4)[0]
    # NOTE: Real-ESRGAN x2plus / x1 nets pixel-unshuffle the image first, so conv_first sees 4 or 16 times
    # the output's channels; no key says so (spandrel decides the same way).
    unshuffle = {4 * out_channels: 2, 16 * out_channels: 4}.get(in_total, 1)
    ups = indices(state, r"conv_up(\d+)\.weight")
    config = RRDBNetConfig(
        in_channels=in_total // unshuffle**2,
        out_channels=out_channels,
        num_feat=num_feat,
        num_block=count(state, r"body\.(\d+)\..*", "RRDB blocks"),
        num_grow_ch=shape_of(state, "body.0.rdb1.conv1.weight", 4)[0],
        num_upsample=ups[-1] if ups else 0,
        unshuffle=unshuffle,
    )
    if not matches_model("rrdbnet", config, state):
        return None
    return SRNetSpec("rrdbnet", config, layout, state)


# -- SRVGGNetCompact --------------------------------------------------------------------------------

def detect_srvgg(state: StateDict) -> Optional[SRNetSpec]:
    if "body.0.weight" not in state or "body.1.weight" not in state or state["body.1.weight"].dim() != 1:
        return None
    if not all(re.fullmatch(r"body\.\d+\.(?:weight|bias)", key) for key in state):
        return None
    last = max(indices(state, r"body\.(\d+)\.(?:weight|bias)"))
    if last % 2:
        raise ValueError(f"an SRVGG body ends with a conv at an even index, the last key is body.{last}")
    num_feat, in_channels = shape_of(state, "body.0.weight", 4)[:2]
    head_channels = shape_of(state, f"body.{last}.weight", 4)[0]
    scale = math.isqrt(head_channels // in_channels)
    if scale * scale * in_channels != head_channels:
        raise ValueError(
            f"'body.{last}.weight' has {head_channels} output channels, not {in_channels}·s² for the "
            f"{in_channels} input channels of 'body.0.weight' {tuple(state['body.0.weight'].shape)}"
        )
    config = SRVGGConfig(in_channels=in_channels, num_feat=num_feat, num_conv=(last - 2) // 2, scale=scale)
    if not matches_model("srvgg", config, state):
        return None
    return SRNetSpec("srvgg", config, "compact", state)


# -- SwinIR ------------------------------------------------------------------------------------------

SWINIR_BLOCK = "layers.{layer}.residual_group.blocks.{block}."
SWINIR_KEYS = tuple(
    SWINIR_BLOCK.format(layer=0, block=0) + name
    for name in ("norm1.weight", "attn.relative_position_bias_table", "mlp.fc1.weight")
) + ("conv_first.weight",)
SWINIR_BUFFERS = re.compile(r"layers\.\d+\.residual_group\.blocks\.\d+\.attn(?:\.relative_position_index|_mask)")


def is_swinir_buffer(key: str) -> bool:
    return SWINIR_BUFFERS.fullmatch(key) is not None


def swinir_window(state: StateDict) -> int:
    """w from the bias table ((2w−1)², heads), checked against relative_position_index (w², w²) and attn_mask."""
    key = SWINIR_BLOCK.format(layer=0, block=0) + "attn.relative_position_bias_table"
    rows = shape_of(state, key, 2)[0]
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"{key!r} has shape {tuple(state[key].shape)}; (2·window − 1)² rows expected")
    window = (side + 1) // 2
    for name, value in state.items():
        if is_swinir_buffer(name) and tuple(value.shape[-2:]) != (window * window, window * window):
            raise ValueError(f"{name!r} has shape {tuple(value.shape)}, a window of {window} gives {window**2} tokens")
    return window


def swinir_head(state: StateDict, channels: int) -> tuple:
    """(upsampler, scale, num_feat) from the reconstruction keys."""
    if "conv_before_upsample.0.weight" in state:
        num_feat = shape_of(state, "conv_before_upsample.0.weight", 4)[0]
        ups = indices(state, r"conv_up(\d+)\.weight")
        if ups:
            return "nearest+conv", 2 ** ups[-1], num_feat
        scale = 1
        for stage in indices(state, r"upsample\.(\d+)\.weight"):
            out_ch, in_ch = shape_of(state, f"upsample.{stage}.weight", 4)[:2]
            factor = math.isqrt(out_ch // in_ch)
            if factor * factor * in_ch != out_ch:
                raise ValueError(f"'upsample.{stage}.weight' has shape {(out_ch, in_ch)}: not a pixel-shuffle conv")
            scale *= factor
        return "pixelshuffle", scale, num_feat
    if "upsample.0.weight" in state:
        out_ch = shape_of(state, "upsample.0.weight", 4)[0]
        scale = math.isqrt(out_ch // channels)
        if scale * scale * channels != out_ch:
            raise ValueError(f"'upsample.0.weight' has {out_ch} outputs, not {channels}·s² for {channels} channels")
        return "pixelshuffledirect", scale, SwinIRConfig.num_feat
    return "", 1, SwinIRConfig.num_feat


def detect_swinir(state: StateDict) -> Optional[SRNetSpec]:
    if not all(key in state for key in SWINIR_KEYS):
        return None
    window = swinir_window(state)
    state = {key: value for key, value in state.items() if not is_swinir_buffer(key)}
    embed_dim, channels = shape_of(state, "conv_first.weight", 4)[:2]
    num_layers = count(state, r"layers\.(\d+)\..*", "RSTB layers")
    depths = [count(state, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\..*", f"blocks in layers.{i}")
              for i in range(num_layers)]
    heads = [shape_of(state, SWINIR_BLOCK.format(layer=i, block=0) + "attn.relative_position_bias_table", 2)[1]
             for i in range(len(depths))]
    if "conv_after_body.weight" in state:
        resi_connection = "1conv"
    elif "conv_after_body.0.weight" in state:
        resi_connection = "3conv"
    else:
        raise ValueError("a SwinIR state dict without 'conv_after_body.weight' or 'conv_after_body.0.weight'")
    upsampler, scale, num_feat = swinir_head(state, channels)
    hidden = shape_of(state, SWINIR_BLOCK.format(layer=0, block=0) + "mlp.fc1.weight", 2)[0]
    config = SwinIRConfig(
        in_channels=channels,
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=window,
        mlp_ratio=hidden / embed_dim,
        scale=scale,
        upsampler=upsampler,
        resi_connection=resi_connection,
        # NOTE: no key tells the input range; the released JPEG-artifact models, the only ones with a
        # window of 7, were trained on [0, 255] (spandrel's rule).
        img_range=255.0 if window == 7 else 1.0,
        num_feat=num_feat,
        qkv_bias=SWINIR_BLOCK.format(layer=0, block=0) + "attn.qkv.bias" in state,
        patch_norm="patch_embed.norm.weight" in state,
    )
    if not matches_model("swinir", config, state):
        return None
    return SRNetSpec("swinir", config, "swinir", state)


# -- public -----------------------------------------------------------------------------------------

DETECTORS = (detect_rrdbnet, detect_srvgg, detect_swinir)


def detect_sr_net(checkpoint: Mapping) -> Optional[SRNetSpec]:
    """The architecture, config and canonical state dict of an RRDBNet / SRVGG / SwinIR checkpoint.

    ``checkpoint``: what ``torch.load`` / ``safetensors.torch.load_file`` returned. None when no layout of
    these nets matches; ValueError when one matches but its keys or shapes are inconsistent.
    """
    state = unwrap_state_dict(checkpoint)
    if state is None:
        return None
    for detect in DETECTORS:
        spec = detect(state)
        if spec is not None:
            return spec
    return None


def build_sr_net(spec: SRNetSpec) -> SRNet:
    """The (randomly initialised) model of ``spec``; load ``spec.state_dict`` into it."""
    return ARCHITECTURES[spec.architecture](spec.config)


def sr_net_from_state_dict(checkpoint: Mapping) -> SRNet:
    """detect + build + load in one call, in eval mode; ValueError when no SR net is recognised."""
    spec = detect_sr_net(checkpoint)
    if spec is None:
        state = unwrap_state_dict(checkpoint) or checkpoint
        raise ValueError(f"no RRDBNet, SRVGG or SwinIR layout matches these keys: {list(state)[:6]}")
    model = build_sr_net(spec)
    model.load_state_dict(spec.state_dict)
    return model.eval()
