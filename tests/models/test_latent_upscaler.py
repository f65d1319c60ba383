"""The latent upscaler: its backbone + head against spandrel's SwinIR (pixelshuffle upsampler, in_chans = the
latent channels, img_range 1, zero mean) loaded with the same weights, its files (safetensors with the config
in the metadata, state dicts whose config is inferred), the errors on bad files, and any latent size.

Parity: ours(z, s) − interp_s(z) is spandrel's SwinIR ×s on z (max error ≤ 1e-4 × the output range in fp32);
in bf16 the whole output is within twice the error of spandrel's bf16 run plus the bf16 interpolation.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from spandrel.architectures.SwinIR import SwinIR as SpandrelSwinIR

from flashstep.models.latent_upscaler import (PRESETS, LatentUpscaler, LatentUpscalerConfig, infer_config,
                                              load_latent_upscaler, save_latent_upscaler)

SMALL = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4, mlp_ratio=2.0)
SPANDREL_HEAD = ("conv_before_upsample.", "upsample.", "conv_last.")
SPANDREL_BUFFERS = ("relative_position_index", "attn_mask")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """NOTE: the maps here are a few hundred pixels; a second intra-op thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spandrel_swinir(parity, scale: int, channels: int, seed: int) -> torch.nn.Module:
    model = SpandrelSwinIR(img_size=16, in_chans=channels, upscale=scale, upsampler="pixelshuffle", img_range=1.0,
                           embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=4, mlp_ratio=2.0)
    return parity.randomize_(model, seed).eval().requires_grad_(False)


def is_head_key(key: str) -> bool:
    return key.startswith(SPANDREL_HEAD)


def our_state(references: Dict[int, torch.nn.Module], keep_buffers: bool = False) -> Dict[str, torch.Tensor]:
    """Our keys from spandrel models that share one backbone: its keys as they are, each model's head under
    ``heads.x{s}.``; the attention buffers are dropped unless ``keep_buffers``."""
    first = next(iter(references.values()))
    state = {key: value for key, value in first.state_dict().items()
             if not is_head_key(key) and (keep_buffers or not key.endswith(SPANDREL_BUFFERS))}
    for scale, reference in references.items():
        head = {key: value for key, value in reference.state_dict().items() if is_head_key(key)}
        state.update({f"heads.x{scale}.{key}": value for key, value in head.items()})
    return state


def shared_backbone_references(parity, channels: int = 4) -> Dict[int, torch.nn.Module]:
    """spandrel ×2 and ×4 SwinIRs with one backbone (the ×2 model's) and their own random heads."""
    x2 = spandrel_swinir(parity, 2, channels, seed=0)
    x4 = spandrel_swinir(parity, 4, channels, seed=1)
    x4.load_state_dict({k: v for k, v in x2.state_dict().items() if not is_head_key(k)}, strict=False)
    return {2: x2, 4: x4}


def small_config(**overrides) -> LatentUpscalerConfig:
    return LatentUpscalerConfig(**{**SMALL, "num_feat": 64, "scales": (2, 4), **overrides})


