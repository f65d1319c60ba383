"""Original single-file checkpoints (LDM / SGM / OpenCLIP key layouts).

1. The conversion alone: diffusers state dicts are written in the original layouts by the independent
   reverse mapping of ``ldm_layout.py``; diffusers' own offline converters must map that back to the
   original state dict (so the reverse mapping is right), and so must flashstep's.
2. Whole files: flashstep loads each component of an SD1 / SD2 / SDXL file and matches the diffusers /
   transformers model's output; the config comes from the keys and shapes alone.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_models import (assert_matches, clip_state, small_clip, small_unet, small_vae, unet_inputs, unet_ours,
                              unet_reference)
from diffusers.loaders import single_file_utils as diffusers_single_file
from ldm_layout import clip_to_openclip, unet_to_ldm, vae_to_ldm
from safetensors.torch import save_file

from flashstep.loaders import single_file
from flashstep.loaders.detect import inspect_path
from flashstep.loaders.files import LoaderError
from flashstep.loaders.load_model import load_components, load_model


def _same(converted, expected):
    assert set(converted) == set(expected), sorted(set(converted) ^ set(expected))[:6]
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_conversion_agrees_with_diffusers(kind):
    unet = small_unet(kind)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, layers_per_block=2)
    assert any(k.startswith("input_blocks.3.0.op.") for k in ldm)
    back = diffusers_single_file.convert_ldm_unet_checkpoint(
        {single_file.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    _same(back, state)
    _same(single_file.convert_unet(ldm), state)


def test_unet_conversion_with_one_layer_per_block():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=(1, 2, 2), use_linear_projection=True)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, layers_per_block=1)
    assert single_file.unet_layers_per_block(ldm) == 1
    _same(single_file.convert_unet(ldm), state)


def test_vae_conversion_agrees_with_diffusers():
    vae = small_vae()
    state = vae.state_dict()
    ldm = vae_to_ldm(state)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (128, 128, 1, 1)
    back = diffusers_single_file.convert_ldm_vae_checkpoint(
        {single_file.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    _same(back, state)
    _same(single_file.convert_vae(ldm), state)


def test_openclip_conversion_agrees_with_diffusers():
    """SDXL bigG (all layers, projection) through diffusers' converter and ours."""
    clip = small_clip(hidden=128, layers=3, act="gelu", projection=True)
    state = clip_state(clip)
    openclip = clip_to_openclip(state)
    prefix = single_file.SDXL_OPENCLIP_PREFIX
    back = diffusers_single_file.convert_open_clip_checkpoint(clip, {prefix + k: v for k, v in openclip.items()},
                                                              prefix=prefix)
    _same(back, state)
    _same(single_file.convert_openclip(openclip), state)


def test_sd2_openclip_drops_the_last_layer_and_the_projection():
    clip = small_clip(hidden=128, layers=3, act="gelu")
    state = clip_state(clip)
    openclip = clip_to_openclip(state, extra_layers=1)
    openclip["text_projection"] = torch.randn(128, 128)
    prefix = single_file.SD2_OPENCLIP_PREFIX
    back = diffusers_single_file.convert_open_clip_checkpoint(clip, {prefix + k: v for k, v in openclip.items()},
                                                              prefix=prefix)
    _same({k: v for k, v in back.items() if k in state}, state)
    split = single_file.split_single_file({prefix + k: v for k, v in openclip.items()})
    assert split.family == "sd2"
    _same(split.components["text_encoder"].state_dict, state)


def test_clip_l_conversion_agrees_with_diffusers():
    state = clip_state(small_clip())
    full = {single_file.SD1_CLIP_PREFIX + k: v for k, v in state.items()}
    full[single_file.SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    back = diffusers_single_file.convert_ldm_clip_checkpoint(full)
    _same({k: v for k, v in back.items() if not k.endswith("position_ids")}, state)
    _same(single_file.split_single_file(full).components["text_encoder"].state_dict, state)


def test_unknown_ldm_keys_are_named():
    ldm = unet_to_ldm(small_unet("sd2").state_dict(), layers_per_block=2)
    ldm["input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(single_file.KeyConversionError, match="input_blocks.1.0.mystery.weight"):
        single_file.convert_unet(ldm)
    refiner_encoder = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)}
    with pytest.raises(single_file.KeyConversionError, match="conditioner.embedders.0.model.ln_final.weight"):
        single_file.split_single_file(refiner_encoder)


