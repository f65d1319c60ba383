"""LoRA files in the peft, diffusers and kohya styles -> LoRASpec.

The reference is peft itself: adapters injected into diffusers / transformers models, their B weights
randomised (peft's "gaussian" init leaves B at zero), merged by peft (``layer.merge()``). The file written
from those adapters in each style must give a LoRASpec whose merge ``W + scale · B · A`` equals peft's
merged weight, and flashstep's model with the LoRA applied must match the unmerged peft model.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from reference_models import (assert_matches, clip_state, small_clip, small_unet, unet_inputs, unet_ours,
                              unet_reference)
from ldm_layout import unet_to_ldm
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft_reference import check_spec_merges_like_peft, randomise_lora
from safetensors.torch import save_file

from flashstep.loaders.files import LoaderError
from flashstep.loaders.load_model import load_lora, load_model
from flashstep.loaders.lora_files import kohya_name_to_path, load_lora_components

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "conv", "time_emb_proj"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _lora_unet(kind="sd2", rank=4, alpha=None, targets=UNET_TARGETS):
    unet = small_unet(kind)
    base = copy.deepcopy(unet.state_dict())
    config = LoraConfig(r=rank, target_modules=targets, init_lora_weights="gaussian",
                        **({} if alpha is None else {"lora_alpha": alpha}))
    unet.add_adapter(config)
    randomise_lora(unet)
    return unet, base


def test_diffusers_style_without_alpha_is_scale_one(tmp_path):
    """diffusers' save_lora_weights layout: 'unet.' + peft names, no alpha -> alpha = r (diffusers' loader)."""
    unet, base = _lora_unet(rank=4, alpha=4)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file({"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}, path)
    spec = load_lora(path)
    assert {w.scale for w in spec.modules.values()} == {1.0}
    check_spec_merges_like_peft(spec, unet)

    ours = load_model(_save(tmp_path / "base.safetensors", base))
    ours.apply_lora(spec)
    sample, context, extra = unet_inputs(unet)
    assert_matches(unet_ours(ours, sample, context, extra), unet_reference(unet, sample, context, extra))


def _save(path, state_dict):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def test_diffusers_style_with_alpha_keys_and_old_lora_names(tmp_path):
    unet, _ = _lora_unet(rank=4, alpha=6)
    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module = key.rsplit(".lora_", 1)[0]
        role = "down" if ".lora_A." in key else "up"
        state[f"unet.{module}.lora.{role}.weight"] = value
        state[f"unet.{module}.alpha"] = torch.tensor(6.0)
    spec = load_lora(_save(tmp_path / "old_style.safetensors", state))
    assert {w.scale for w in spec.modules.values()} == {1.5}
    check_spec_merges_like_peft(spec, unet)


def test_attention_processor_style(tmp_path):
    unet, _ = _lora_unet(rank=2, alpha=2, targets=["to_q", "to_k", "to_v", "to_out.0"])
    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, target = re.match(r"(.*)\.(to_q|to_k|to_v|to_out\.0)\.lora_", key).groups()
        target = "to_out" if target == "to_out.0" else target
        role = "down" if ".lora_A." in key else "up"
        state[f"unet.{module}.processor.{target}_lora.{role}.weight"] = value
    spec = load_lora(_save(tmp_path / "processor_style.safetensors", state))
    check_spec_merges_like_peft(spec, unet)


def test_raw_peft_state_dict_uses_peft_default_alpha(tmp_path):
    """Adapter-name infix ('lora_A.default.weight') and no alpha: peft's LoraConfig default lora_alpha = 8."""
    unet, _ = _lora_unet(rank=4)
    state = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default." in k for k in state)
    path = str(tmp_path / "unet_lora.pth")
    torch.save(state, path)
    spec = load_lora(path)
    assert {w.scale for w in spec.modules.values()} == {2.0}
    check_spec_merges_like_peft(spec, unet)