def latent(batch: int, channels: int, height: int, width: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def randomized(parity, config: LatentUpscalerConfig, seed: int = 3) -> LatentUpscaler:
    return parity.randomize_(LatentUpscaler(config), seed).eval().requires_grad_(False)


# -- parity with spandrel's SwinIR ------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [4, 16])
def test_backbone_and_heads_match_spandrel_swinir(parity, channels):
    references = shared_backbone_references(parity, channels)
    model = LatentUpscaler(small_config(latent_channels=channels)).eval()
    model.load_state_dict(our_state(references), strict=True)
    z = latent(2, channels, 13, 9)
    for scale, reference in references.items():
        expected = reference(z)
        head = model(z, scale) - model.interpolate(z, scale)
        parity.assert_fp32_parity(head, expected, f"×{scale}, {channels} channels")


def test_bf16_within_twice_spandrel_error(parity):
    # NOTE: spandrel's SwinIR runs bf16 only at its training size (img_size 16): for other sizes it adds its
    # fp32 shift mask to bf16 scores.
    references = shared_backbone_references(parity)
    model = LatentUpscaler(small_config())
    model.load_state_dict(our_state(references), strict=True)
    model = model.eval().to(torch.bfloat16)
    assert LatentUpscaler.supports_bf16 and not LatentUpscaler.supports_fp16
    z = latent(1, 4, 16, 16)
    low = z.to(torch.bfloat16)
    for scale, reference in references.items():
        expected = reference(z) + F.interpolate(z, scale_factor=scale, mode="bicubic", align_corners=False)
        spandrel_low = copy.deepcopy(reference).to(torch.bfloat16)(low) + F.interpolate(
            low, scale_factor=scale, mode="bicubic", align_corners=False)
        ours = model(low, scale)
        parity.assert_low_precision_parity(ours, expected, spandrel_low, f"bf16 ×{scale}")


# -- the model on its own ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_untrained_heads_give_the_interpolated_latent(mode):
    model = LatentUpscaler(LatentUpscalerConfig(**{**vars(PRESETS["small"]), "residual_mode": mode})).eval()
    z = latent(1, 4, 8, 12)
    for scale in (2, 4):
        corners = {"align_corners": False} if mode == "bicubic" else {}
        expected = F.interpolate(z, scale_factor=scale, mode=mode, **corners)
        assert torch.equal(model(z, scale), expected)


@pytest.mark.parametrize("height,width", [(13, 9), (8, 8), (3, 5), (1, 17)])
def test_any_latent_size_batch_and_channels_last(parity, height, width):
    model = randomized(parity, LatentUpscalerConfig(**{**vars(PRESETS["small"]), "scales": (2, 4)}))
    z = latent(2, 4, height, width)
    for scale in (2, 4):
        out = model(z, scale)
        assert out.shape == (2, 4, height * scale, width * scale)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(z[1:], scale), out[1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(z.contiguous(memory_format=torch.channels_last), scale), out,
                                   atol=1e-5, rtol=1e-5)


def test_forward_rejects_other_scales_and_channels():
    model = LatentUpscaler(PRESETS["small"]).eval()
    with pytest.raises(ValueError, match=r"heads for \[2, 4\] only"):
        model(latent(1, 4, 8, 8), 3)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 16, 8, 8\)"):
        model(latent(1, 16, 8, 8), 2)


def test_config_round_trip_and_validation():
    config = LatentUpscalerConfig(latent_channels=16, scales=(4,), residual_mode="nearest", resi_connection="3conv")
    assert LatentUpscalerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert LatentUpscalerConfig.from_dict({"depths": [6, 6], "num_heads": [6, 6]}).depths == (6, 6)
    default = PRESETS["default"]
    assert (default.embed_dim, default.depths, default.num_heads, default.window_size, default.scales) == (
        180, (6, 6, 6, 6), (6, 6, 6, 6), 8, (2, 4))
    bad = [({"scales": (3,)}, "power of two"), ({"scales": (2, 2)}, "distinct"),
           ({"num_heads": (7, 6, 6, 6)}, "divisible"), ({"depths": (6,)}, "one length"),
           ({"residual_mode": "bilinear"}, "residual_mode"), ({"window_size": 1}, "window_size")]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            LatentUpscalerConfig(**overrides)
    with pytest.raises(ValueError, match=r"unknown latent upscaler config keys \['upscale'\]"):
        LatentUpscalerConfig.from_dict({"upscale": 2})


# -- files ------------------------------------------------------------------------------------------------