# ------------------------------------------------------------------------------------------ whole files

def _ids(batch=2, length=9):
    ids = torch.randint(3, 900, (batch, length), generator=torch.Generator().manual_seed(4))
    ids[:, -1] = 999  # the end token has the largest id
    return ids


def build_single_file(kind: str):
    """(LDM-layout state dict, reference models) of a small SD1 / SD2 / SDXL checkpoint."""
    unet, vae = small_unet(kind), small_vae()
    ldm = {single_file.UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), 2).items()}
    ldm.update({single_file.VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict()).items()})
    refs = {"unet": unet, "vae": vae}
    if kind == "sd1":
        clip = small_clip(hidden=128, act="quick_gelu")
        ldm.update({single_file.SD1_CLIP_PREFIX + k: v for k, v in clip_state(clip).items()})
        refs["text_encoder"] = clip
    elif kind == "sd2":
        clip = small_clip(hidden=128, layers=2, act="gelu")
        openclip = clip_to_openclip(clip_state(clip), extra_layers=1)
        openclip["text_projection"] = torch.randn(128, 128)
        ldm.update({single_file.SD2_OPENCLIP_PREFIX + k: v for k, v in openclip.items()})
        refs["text_encoder"] = clip
    else:
        clip_l = small_clip(hidden=64, act="quick_gelu")
        bigg = small_clip(hidden=128, layers=3, act="gelu", projection=True, seed=7)
        ldm.update({single_file.SDXL_CLIP_PREFIX + k: v for k, v in clip_state(clip_l).items()})
        ldm.update({single_file.SDXL_OPENCLIP_PREFIX + k: v for k, v in clip_to_openclip(clip_state(bigg)).items()})
        refs["text_encoder"], refs["text_encoder_2"] = clip_l, bigg
    return ldm, refs


