"""OSEDiff and S3Diff .pkl checkpoints, built the way the reference repositories build and save them.

OSEDiff (cswry/OSEDiff ``osediff.py``): peft adapters default_encoder / default_decoder / default_others
on the module lists of ``initialize_unet`` (conv_in included and trained in full), default_encoder on
the VAE encoder and quant_conv; ``state_dict_unet`` keeps the entries with "lora" or "conv_in".
S3Diff (ArcticHare105/S3Diff ``s3diff.py``): adapter "default" on the UNet suffix list, "vae_skip" on
the VAE-encoder regex, ranks 32 / 16, and the modulation MLPs (``save_model``).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_models import assert_matches, small_unet, small_vae, unet_inputs, unet_ours, unet_reference
from peft import LoraConfig
from peft_reference import check_spec_merges_like_peft, randomise_lora
from safetensors.torch import save_file
from torch import nn

from flashstep.loaders.adapters_pkl import OSEDiffAdapter, S3DiffAdapter
from flashstep.loaders.files import LoaderError
from flashstep.loaders.load_model import load_lora, load_model
from flashstep.testing import osediff_unet_modules, osediff_vae_modules

S3DIFF_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                       "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
S3DIFF_VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


def _save(path, state_dict):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)




@pytest.fixture(scope="module")
def osediff(tmp_path_factory):
    """(pkl path, base UNet file, base VAE file, peft UNet, peft VAE) of a small OSEDiff."""
    folder = tmp_path_factory.mktemp("osediff")
    unet, vae = small_unet("sd2"), small_vae()
    base_unet, base_vae = _save(folder / "unet.safetensors", unet.state_dict()), _save(folder / "vae.safetensors",
                                                                                     vae.state_dict())
    rank = 4
    encoder, decoder, others = osediff_unet_modules(unet)
    for adapter, modules in (("default_encoder", encoder), ("default_decoder", decoder), ("default_others", others)):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                         adapter_name=adapter)
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae_modules = osediff_vae_modules(vae)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_modules),
                    adapter_name="default_encoder")
    randomise_lora(unet, seed=21)
    randomise_lora(vae, seed=22)
    with torch.no_grad():
        unet.conv_in.base_layer.weight.add_(0.05 * torch.randn_like(unet.conv_in.base_layer.weight))
        unet.conv_in.base_layer.bias.add_(0.05)
    checkpoint = {
        "unet_lora_encoder_modules": encoder, "unet_lora_decoder_modules": decoder,
        "unet_lora_others_modules": others, "vae_lora_encoder_modules": vae_modules,
        "rank_unet": rank, "rank_vae": rank,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }
    assert "conv_in.base_layer.weight" in checkpoint["state_dict_unet"]
    assert "quant_conv.lora_A.default_encoder.weight" in checkpoint["state_dict_vae"]
    path = str(folder / "osediff.pkl")
    torch.save(checkpoint, path)
    return path, base_unet, base_vae, unet.eval(), vae.eval()


def test_osediff_adapter(osediff):
    path, _, _, unet, vae = osediff
    adapter = load_lora(path)
    assert isinstance(adapter, OSEDiffAdapter) and adapter.rank_unet == 4
    assert {w.scale for w in adapter.unet_lora.modules.values()} == {2.0}
    assert "conv_in" in adapter.unet_lora.modules and "quant_conv" in adapter.vae_lora.modules
    assert not any(p.startswith("decoder.") or p == "post_quant_conv" for p in adapter.vae_lora.modules)
    assert torch.equal(adapter.unet_weights["conv_in.weight"], unet.conv_in.base_layer.weight)
    check_spec_merges_like_peft(adapter.unet_lora, unet)
    check_spec_merges_like_peft(adapter.vae_lora, vae)


def test_osediff_merged_model_matches_peft(osediff):
    path, base_unet, base_vae, unet, vae = osediff
    adapter = load_lora(path)
    ours_unet, ours_vae = load_model(base_unet), load_model(base_vae)
    adapter.apply(ours_unet, ours_vae)
    sample, context, extra = unet_inputs(unet)
    assert_matches(unet_ours(ours_unet, sample, context, extra), unet_reference(unet, sample, context, extra), "unet")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    assert_matches(ours_vae.encode(x)[0], vae.encode(x).latent_dist.mean, "vae encoder")


def _linear_relu(features_in, features_out):
    return nn.Sequential(nn.Linear(features_in, features_out), nn.ReLU(True))


@pytest.fixture(scope="module")
def s3diff(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3diff")
    unet, vae = small_unet("sd2"), small_vae()
    base_unet, base_vae = _save(folder / "unet.safetensors", unet.state_dict()), _save(folder / "vae.safetensors",
                                                                                     vae.state_dict())
    rank_unet, rank_vae = 32, 16
    vae.add_adapter(LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=S3DIFF_VAE_TARGETS),
                    adapter_name="vae_skip")
    unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=S3DIFF_UNET_TARGETS))
    randomise_lora(unet, seed=31)
    randomise_lora(vae, seed=32)
    with torch.no_grad():
        unet.conv_in.weight.add_(0.05 * torch.randn_like(unet.conv_in.weight))
    torch.manual_seed(33)
    mlps = {"vae_de_mlp": _linear_relu(256, 256), "unet_de_mlp": _linear_relu(256, 256),
            "vae_block_mlp": _linear_relu(64, 64), "unet_block_mlp": _linear_relu(64, 64),
            "vae_fuse_mlp": nn.Linear(320, rank_vae ** 2), "unet_fuse_mlp": nn.Linear(320, rank_unet ** 2)}
    embeddings = {"vae": nn.Embedding(6, 64), "unet": nn.Embedding(10, 64)}
    w = nn.Parameter(torch.randn(64), requires_grad=False)
    checkpoint = {
        "unet_lora_target_modules": S3DIFF_UNET_TARGETS, "vae_lora_target_modules": S3DIFF_VAE_TARGETS,
        "rank_unet": rank_unet, "rank_vae": rank_vae,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k or "skip_conv" in k},
        **{f"state_dict_{name}": dict(module.state_dict()) for name, module in mlps.items()},
        "w": w,
        "state_embeddings": {"state_dict_vae_block": embeddings["vae"].state_dict(),
                             "state_dict_unet_block": embeddings["unet"].state_dict()},
    }
    path = str(folder / "s3diff.pkl")
    torch.save(checkpoint, path)
    return path, base_unet, base_vae, unet.eval(), vae.eval(), mlps, embeddings, w


def _reference_mixing(mlps, embeddings, w, scores):
    """The reference forward (s3diff_tile.py): degradation scores -> per-block r×r matrices."""
    deg_proj = scores[..., None] * w[None, None, :] * 2 * math.pi
    deg_proj = torch.cat([torch.sin(deg_proj), torch.cos(deg_proj)], dim=-1)
    deg_proj = torch.cat([deg_proj[:, 0], deg_proj[:, 1]], dim=-1)
    out = {}
    for branch in ("unet", "vae"):
        de = mlps[f"{branch}_de_mlp"](deg_proj)
        block = mlps[f"{branch}_block_mlp"](embeddings[branch].weight)
        out[branch] = mlps[f"{branch}_fuse_mlp"](torch.cat([de.unsqueeze(1).repeat(1, block.shape[0], 1),
                                                            block.unsqueeze(0).repeat(de.shape[0], 1, 1)], -1))
    return out


def _unet_block(name):
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return int(parts[1]) + 5
    return -1


def test_s3diff_adapter(s3diff):
    path, _, _, unet, vae, mlps, embeddings, w = s3diff
    adapter = load_lora(path)
    assert isinstance(adapter, S3DiffAdapter) and (adapter.rank_unet, adapter.rank_vae) == (32, 16)
    assert {w.scale for w in adapter.unet_lora.modules.values()} == {0.25}
    assert {w.scale for w in adapter.vae_lora.modules.values()} == {0.5}
    assert "conv_in" not in adapter.unet_lora.modules and "encoder.conv_in" in adapter.vae_lora.modules
    assert torch.equal(adapter.unet_weights["conv_in.weight"], unet.conv_in.weight)
    check_spec_merges_like_peft(adapter.unet_lora, unet)
    check_spec_merges_like_peft(adapter.vae_lora, vae)

    from flashstep.models.s3diff_modulation import S3DiffModulation

    modulation = S3DiffModulation(32, 16)
    modulation.load_state_dict(adapter.modulation_state_dict(), strict=True)
    scores = torch.rand(3, 2, generator=torch.Generator().manual_seed(9))
    unet_mix, vae_mix = modulation(scores)
    reference = _reference_mixing(mlps, embeddings, w, scores)
    assert_matches(unet_mix, reference["unet"].reshape(3, 10, 32, 32), "unet mixing")
    assert_matches(vae_mix, reference["vae"].reshape(3, 6, 16, 16), "vae mixing")


def test_s3diff_per_image_lora_matches_the_reference(s3diff):
    """Our UNet with the LoRA attached and each layer's r×r mix set equals the reference's modulated LoRA
    (my_lora_fwd: y = base(x) + s · B((A x) M)), written here as merged weights W + s · B · Mᵀ · A."""
    path, base_unet, _, unet, _, mlps, embeddings, w = s3diff
    adapter = load_lora(path)
    ours = load_model(base_unet)
    adapter.apply(ours, load_model(s3diff[2]))
    mix = _reference_mixing(mlps, embeddings, w, torch.tensor([[0.3, 0.7]]))["unet"].reshape(1, 10, 32, 32)

    reference = copy.deepcopy(unet)
    modules = dict(ours.named_modules())
    for name, module in reference.named_modules():
        if name in adapter.unet_lora.modules:
            m = mix[0, _unet_block(name)]
            weights = adapter.unet_lora.modules[name]
            down, up = weights.down.reshape(weights.down.shape[0], -1), weights.up.reshape(weights.up.shape[0], -1)
            base = module.get_base_layer()
            base.weight.data += (weights.scale * up @ m.t() @ down).reshape(base.weight.shape)
            modules[name].lora_mix = mix[:, _unet_block(name)]
    reference.disable_adapters()
    sample, context, extra = unet_inputs(unet)
    assert_matches(unet_ours(ours, sample, context, extra), unet_reference(reference, sample, context, extra))


def test_truncated_or_damaged_pkl(osediff, tmp_path):
    checkpoint = torch.load(osediff[0], weights_only=True)
    checkpoint["rank_unet"] = 8
    path = str(tmp_path / "wrong_rank.pkl")
    torch.save(checkpoint, path)
    with pytest.raises(LoaderError, match=r"wrong_rank.pkl: the file says rank_unet=8 but its unet LoRA weights "
                                          r"have rank \[4\]"):
        load_lora(path)
    checkpoint["rank_unet"] = 4
    checkpoint["state_dict_unet"]["time_embedding.linear_1.weight"] = torch.zeros(2)
    torch.save(checkpoint, path)
    with pytest.raises(LoaderError, match="neither LoRA nor conv_in"):
        load_lora(path)
    with pytest.raises(LoaderError, match=r"osediff.pkl: holds a osediff checkpoint, not a model"):
        load_model(osediff[0])
