"""load_model: arch selection, dtype, and the errors for weights that do not fit the model."""
from __future__ import annotations

import json

import pytest
import torch
from reference_models import assert_matches, small_unet, small_vae
from safetensors.torch import load_file, save_file

import flashstep
from flashstep.loaders.files import LoaderError, read_file
from flashstep.loaders.load_model import load_components, load_lora, load_model, load_weights
from flashstep.models.vae import AutoencoderKL


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    small_unet("sd2").save_pretrained(str(folder))
    return folder


def _edit_weights(folder, tmp_path, edit):
    """A copy of the component folder with its weights edited."""
    target = tmp_path / "edited"
    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    edit(state)
    save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    return str(target)


def test_public_api():
    assert flashstep.load_model is load_model and flashstep.load_lora is load_lora
    assert flashstep.loaders.load_components is load_components


def test_missing_keys(unet_folder, tmp_path):
    path = _edit_weights(unet_folder, tmp_path, lambda s: s.pop("conv_out.bias"))
    with pytest.raises(LoaderError) as error:
        load_model(path)
    message = str(error.value)
    assert "edited/diffusion_pytorch_model.safetensors" in message
    assert "missing keys the model needs: ['conv_out.bias'] (1 key)" in message


def test_unexpected_keys(unet_folder, tmp_path):
    def add(state):
        state["extra_head.weight"] = torch.zeros(3)
        state["extra_head.bias"] = torch.zeros(3)

    with pytest.raises(LoaderError, match=r"diffusion_pytorch_model.safetensors: the weights do not fit the unet .*"
                                          r"unexpected keys the model does not have: \['extra_head.bias', "
                                          r"'extra_head.weight'\] \(2 keys\)"):
        load_model(_edit_weights(unet_folder, tmp_path, add))


def test_shape_mismatch(unet_folder, tmp_path):
    def widen(state):
        state["conv_in.weight"] = torch.zeros(64, 5, 3, 3)

    with pytest.raises(LoaderError, match=r"shape mismatches \(1\): conv_in.weight: file \(64, 5, 3, 3\), "
                                          r"model \(64, 4, 3, 3\)"):
        load_model(_edit_weights(unet_folder, tmp_path, widen))


def test_config_that_does_not_match_the_weights(unet_folder, tmp_path):
    target = tmp_path / "unet"
    target.mkdir()
    config = json.loads((unet_folder / "config.json").read_text())
    config["layers_per_block"] = 1
    (target / "config.json").write_text(json.dumps(config))
    (target / "diffusion_pytorch_model.safetensors").write_bytes(
        (unet_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(LoaderError, match=r"unexpected keys the model does not have: \['down_blocks.0.attentions.1"):
        load_model(str(target))


def test_wrong_and_unknown_arch(unet_folder):
    with pytest.raises(LoaderError, match=r"holds \['unet'\] \(diffusers_component\), not 'vae'"):
        load_model(str(unet_folder), arch="vae")
    with pytest.raises(LoaderError, match=r"unknown arch 'unet2d'; expected one of \['unet', 'vae'"):
        load_model(str(unet_folder), arch="unet2d")


def test_dtype_and_device(unet_folder):
    model = load_model(str(unet_folder), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_same_dtype_weights_are_not_copied(tmp_path):
    """Loaded in the file's dtype on the CPU, every parameter is the memory-mapped tensor itself."""
    vae = small_vae()
    path = str(tmp_path / "vae.safetensors")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)
    config = load_model(path).config
    mapped = read_file(path)
    model = load_weights(lambda: AutoencoderKL(config), mapped, source=path, what="vae")
    state = model.state_dict()
    assert all(state[k].data_ptr() == mapped[k].data_ptr() for k in state)
    converted = load_weights(lambda: AutoencoderKL(config), mapped, source=path, what="vae", dtype=torch.float16)
    assert all(converted.state_dict()[k].data_ptr() != mapped[k].data_ptr() for k in state)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert_matches(load_model(path).encode(x)[0], vae.encode(x).latent_dist.mean)


def test_load_components_of_a_single_component(unet_folder):
    parts = load_components(str(unet_folder))
    assert list(parts) == ["unet"]


def test_detection_of_every_layout(tmp_path, unet_folder):
    """inspect_path tells each layout apart, with the components it holds."""
    from layout_samples import write_every_layout

    from flashstep.loaders.detect import inspect_path

    for path, layout, components in write_every_layout(tmp_path, unet_folder):
        contents = inspect_path(path)
        assert (contents.layout, sorted(contents.components)) == (layout, components), path
