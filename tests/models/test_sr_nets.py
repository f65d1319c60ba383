"""RRDBNet, SRVGGNetCompact and SwinIR against spandrel's own architectures, and their detection.

Each case builds spandrel's model with random weights, saves its state dict in the layout the public files
use (BasicSR keys under ``params_ema`` / ``params``, the old ESRGAN ``model.N`` keys, the BSRGAN keys, the
official SwinIR keys with their buffers), detects and builds our model from that dict alone, and compares
the outputs: fp32 within 1e-4 of the output range; fp16 (RRDBNet, SRVGG) and bf16 (SwinIR) within twice
spandrel's own error in that dtype (flashstep.testing.assert_error_within_torch). spandrel's ModelLoader
must find the same architecture and scale in the same dict.
"""
from __future__ import annotations

import copy
import io
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from spandrel import ModelLoader
from spandrel.architectures.Compact import Compact as SpandrelCompact
from spandrel.architectures.ESRGAN import ESRGAN as SpandrelRRDBNet
from spandrel.architectures.HAT import HAT as SpandrelHAT
from spandrel.architectures.Swin2SR import Swin2SR as SpandrelSwin2SR
from spandrel.architectures.SwinIR import SwinIR as SpandrelSwinIR

from flashstep.loaders.sr_nets import SRNetSpec, build_sr_net, detect_sr_net, sr_net_from_state_dict
from flashstep.models import rrdbnet, srvgg, swinir
from flashstep.models.rrdbnet import RRDBNet, RRDBNetConfig
from flashstep.models.srvgg import SRVGGConfig, SRVGGNetCompact
from flashstep.models.swinir import SwinIR, SwinIRConfig
from flashstep.testing import assert_error_within_torch

SPANDREL_IDS = {"rrdbnet": "ESRGAN", "srvgg": "Compact", "swinir": "SwinIR"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """NOTE: the feature maps here are tiny (7×9 … 64×64): intra-op threads only add synchronisation. On the
    shared 2-core test machine a 160→32 3×3 conv at 7×9 took 0.3 ms of CPU with one thread, 4 ms with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- random weights with useful magnitudes -------------------------------------------------------------

def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norms ~ 1 ± 0.1, PReLU slopes in [0, 0.3], and a
    relative position bias ~ N(0, 1) that changes the attention visibly (default inits hide index bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "relative_position_bias_table" in name:
                param.copy_(noise)
            elif param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(torch.rand(param.shape, generator=generator) * 0.3)
    return model.eval()


# -- the public key layouts, from spandrel's state dicts -------------------------------------------------

def esrgan_to_basicsr(state: Dict[str, torch.Tensor], num_upsample: int) -> Dict[str, torch.Tensor]:
    """spandrel's RRDBNet keeps the old ``model.N`` keys; BasicSR (Real-ESRGAN's files) names them."""
    top = {0: "conv_first", 3 * num_upsample + 2: "conv_hr", 3 * num_upsample + 4: "conv_last"}
    top.update({3 * k: f"conv_up{k}" for k in range(1, num_upsample + 1)})
    num_block = max(int(key.split(".")[3]) for key in state if key.startswith("model.1.sub."))
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("model.1.sub.") and int(parts[3]) < num_block:
            block, rdb, conv, kind = parts[3], parts[4][3:], parts[5][4:], parts[7]
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif key.startswith("model.1.sub."):
            renamed[f"conv_body.{parts[4]}"] = value
        else:
            renamed[f"{top[int(parts[1])]}.{parts[2]}"] = value
    return renamed


def basicsr_to_bsrgan(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """BSRGAN / RealSR files: RRDB_trunk.N.RDBk, trunk_conv, upconvK, HRconv."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("body."):
            _, block, rdb, rest = key.split(".", 3)
            key = f"RRDB_trunk.{block}.RDB{rdb[3:]}.{rest}"
        key = key.replace("conv_body.", "trunk_conv.").replace("conv_up", "upconv").replace("conv_hr.", "HRconv.")
        renamed[key] = value
    return renamed