def assert_same_model(loaded: LatentUpscaler, original: LatentUpscaler) -> None:
    assert loaded.config == original.config
    expected = original.state_dict()
    ours = loaded.state_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_safetensors_round_trip_keeps_the_config(parity, tmp_path, mode):
    model = randomized(parity, LatentUpscalerConfig(**{**vars(PRESETS["small"]), "residual_mode": mode,
                                                      "resi_connection": "3conv", "scales": (2, 4, 8)}))
    path = tmp_path / "upscaler.safetensors"
    save_latent_upscaler(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["upscaler.safetensors"]
    loaded = load_latent_upscaler(path)
    assert_same_model(loaded, model)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    z = latent(1, 4, 7, 6)
    assert torch.equal(loaded(z, 8), model(z, 8))
    assert next(load_latent_upscaler(path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_state_dict_files_infer_the_config(parity, tmp_path):
    references = shared_backbone_references(parity)
    state_with_buffers = our_state(references, keep_buffers=True)
    assert any(key.endswith("relative_position_index") for key in state_with_buffers)
    expected = LatentUpscaler(small_config()).eval()
    expected.load_state_dict(our_state(references), strict=True)
    assert infer_config(state_with_buffers) == expected.config

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"params_ema": {"module." + key: value for key, value in state_with_buffers.items()}}, wrapped)
    assert_same_model(load_latent_upscaler(wrapped), expected)
    bare = tmp_path / "bare.safetensors"
    save_file({key: value.contiguous() for key, value in expected.state_dict().items()}, str(bare))
    assert_same_model(load_latent_upscaler(bare), expected)

    three_conv = randomized(parity, LatentUpscalerConfig(**{**vars(PRESETS["small"]), "resi_connection": "3conv",
                                                           "qkv_bias": False, "scales": (4,), "mlp_ratio": 1.5}))
    path = tmp_path / "three_conv.pth"
    torch.save(three_conv.state_dict(), path)
    assert_same_model(load_latent_upscaler(path), three_conv)


@pytest.fixture
def small_state(parity) -> Dict[str, torch.Tensor]:
    return randomized(parity, PRESETS["small"]).state_dict()


def save_pth(tmp_path, state, name="bad.pth") -> str:
    path = str(tmp_path / name)
    torch.save(state, path)
    return path


def test_bad_state_dicts_name_the_file_and_the_problem(tmp_path, small_state):
    missing = {k: v for k, v in small_state.items() if k != "heads.x4.conv_last.bias"}
    path = save_pth(tmp_path, missing)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*missing keys.*'heads\.x4\.conv_last\.bias'"):
        load_latent_upscaler(path)

    fc2 = "layers.1.residual_group.blocks.1.mlp.fc2.weight"
    path = save_pth(tmp_path, {**small_state, fc2: torch.zeros(24, 40)})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*{fc2}: file \(24, 40\), model \(24, 48\)"):
        load_latent_upscaler(path)

    table = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
    path = save_pth(tmp_path, {**small_state, table: torch.zeros(50, 2)})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: '{table}' has shape \(50, 2\)"):
        load_latent_upscaler(path)

    index = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    path = save_pth(tmp_path, {**small_state, index: torch.zeros(9, 9, dtype=torch.int64)})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: '{index}' has shape \(9, 9\), a window of 4"):
        load_latent_upscaler(path)

    path = save_pth(tmp_path, {k: v for k, v in small_state.items() if not k.startswith("heads.")})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*no upscaling head"):
        load_latent_upscaler(path)

    path = save_pth(tmp_path, {**small_state, "heads.x2.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*unexpected keys.*'heads\.x2\.extra\.weight'"):
        load_latent_upscaler(path)

    rrdb_like = {"conv_first.weight": torch.zeros(64, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(1)}
    path = save_pth(tmp_path, rrdb_like)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: not a latent upscaler state dict"):
        load_latent_upscaler(path)

    path = save_pth(tmp_path, {"params": [1, 2, 3]})
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: holds no state dict"):
        load_latent_upscaler(path)


def test_bad_metadata_and_unreadable_files(tmp_path, small_state):
    def with_metadata(metadata, name):
        path = str(tmp_path / name)
        save_file({k: v.contiguous() for k, v in small_state.items()}, path, metadata=metadata)
        return path

    config = PRESETS["small"].to_dict()
    path = with_metadata({"arch": "swinir", "config": json.dumps(config)}, "arch.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: the metadata says arch 'swinir', not 'latent_upscaler'"):
        load_latent_upscaler(path)
    path = with_metadata({"arch": "latent_upscaler", "config": "{embed_dim: 24"}, "json.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: the metadata's 'config' is not valid JSON"):
        load_latent_upscaler(path)
    path = with_metadata({"arch": "latent_upscaler", "config": json.dumps({**config, "upscale": 2})}, "key.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: the metadata's config is not usable: .*'upscale'"):
        load_latent_upscaler(path)
    wider = json.dumps({**config, "embed_dim": 48, "num_heads": [2, 2]})
    path = with_metadata({"arch": "latent_upscaler", "config": wider}, "shapes.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*conv_first\.weight: file \(24, 4, 3, 3\), "
                                         r"model \(48, 4, 3, 3\)"):
        load_latent_upscaler(path)

    missing = str(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(missing)}: no such file"):
        load_latent_upscaler(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=rf"{re.escape(str(garbage))}: not a checkpoint"):
        load_latent_upscaler(garbage)