def _check_components(path, refs, kind):
    contents = inspect_path(path)
    assert contents.layout == "single_file" and set(contents.components) == set(refs)
    unet = load_model(path, arch="unet")
    sample, context, extra = unet_inputs(refs["unet"])
    assert_matches(unet_ours(unet, sample, context, extra), unet_reference(refs["unet"], sample, context, extra),
                   "unet")
    vae = load_model(path, arch="vae")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    posterior = refs["vae"].encode(x).latent_dist
    mean, logvar = vae.encode(x)
    assert_matches(mean, posterior.mean, "vae mean")
    assert_matches(logvar, posterior.logvar, "vae logvar")
    assert_matches(vae.decode(mean), refs["vae"].decode(posterior.mean).sample, "vae decode")
    assert vae.scaling_factor == (0.13025 if kind == "sdxl" else 0.18215)
    for name in [n for n in refs if n.startswith("text_encoder")]:
        encoder = load_model(path, arch=name)
        ids = _ids()
        reference = refs[name](ids)
        if name == "text_encoder_2":
            hidden, pooled = encoder(ids, pooled=True)
            assert_matches(pooled, reference.text_embeds, f"{name} pooled")
        else:
            hidden = encoder(ids)
        assert_matches(hidden, reference.last_hidden_state, name)
        expected_act = "gelu" if (kind == "sd2" or name == "text_encoder_2") else "quick_gelu"
        assert encoder.config.hidden_act == expected_act


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_safetensors_file(tmp_path, kind):
    ldm, refs = build_single_file(kind)
    path = str(tmp_path / f"{kind}.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    assert inspect_path(path).components["unet"].config_source.endswith(f"({kind})")
    _check_components(path, refs, kind)


def test_ckpt_wrapped_in_state_dict(tmp_path):
    """A training .ckpt: weights under "state_dict", with the DDPM buffers and a step count beside them."""
    ldm, refs = build_single_file("sd1")
    ldm["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    path = str(tmp_path / "v1.ckpt")
    torch.save({"state_dict": ldm, "global_step": 840000, "epoch": 3}, path)
    _check_components(path, refs, "sd1")
    parts = load_components(path)
    assert set(parts) == {"unet", "vae", "text_encoder"}


def test_several_components_need_arch(tmp_path):
    ldm, _ = build_single_file("sd2")
    path = str(tmp_path / "sd2.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    with pytest.raises(LoaderError, match=r"sd2.safetensors: holds several components \['text_encoder', 'unet', "
                                          r"'vae'\]; pass arch="):
        load_model(path)
    with pytest.raises(LoaderError, match=r"holds \['text_encoder', 'unet', 'vae'\] \(single_file\), not 'rrdbnet'"):
        load_model(path, arch="rrdbnet")


def test_bare_ldm_vae_file(tmp_path):
    vae = small_vae()
    path = str(tmp_path / "vae-ft-mse.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()}, path)
    contents = inspect_path(path)
    assert contents.layout == "component_file" and list(contents.components) == ["vae"]
    ours = load_model(path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert_matches(ours.encode(x)[0], vae.encode(x).latent_dist.mean)


# ------------------------------------------------------------------------------------ full SD 2.1 file

def _pooled_random(shapes, dtype=torch.float16):
    """Distinct values per tensor, cheaply: slices of one random pool at a per-tensor offset."""
    counts = {key: int(torch.Size(shape).numel()) for key, shape in shapes.items()}
    spare = 1 << 20
    pool = torch.randn(max(counts.values()) + spare, generator=torch.Generator().manual_seed(0)).to(dtype)
    return {key: pool[(index * 7919) % spare:][:counts[key]].reshape(shapes[key]).clone()
            for index, key in enumerate(sorted(shapes))}


@pytest.mark.slow
def test_full_sd21_single_file(tmp_path):
    """The full SD 2.1 file layout (865 M UNet, f8 VAE, OpenCLIP-H with its 24th layer and projection):
    every tensor lands on the right parameter and the configs are SD 2.1's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    from flashstep.models.configs import CLIPTextConfig, UNetConfig, VAEConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNetConfig.sd21().to_diffusers())
        vae = AutoencoderKL(**VAEConfig.sd().to_diffusers())
        clip = HFCLIPTextModel(HFCLIPTextConfig(**CLIPTextConfig.openclip_h().to_transformers()))
    shapes = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": clip_state(clip)}
    parts = {name: _pooled_random({k: v.shape for k, v in state.items()}) for name, state in shapes.items()}
    ldm = {single_file.UNET_PREFIX + k: v for k, v in unet_to_ldm(parts["unet"], 2).items()}
    ldm.update({single_file.VAE_PREFIX + k: v for k, v in vae_to_ldm(parts["vae"]).items()})
    openclip = clip_to_openclip(parts["text_encoder"], extra_layers=1)
    openclip["text_projection"] = torch.zeros(1024, 1024, dtype=torch.float16)
    ldm.update({single_file.SD2_OPENCLIP_PREFIX + k: v for k, v in openclip.items()})
    path = str(tmp_path / "v2-1_512-ema-pruned.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    del ldm, openclip

    loaded = load_components(path)
    assert loaded["unet"].config == UNetConfig.from_diffusers(UNetConfig.sd21().to_diffusers())
    assert loaded["vae"].config == VAEConfig.sd()
    # projection_dim is unused without the projection (SD 2.x's text encoder has none).
    text_config = loaded["text_encoder"].config
    assert text_config == dataclasses.replace(CLIPTextConfig.openclip_h(), projection_dim=text_config.projection_dim)
    for name, expected in parts.items():
        model = loaded[name]
        state = model.state_dict()
        assert set(state) == set(expected), (name, sorted(set(state) ^ set(expected))[:5])
        assert next(model.parameters()).dtype == torch.float16
        for key, value in expected.items():
            assert torch.equal(state[key], value), (name, key)