def through_file(checkpoint: dict) -> dict:
    """torch.save + torch.load(weights_only=True), as a file on disk would be read."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- the cases ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    """spandrel's model, the public checkpoint made from it, and what detection must find."""

    name: str
    build: Callable[[], torch.nn.Module]
    checkpoint: Callable[[torch.nn.Module], dict]
    architecture: str
    config: object
    layout: str
    input_hw: Tuple[int, int]
    batch: int = 1

    def make(self, seed: int = 0) -> Tuple[torch.nn.Module, dict]:
        reference = randomize_(self.build(), seed)
        return reference, through_file(self.checkpoint(reference))


def rrdb(nf=16, nb=2, scale=4, shuffle=None, in_nc=3):
    return lambda: SpandrelRRDBNet(in_nc=in_nc, out_nc=3, num_filters=nf, num_blocks=nb, scale=scale,
                                   shuffle_factor=shuffle)


def basicsr(key: str, num_upsample: int = 2):
    return lambda model: {key: esrgan_to_basicsr(model.state_dict(), num_upsample)}


def compact(nf=16, nc=3, scale=4):
    return lambda: SpandrelCompact(num_in_ch=3, num_out_ch=3, num_feat=nf, num_conv=nc, upscale=scale)


def spandrel_swinir(**kwargs):
    defaults = dict(img_size=16, in_chans=3, embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=4,
                    mlp_ratio=2.0, img_range=1.0)
    return lambda: SpandrelSwinIR(**{**defaults, **kwargs})


def wrapped(key: Optional[str]):
    return lambda model: model.state_dict() if key is None else {key: model.state_dict()}


SMALL_SWINIR = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4)

SMALL_CASES = [
    Case("rrdb_x4_basicsr", rrdb(), basicsr("params_ema"), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=2), "basicsr", (13, 17)),
    Case("rrdb_x2_unshuffle", rrdb(in_nc=12, shuffle=2), basicsr("params"), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=2, unshuffle=2), "basicsr", (13, 17), batch=2),
    Case("rrdb_x1_unshuffle", rrdb(in_nc=48, shuffle=4), basicsr("params_ema"), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=2, unshuffle=4), "basicsr", (13, 10)),
    Case("rrdb_x4_old_esrgan", rrdb(nb=3), wrapped(None), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=3), "esrgan", (9, 11)),
    Case("rrdb_x1_old_esrgan_no_upsampling", rrdb(scale=1), wrapped(None), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=2, num_upsample=0), "esrgan", (9, 11)),
    Case("rrdb_x8_old_esrgan", rrdb(nb=1, scale=8), wrapped(None), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=1, num_upsample=3), "esrgan", (5, 7)),
    Case("rrdb_x4_bsrgan", rrdb(), lambda m: basicsr_to_bsrgan(esrgan_to_basicsr(m.state_dict(), 2)), "rrdbnet",
         RRDBNetConfig(num_feat=16, num_block=2), "bsrgan", (9, 11)),
    Case("srvgg_x4", compact(), wrapped("params"), "srvgg", SRVGGConfig(num_feat=16, num_conv=3), "compact", (13, 17)),
    Case("srvgg_x2", compact(scale=2, nc=2), wrapped("params_ema"), "srvgg",
         SRVGGConfig(num_feat=16, num_conv=2, scale=2), "compact", (13, 17), batch=2),
    Case("srvgg_x1", compact(scale=1, nc=1), wrapped(None), "srvgg",
         SRVGGConfig(num_feat=16, num_conv=1, scale=1), "compact", (7, 5)),
    Case("swinir_pixelshuffle_x2_stored_mask", spandrel_swinir(upscale=2, upsampler="pixelshuffle"), wrapped("params"),
         "swinir", SwinIRConfig(**SMALL_SWINIR, scale=2), "swinir", (13, 16)),
    Case("swinir_pixelshuffle_x3", spandrel_swinir(upscale=3, upsampler="pixelshuffle"), wrapped("params"),
         "swinir", SwinIRConfig(**SMALL_SWINIR, scale=3), "swinir", (13, 17)),
    Case("swinir_direct_x4", spandrel_swinir(upscale=4, upsampler="pixelshuffledirect"), wrapped("params"),
         "swinir", SwinIRConfig(**SMALL_SWINIR, scale=4, upsampler="pixelshuffledirect"), "swinir", (13, 17),
         batch=2),
    Case("swinir_nearest_x4_3conv", spandrel_swinir(upscale=4, upsampler="nearest+conv", resi_connection="3conv"),
         wrapped("params_ema"), "swinir",
         SwinIRConfig(**SMALL_SWINIR, scale=4, upsampler="nearest+conv", resi_connection="3conv"), "swinir", (13, 15)),
    Case("swinir_denoise_grey", spandrel_swinir(in_chans=1, upscale=1, upsampler=""), wrapped(None), "swinir",
         SwinIRConfig(**SMALL_SWINIR, in_channels=1, scale=1, upsampler=""), "swinir", (13, 17), batch=2),
    Case("swinir_jpeg_window7", spandrel_swinir(in_chans=1, window_size=7, img_size=14, img_range=255.0, upscale=1,
                                                upsampler=""), wrapped("params"), "swinir",
         SwinIRConfig(embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=7, in_channels=1, scale=1,
                      upsampler="", img_range=255.0), "swinir", (13, 17)),
]

