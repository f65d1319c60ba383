"""One small file or folder of every layout the loaders read, for the detection test."""
from __future__ import annotations

import json

import torch
from reference_models import clip_state, small_clip, small_vae
from ldm_layout import vae_to_ldm
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact


def _save(path, state_dict):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def _conv_in_lora(prefix, down="lora_A", up="lora_B"):
    return {f"{prefix}.{down}.weight": torch.zeros(2, 4, 3, 3), f"{prefix}.{up}.weight": torch.zeros(64, 2, 1, 1)}


def _pickles(folder):
    unet_lora = {"conv_in.lora_A.default.weight": torch.zeros(32, 4, 3, 3),
                 "conv_in.lora_B.default.weight": torch.zeros(64, 32, 1, 1), "conv_in.weight": torch.zeros(64, 4, 3, 3)}
    vae_lora = {"quant_conv.lora_A.default_encoder.weight": torch.zeros(4, 8, 1, 1),
                "quant_conv.lora_B.default_encoder.weight": torch.zeros(8, 4, 1, 1)}
    osediff = {"unet_lora_encoder_modules": ["conv_in"], "unet_lora_decoder_modules": [],
               "unet_lora_others_modules": [], "vae_lora_encoder_modules": ["quant_conv"], "rank_unet": 32,
               "rank_vae": 4, "state_dict_unet": unet_lora, "state_dict_vae": vae_lora}
    s3diff = dict(osediff, unet_lora_target_modules=["conv"], vae_lora_target_modules="^encoder$", w=torch.zeros(64),
                  state_dict_unet_de_mlp={"0.weight": torch.zeros(256, 256), "0.bias": torch.zeros(256)},
                  state_dict_unet_fuse_mlp={"weight": torch.zeros(1024, 320), "bias": torch.zeros(1024)},
                  state_embeddings={})
    torch.save(osediff, str(folder / "osediff.pkl"))
    torch.save(s3diff, str(folder / "s3diff.pkl"))
    return str(folder / "osediff.pkl"), str(folder / "s3diff.pkl")


def write_every_layout(folder, unet_folder):
    """[(path, expected layout, expected component names)]"""
    vae = small_vae()
    ldm_vae = vae_to_ldm(vae.state_dict())
    peft_folder = folder / "peft_adapter"
    peft_folder.mkdir()
    _save(peft_folder / "adapter_model.safetensors", _conv_in_lora("base_model.model.conv_in"))
    vae.save_pretrained(str(folder / "pipeline" / "vae"))
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    osediff, s3diff = _pickles(folder)
    torch.save({"params": Compact(num_feat=8, num_conv=2, upscale=2).state_dict()}, str(folder / "compact.pth"))
    clip_l, clip_g = small_clip(hidden=64), small_clip(hidden=64, projection=True)
    return [
        (str(unet_folder), "diffusers_component", ["unet"]),
        (str(folder / "pipeline"), "diffusers_pipeline", ["vae"]),
        (_save(folder / "sd_vae.safetensors", {"first_stage_model." + k: v for k, v in ldm_vae.items()}),
         "single_file", ["vae"]),
        (_save(folder / "ldm_vae.safetensors", ldm_vae), "component_file", ["vae"]),
        (_save(folder / "clip.safetensors", clip_state(clip_l)), "component_file", ["text_encoder"]),
        (_save(folder / "clip_g.safetensors", clip_state(clip_g)), "component_file", ["text_encoder_2"]),
        (_save(folder / "lora.safetensors", _conv_in_lora("unet.conv_in")), "lora", []),
        (_save(folder / "kohya.safetensors", _conv_in_lora("lora_unet_conv_in", "lora_down", "lora_up")), "lora", []),
        (str(peft_folder), "lora", []),
        (osediff, "osediff", []),
        (s3diff, "s3diff", []),
        (str(folder / "compact.pth"), "sr_net", ["srvgg"]),
    ]
