"""diffusers / transformers folders: a pipeline with model_index.json, and single component folders in
every weight format (safetensors, .bin, fp16 variant, shards), old VAE attention names."""
from __future__ import annotations

import json
import os

import pytest
import torch
from reference_models import (assert_matches, clip_state, small_clip, small_unet, small_vae, unet_inputs, unet_ours,
                              unet_reference)
from safetensors.torch import save_file

from flashstep.loaders.detect import inspect_path
from flashstep.loaders.files import LoaderError
from flashstep.loaders.load_model import load_components, load_model


def _write_tokenizer(folder):
    """A tiny CLIP BPE vocabulary, saved by transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["!", "<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["ab</w>"]
    vocab_path, merges_path = os.path.join(folder, "src_vocab.json"), os.path.join(folder, "src_merges.txt")
    with open(vocab_path, "w") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\na b</w>\n")
    tokenizer = CLIPTokenizer(vocab_path, merges_path)
    tokenizer.save_pretrained(folder)
    os.remove(vocab_path)
    os.remove(merges_path)
    return tokenizer


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    """A small SDXL-like pipeline folder: unet, vae, text_encoder, text_encoder_2, two tokenizers, scheduler."""
    from diffusers import EulerDiscreteScheduler

    folder = tmp_path_factory.mktemp("pipeline")
    models = {"unet": small_unet("sdxl"), "vae": small_vae(), "text_encoder": small_clip(hidden=64),
              "text_encoder_2": small_clip(hidden=128, act="gelu", projection=True, seed=9)}
    for name, model in models.items():
        model.save_pretrained(str(folder / name))
    tokenizer = _write_tokenizer(str(folder / "tokenizer"))
    _write_tokenizer(str(folder / "tokenizer_2"))
    EulerDiscreteScheduler(timestep_spacing="trailing").save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "image_encoder": [None, None],
             "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder), models, tokenizer


def test_pipeline_folder(sdxl_pipeline):
    folder, refs, reference_tokenizer = sdxl_pipeline
    contents = inspect_path(folder)
    assert contents.layout == "diffusers_pipeline"
    assert set(contents.components) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    parts = load_components(folder)
    assert set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                          "scheduler_config"}
    assert parts["scheduler_config"]["timestep_spacing"] == "trailing"

    sample, context, extra = unet_inputs(refs["unet"])
    assert_matches(unet_ours(parts["unet"], sample, context, extra),
                   unet_reference(refs["unet"], sample, context, extra), "unet")
    z = torch.randn(1, 4, 4, 4)
    assert_matches(parts["vae"].decode(z), refs["vae"].decode(z).sample, "vae decode")
    ids = parts["tokenizer"](["ab c", "zz"])
    expected_ids = reference_tokenizer(["ab c", "zz"], padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids
    assert torch.equal(ids, expected_ids)
    ids[:, -1] = 2  # end tokens so that the legacy pooling has one to find
    assert_matches(parts["text_encoder"](ids), refs["text_encoder"](ids).last_hidden_state, "text_encoder")
    hidden, pooled = parts["text_encoder_2"](ids, pooled=True)
    reference = refs["text_encoder_2"](ids)
    assert_matches(hidden, reference.last_hidden_state, "text_encoder_2")
    assert_matches(pooled, reference.text_embeds, "text_encoder_2 pooled")


def test_pipeline_folder_needs_arch(sdxl_pipeline):
    folder = sdxl_pipeline[0]
    with pytest.raises(LoaderError, match=r"holds several components \['text_encoder', 'text_encoder_2', 'unet', "
                                          r"'vae'\]; pass arch="):
        load_model(folder)
    assert load_model(folder, arch="text_encoder_2").config.with_projection
    assert not load_model(folder, arch="text_encoder").config.with_projection


@pytest.mark.parametrize("variant", ["safetensors", "bin", "fp16", "sharded"])
def test_unet_component_folder(tmp_path, variant):
    unet = small_unet("sd1")
    folder = tmp_path / "unet"
    if variant == "safetensors":
        unet.save_pretrained(str(folder))
    elif variant == "bin":
        unet.save_pretrained(str(folder), safe_serialization=False)
        assert (folder / "diffusion_pytorch_model.bin").exists()
    elif variant == "fp16":
        unet.to(torch.float16).save_pretrained(str(folder), variant="fp16")
        unet.to(torch.float32)
        assert (folder / "diffusion_pytorch_model.fp16.safetensors").exists()
    else:
        unet.save_pretrained(str(folder), max_shard_size="1MB")
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_model(str(folder))
    if variant == "fp16":
        assert next(ours.parameters()).dtype == torch.float16
        ours = load_model(str(folder), dtype=torch.float32)
        unet = unet.to(torch.float16).to(torch.float32)
    sample, context, extra = unet_inputs(unet)
    assert_matches(unet_ours(ours, sample, context, extra), unet_reference(unet, sample, context, extra))


def test_weights_file_inside_a_component_folder_uses_its_config(tmp_path):
    clip = small_clip(hidden=128, act="quick_gelu")
    clip.save_pretrained(str(tmp_path / "text_encoder"))
    os.remove(tmp_path / "text_encoder" / "model.safetensors")
    path = str(tmp_path / "text_encoder" / "pytorch_model.bin")
    torch.save(clip_state(clip), path)  # the transformers 4 .bin layout
    contents = inspect_path(path)
    assert contents.components["text_encoder"].config_source.endswith("config.json")
    ours = load_model(path)
    assert ours.config.hidden_act == "quick_gelu"
    ids = torch.randint(3, 900, (2, 6))
    assert_matches(ours(ids), clip(ids).last_hidden_state)


def test_old_vae_attention_names(tmp_path):
    vae = small_vae()
    vae.save_pretrained(str(tmp_path / "vae"))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in vae.state_dict().items():
        for new, legacy in renames.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        old[key] = value.contiguous()
    assert "encoder.mid_block.attentions.0.query.weight" in old
    save_file(old, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    ours = load_model(str(tmp_path / "vae"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert_matches(ours.encode(x)[0], vae.encode(x).latent_dist.mean)


def test_unsupported_class_and_missing_weights(tmp_path):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(LoaderError, match=r"controlnet/config.json: class 'ControlNetModel' is not supported"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(LoaderError, match=r"controlnet: no weights; expected diffusion_pytorch_model.safetensors"):
        load_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LoaderError, match=r"controlnet/config.json: unreadable JSON"):
        load_model(str(folder))


def test_unsupported_config_value(tmp_path):
    unet = small_unet("sd2")
    unet.save_pretrained(str(tmp_path / "unet"))
    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["time_cond_proj_dim"] = 256
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoaderError, match=r"the unet config \(.*config.json\) is not supported: .*time_cond_proj_dim"):
        load_model(str(tmp_path / "unet"))


def test_bare_transformers5_clip_file(tmp_path):
    """transformers >= 5 saves CLIPTextModel without the text_model. level."""
    clip = small_clip(hidden=128, act="gelu")
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    assert not any(k.startswith("text_model.") for k in clip.state_dict())
    ids = torch.randint(3, 900, (1, 5))
    assert_matches(load_model(path)(ids), clip(ids).last_hidden_state)
    assert set(load_model(path).state_dict()) == set(clip_state(clip))