SMALL = {case.name: case for case in SMALL_CASES}


def classical_swinir(scale: int, img_size: int):
    return spandrel_swinir(upscale=scale, img_size=img_size, window_size=8, embed_dim=180, depths=[6] * 6,
                           num_heads=[6] * 6, upsampler="pixelshuffle", resi_connection="1conv")


FULL_CASES = [
    Case("RealESRGAN_x4plus", rrdb(nf=64, nb=23), basicsr("params_ema"), "rrdbnet",
         rrdbnet.PRESETS["RealESRGAN_x4plus"], "basicsr", (12, 10)),
    Case("RealESRGAN_x2plus_old_layout", rrdb(nf=64, nb=23, in_nc=12, shuffle=2), wrapped(None), "rrdbnet",
         rrdbnet.PRESETS["RealESRGAN_x2plus"], "esrgan", (13, 17)),
    Case("RealESRGAN_x4plus_anime_6B", rrdb(nf=64, nb=6), basicsr("params_ema"), "rrdbnet",
         rrdbnet.PRESETS["RealESRGAN_x4plus_anime_6B"], "basicsr", (13, 17)),
    Case("realesr-general-x4v3", compact(nf=64, nc=32), wrapped("params"), "srvgg",
         srvgg.PRESETS["realesr-general-x4v3"], "compact", (24, 20)),
    Case("realesr-animevideov3", compact(nf=64, nc=16), wrapped("params"), "srvgg",
         srvgg.PRESETS["realesr-animevideov3"], "compact", (13, 17)),
    Case("swinir_classical_x2", classical_swinir(2, 64), wrapped("params"), "swinir",
         swinir.PRESETS["classical"], "swinir", (16, 16)),
    Case("swinir_classical_x4", classical_swinir(4, 48), wrapped("params"), "swinir",
         SwinIRConfig(scale=4), "swinir", (13, 17)),
    Case("swinir_lightweight_x4",
         spandrel_swinir(upscale=4, img_size=64, window_size=8, embed_dim=60, depths=[6] * 4, num_heads=[6] * 4,
                         upsampler="pixelshuffledirect"),
         wrapped("params"), "swinir", SwinIRConfig(**{**vars(swinir.PRESETS["lightweight"]), "scale": 4}), "swinir",
         (24, 20)),
    Case("swinir_real_sr_large_x4",
         spandrel_swinir(upscale=4, img_size=64, window_size=8, embed_dim=240, depths=[6] * 9, num_heads=[8] * 9,
                         upsampler="nearest+conv", resi_connection="3conv"),
         wrapped("params_ema"), "swinir", swinir.PRESETS["real_sr_large"], "swinir", (16, 16)),
]