def test_peft_folder_with_adapter_config(tmp_path):
    """PeftModel.save_pretrained: 'base_model.model.' keys, lora_alpha and alpha_pattern in adapter_config.json."""
    unet = small_unet("sd2")
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v", "conv1"],
                        alpha_pattern={"conv1": 2}, init_lora_weights="gaussian")
    model = get_peft_model(unet, config)
    randomise_lora(model)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    spec = load_lora(str(folder))
    scales = {path: w.scale for path, w in spec.modules.items()}
    assert {s for p, s in scales.items() if p.endswith("conv1")} == {0.5}
    assert {s for p, s in scales.items() if not p.endswith("conv1")} == {3.0}
    check_spec_merges_like_peft(spec, model, name_of=lambda path: path.replace("base_model.model.", ""))


def test_diffusers_metadata_gives_alpha(tmp_path):
    unet, _ = _lora_unet(rank=4, alpha=16)
    path = str(tmp_path / "with_metadata.safetensors")
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 16})}
    save_file({"unet." + k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, path, metadata)
    spec = load_lora(path)
    assert {w.scale for w in spec.modules.values()} == {4.0}
    check_spec_merges_like_peft(spec, unet)


def _kohya(state, prefix, name_of, alpha):
    out = {}
    for key, value in state.items():
        module = key.rsplit(".lora_", 1)[0]
        role = "lora_down" if ".lora_A." in key else "lora_up"
        stem = prefix + name_of(module).replace(".", "_")
        out[f"{stem}.{role}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def _lora_clip():
    """(peft CLIP model, its base state dict as released files name it, its LoRA under transformers' names)."""
    clip = small_clip(hidden=128, act="gelu")  # a bare CLIP file other than 768 wide is taken as OpenCLIP (gelu)
    clip_base = clip_state(clip)
    clip_model = get_peft_model(clip, LoraConfig(r=2, lora_alpha=3, target_modules=CLIP_TARGETS,
                                                 init_lora_weights="gaussian"))
    randomise_lora(clip_model, seed=12)
    clip_lora = {k.replace("base_model.model.", ""): v for k, v in get_peft_model_state_dict(clip_model).items()}
    return clip_model, clip_base, clip_lora


def test_text_encoder_lora_saved_by_transformers5(tmp_path):
    """diffusers layout 'text_encoder.<module>' where transformers >= 5 names modules without text_model."""
    clip_model, _, clip_lora = _lora_clip()
    assert any(k.startswith("encoder.layers.") for k in clip_lora)
    state = {"text_encoder." + k: v for k, v in clip_lora.items()}
    state.update({f"text_encoder.{k.rsplit('.lora_', 1)[0]}.alpha": torch.tensor(3.0) for k in clip_lora})
    spec = load_lora(_save(tmp_path / "te.safetensors", state))
    assert all(path.startswith("text_model.encoder.layers.") for path in spec.modules)
    check_spec_merges_like_peft(spec, clip_model, name_of=lambda p: "text_model." + p.replace("base_model.model.", ""))


def test_kohya_unet_and_text_encoder(tmp_path):
    unet, _ = _lora_unet(rank=4, alpha=3)
    clip_model, clip_base, clip_lora = _lora_clip()
    state = _kohya(get_peft_model_state_dict(unet), "lora_unet_", lambda m: m, 3)
    state.update(_kohya(clip_lora, "lora_te_", lambda m: m if m.startswith("text_model.") else "text_model." + m, 3))
    path = _save(tmp_path / "kohya.safetensors", state)
    specs = load_lora_components(path)
    assert set(specs) == {"unet", "text_encoder"}
    assert {w.scale for w in specs["unet"].modules.values()} == {0.75}
    assert {w.scale for w in specs["text_encoder"].modules.values()} == {1.5}
    check_spec_merges_like_peft(specs["unet"], unet)
    check_spec_merges_like_peft(specs["text_encoder"], clip_model,
                                 name_of=lambda p: "text_model." + p.replace("base_model.model.", ""))
    with pytest.raises(LoaderError, match=r"kohya.safetensors: holds LoRAs for \['text_encoder', 'unet'\]"):
        load_lora(path)
    assert load_lora(path, component="unet") is not None

    text_encoder = load_model(_save(tmp_path / "clip.safetensors", clip_base))
    text_encoder.apply_lora(specs["text_encoder"])
    ids = torch.randint(3, 900, (1, 7))
    assert_matches(text_encoder(ids), clip_model(ids).last_hidden_state)


def test_kohya_sdxl_names_in_the_sgm_layout(tmp_path):
    """SDXL kohya files name UNet modules like the original checkpoint: lora_unet_input_blocks_4_1_..."""
    unet, _ = _lora_unet(kind="sdxl", rank=4, alpha=4)
    plain = _plain_keys(unet)
    ldm_keys = list(unet_to_ldm({k: torch.zeros(1) for k in plain}, 2))
    ldm_of = {d[:-len(".weight")]: l[:-len(".weight")] for d, l in zip(plain, ldm_keys) if d.endswith(".weight")}
    state = _kohya(get_peft_model_state_dict(unet), "lora_unet_", lambda m: ldm_of[m], 4)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in state)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv") for k in state)  # upsampler after an attention
    spec = load_lora(_save(tmp_path / "sdxl_kohya.safetensors", state))
    check_spec_merges_like_peft(spec, unet)


def _plain_keys(model):
    """The model's state-dict keys as they are without peft's wrapping (base_layer removed, LoRA dropped)."""
    return [k.replace(".base_layer.", ".") for k in model.state_dict() if "lora_" not in k]


def test_kohya_name_to_path():
    assert kohya_name_to_path("down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert kohya_name_to_path("up_blocks_0_resnets_2_conv_shortcut") == "up_blocks.0.resnets.2.conv_shortcut"
    assert kohya_name_to_path("mid_block_resnets_1_time_emb_proj") == "mid_block.resnets.1.time_emb_proj"
    assert kohya_name_to_path("text_model_encoder_layers_11_self_attn_out_proj") == \
        "text_model.encoder.layers.11.self_attn.out_proj"
    assert kohya_name_to_path("input_blocks_1_0_in_layers_2") == "input_blocks.1.0.in_layers.2"


def test_conv_lora_b_is_out_r_1_1(tmp_path):
    unet, _ = _lora_unet(rank=3, alpha=3, targets=["conv1"])
    spec = load_lora(_save(tmp_path / "conv.safetensors",
                           {"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}))
    weights = spec.modules["down_blocks.0.resnets.0.conv1"]
    assert weights.down.shape == (3, 64, 3, 3) and weights.up.shape == (64, 3, 1, 1)


@pytest.mark.parametrize("problem, expected", [
    ("no_up", r"has no LoRA up \(B\) weight"),
    ("rank", r"has rank 4 but up \(B\) has shape \(64, 2\)"),
    ("dora", r"holds DoRA"),
    ("junk", r"keys that are not LoRA weights: \['unet.down_blocks.0.resnets.0.conv1.weight'"),
])
def test_lora_errors(tmp_path, problem, expected):
    state = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64),
             "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4)}
    if problem == "no_up":
        del state["unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"]
    elif problem == "rank":
        state["unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"] = torch.zeros(64, 2)
    elif problem == "dora":
        state["unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"] = torch.zeros(64)
    else:
        state["unet.down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    path = _save(tmp_path / f"bad_{problem}.safetensors", state)
    with pytest.raises(LoaderError, match=expected) as error:
        load_lora(path)
    assert f"bad_{problem}.safetensors" in str(error.value)


def test_lora_for_another_architecture_is_named(tmp_path):
    from flashstep.models.layers import apply_lora

    unet, base = _lora_unet(kind="sd2", rank=2, alpha=2, targets=["to_q"])
    spec = load_lora(_save(tmp_path / "l.safetensors",
                           {"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}))
    text_encoder = load_model(_save(tmp_path / "clip.safetensors", clip_state(small_clip(hidden=128))))
    with pytest.raises(ValueError, match="the LoRA names .* modules the model does not have"):
        apply_lora(text_encoder, spec)


def test_load_lora_rejects_a_model_file(tmp_path):
    path = _save(tmp_path / "clip.safetensors", clip_state(small_clip(hidden=128)))
    with pytest.raises(LoaderError, match=r"clip.safetensors: holds \['text_encoder'\] \(component_file\), not a LoRA"):
        load_lora(path)
    lora_path = _save(tmp_path / "lora.safetensors", {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                                                       "unet.conv_in.lora_B.weight": torch.zeros(64, 2, 1, 1)})
    with pytest.raises(LoaderError, match=r"lora.safetensors: holds a lora checkpoint, not a model"):
        load_model(lora_path)