def image(case: Case, channels: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((case.batch, channels) + case.input_hw, generator=generator)


def detect_and_load(case: Case, checkpoint: dict) -> Tuple[SRNetSpec, torch.nn.Module]:
    spec = detect_sr_net(checkpoint)
    assert spec is not None, f"{case.name}: not detected"
    assert (spec.architecture, spec.config, spec.layout) == (case.architecture, case.config, case.layout)
    model = build_sr_net(spec)
    model.load_state_dict(spec.state_dict)
    return spec, model.eval()


def check_fp32(case: Case, reference: torch.nn.Module, checkpoint: dict) -> None:
    spec, model = detect_and_load(case, checkpoint)
    descriptor = ModelLoader().load_from_state_dict(checkpoint)
    assert descriptor.architecture.id == SPANDREL_IDS[spec.architecture]
    assert descriptor.scale == spec.scale == model.scale
    x = image(case, model.input_channels)
    with torch.no_grad():
        expected = reference(x)
        out = model(x)
    height, width = case.input_hw
    assert out.shape == (case.batch, model.output_channels, height * spec.scale, width * spec.scale)
    error = (out - expected).abs().max().item()
    output_range = (expected.max() - expected.min()).item()
    assert error <= 1e-4 * output_range, f"{case.name}: max error {error:.3g}, output range {output_range:.3g}"


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_small_config_matches_spandrel(case):
    reference, checkpoint = case.make()
    check_fp32(case, reference, checkpoint)
    # the key renames of these tests are right when spandrel, reading the same file, matches its own model
    x = image(case, case.config.in_channels)
    with torch.no_grad():
        assert torch.equal(ModelLoader().load_from_state_dict(checkpoint).model.eval()(x), reference(x))


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: c.name)
def test_full_config_matches_spandrel(case):
    reference, checkpoint = case.make()
    check_fp32(case, reference, checkpoint)


# NOTE: spandrel's SwinIR runs bf16 only at its training size (img_size 16 here, inputs padded to 16×16):
# for other sizes it adds an fp32 mask to bf16 scores and fails in the next matmul.
LOW_PRECISION_CASES = [
    (SMALL["rrdb_x4_basicsr"], torch.float16),
    (SMALL["rrdb_x2_unshuffle"], torch.float16),
    (SMALL["srvgg_x4"], torch.float16),
    (SMALL["swinir_pixelshuffle_x2_stored_mask"], torch.bfloat16),
    (SMALL["swinir_nearest_x4_3conv"], torch.bfloat16),
]


@pytest.mark.parametrize("case,dtype", LOW_PRECISION_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_low_precision_within_twice_spandrel_error(case, dtype):
    reference, checkpoint = case.make()
    _, model = detect_and_load(case, checkpoint)
    assert (model.supports_fp16 if dtype == torch.float16 else model.supports_bf16)
    x = image(case, model.input_channels)
    with torch.no_grad():
        expected = reference(x)
        spandrel_low = copy.deepcopy(reference).to(dtype)(x.to(dtype))
        ours = model.to(dtype)(x.to(dtype))
    assert ours.dtype == dtype
    assert_error_within_torch(ours.float(), expected, spandrel_low.float(), label=f"{case.name} {dtype}")


# -- the models on their own ---------------------------------------------------------------------------------

def test_swinir_claims_bf16_only_and_rrdb_srvgg_both():
    assert not SwinIR.supports_fp16 and SwinIR.supports_bf16
    assert RRDBNet.supports_fp16 and RRDBNet.supports_bf16
    assert SRVGGNetCompact.supports_fp16 and SRVGGNetCompact.supports_bf16


@pytest.mark.parametrize("build", [
    lambda: RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, unshuffle=2)),
    lambda: SRVGGNetCompact(SRVGGConfig(num_feat=8, num_conv=1, scale=3)),
    lambda: SwinIR(SwinIRConfig(embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, scale=2)),
], ids=["rrdbnet", "srvgg", "swinir"])
def test_any_size_batch_and_channels_last(build):
    model = randomize_(build(), seed=3)
    x = torch.rand(2, 3, 7, 5)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3, 7 * model.scale, 5 * model.scale)
        assert torch.allclose(model(x[1:]), out[1:], atol=1e-5, rtol=1e-5)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(channels_last, out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 8, 8))


def test_swinir_tiny_image_is_padded_by_replication():
    model = randomize_(SwinIR(SwinIRConfig(embed_dim=8, depths=(2,), num_heads=(2,), window_size=8, scale=2)), 4)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 3, 9))
    assert out.shape == (1, 3, 6, 18) and torch.isfinite(out).all()


def test_meta_build_then_assign_load_matches():
    case = SMALL["swinir_nearest_x4_3conv"]
    reference, checkpoint = case.make()
    spec = detect_sr_net(checkpoint)
    with torch.device("meta"):
        model = build_sr_net(spec)
    model.load_state_dict(spec.state_dict, assign=True)
    x = image(case, 3)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference(x), atol=1e-4, rtol=1e-4)


# -- detection -----------------------------------------------------------------------------------------------

def small_rrdb_basicsr() -> Dict[str, torch.Tensor]:
    reference = randomize_(rrdb()(), 0)
    return esrgan_to_basicsr(reference.state_dict(), 2)


def test_unwrap_prefers_params_ema_and_strips_prefixes():
    state = small_rrdb_basicsr()
    other = {key: torch.zeros_like(value) for key, value in state.items()}
    spec = detect_sr_net({"params": other, "params_ema": state})
    assert torch.equal(spec.state_dict["conv_first.weight"], state["conv_first.weight"])
    for prefix in ("module.", "netG."):
        nested = {"state_dict": {prefix + key: value for key, value in state.items()}}
        assert detect_sr_net(nested).config == RRDBNetConfig(num_feat=16, num_block=2)
    assert detect_sr_net({"net": {"model": state}}).layout == "basicsr"


def test_unknown_layouts_give_none():
    state = small_rrdb_basicsr()
    assert detect_sr_net({"foo.weight": torch.zeros(3, 3)}) is None
    assert detect_sr_net({}) is None
    assert detect_sr_net({"params": {"conv_first.weight": torch.zeros(1), "epoch": 3}}) is None
    assert detect_sr_net({**state, "body.0.rdb1.conv1x1.weight": torch.zeros(32, 16, 1, 1)}) is None
    hat = SpandrelHAT(img_size=16, embed_dim=24, depths=(2,), num_heads=(2,), window_size=4, squeeze_factor=4,
                      upscale=2)
    assert detect_sr_net(hat.state_dict()) is None
    swin2sr = SpandrelSwin2SR(img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4, upscale=2,
                              upsampler="pixelshuffle")
    assert detect_sr_net(swin2sr.state_dict()) is None
    with pytest.raises(ValueError, match="no RRDBNet, SRVGG or SwinIR layout"):
        sr_net_from_state_dict({"foo.weight": torch.zeros(3, 3)})


def test_inconsistent_shapes_raise_naming_the_key_and_shapes():
    state = small_rrdb_basicsr()
    bad = {**state, "body.1.rdb2.conv3.weight": torch.zeros(32, 40, 3, 3)}
    with pytest.raises(ValueError, match=r"'body\.1\.rdb2\.conv3\.weight' has shape \(32, 40, 3, 3\).*\(32, 80, 3, 3\)"):
        detect_sr_net(bad)
    missing = {key: value for key, value in state.items() if key != "conv_hr.bias"}
    with pytest.raises(ValueError, match="conv_hr.bias"):
        detect_sr_net(missing)

    vgg = randomize_(compact()(), 0).state_dict()
    with pytest.raises(ValueError, match=r"'body\.8\.weight' has 40 output channels"):
        detect_sr_net({**vgg, "body.8.weight": torch.zeros(40, 16, 3, 3), "body.8.bias": torch.zeros(40)})

    reference, checkpoint = SMALL["swinir_pixelshuffle_x2_stored_mask"].make()
    table = "layers.1.residual_group.blocks.0.attn.relative_position_bias_table"
    with pytest.raises(ValueError, match=rf"'{re.escape(table)}' has shape \(50, 3\).*\(49, 3\)"):
        detect_sr_net({**checkpoint["params"], table: torch.zeros(50, 3)})
    index = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    with pytest.raises(ValueError, match=rf"'{re.escape(index)}' has shape \(9, 9\)"):
        detect_sr_net({**checkpoint["params"], index: torch.zeros(9, 9, dtype=torch.int64)})


def test_detection_drops_swinir_buffers_and_keeps_every_weight():
    reference, checkpoint = SMALL["swinir_pixelshuffle_x2_stored_mask"].make()
    spec = detect_sr_net(checkpoint)
    original = checkpoint["params"]
    dropped = set(original) - set(spec.state_dict)
    assert dropped and all(key.endswith(("relative_position_index", "attn_mask")) for key in dropped)
    assert set(spec.state_dict) == set(build_sr_net(spec).state_dict())

