"""Real-ESRGAN / SwinIR files (params_ema / params / bare, .pth and .safetensors) through load_model,
against spandrel loading the same file."""
from __future__ import annotations

import math

import pytest
import torch
from reference_models import assert_matches
from safetensors.torch import save_file
from spandrel import ModelLoader
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from flashstep.loaders.detect import inspect_path
from flashstep.loaders.files import LoaderError
from flashstep.loaders.load_model import load_model
from flashstep.models.rrdbnet import RRDBNet, RRDBNetConfig


def _randomise(model, seed):
    """Weights ~ N(0, 1/fan_in) so that deep nets keep a useful signal; other tensors ~ N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        scale = 1 / math.sqrt(parameter[0].numel()) if parameter.dim() >= 2 else 0.1
        parameter.data.copy_(noise * scale)
    return model


def _compare_with_spandrel(path, arch, size=(11, 13)):
    ours = load_model(path)
    contents = inspect_path(path)
    assert contents.layout == "sr_net" and list(contents.components) == [arch]
    reference = ModelLoader().load_from_file(path).model.eval()
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
    assert_matches(ours(x), reference(x))
    return ours


def test_old_esrgan_layout_bare(tmp_path):
    model = _randomise(ESRGAN(num_filters=16, num_blocks=2, scale=4), 1)
    path = str(tmp_path / "esrgan_old.pth")
    torch.save(model.state_dict(), path)
    assert _compare_with_spandrel(path, "rrdbnet").scale == 4


def test_basicsr_params_ema_is_preferred(tmp_path):
    config = RRDBNetConfig(num_feat=16, num_block=2)  # spandrel assumes growth 32
    ema, plain = _randomise(RRDBNet(config), 2).state_dict(), _randomise(RRDBNet(config), 3).state_dict()
    path = str(tmp_path / "RealESRGAN_small.pth")
    torch.save({"params_ema": ema, "params": plain}, path)
    ours = _compare_with_spandrel(path, "rrdbnet")
    assert torch.equal(ours.state_dict()["conv_first.weight"], ema["conv_first.weight"])


def test_compact_params_in_safetensors(tmp_path):
    model = _randomise(Compact(num_feat=16, num_conv=4, upscale=4), 4)
    path = str(tmp_path / "realesr-general-small.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    _compare_with_spandrel(path, "srvgg")
    pth = str(tmp_path / "realesr-general-small.pth")
    torch.save({"params": model.state_dict()}, pth)
    _compare_with_spandrel(pth, "srvgg")


def test_swinir_params(tmp_path):
    model = _randomise(SwinIR(img_size=16, embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=4,
                              mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect", drop_path_rate=0.0), 5)
    path = str(tmp_path / "swinir_lightweight_small.pth")
    torch.save({"params": model.state_dict()}, path)
    assert "layers.0.residual_group.blocks.0.attn.relative_position_index" in model.state_dict()
    _compare_with_spandrel(path, "swinir", size=(12, 10))


@pytest.mark.slow
def test_full_realesrgan_x4plus(tmp_path):
    model = _randomise(RRDBNet(RRDBNetConfig()), 6)
    path = str(tmp_path / "RealESRGAN_x4plus.pth")
    torch.save({"params_ema": model.state_dict()}, path)
    ours = _compare_with_spandrel(path, "rrdbnet", size=(8, 8))
    assert ours.config == RRDBNetConfig()


def test_inconsistent_sr_file_is_named(tmp_path):
    state = _randomise(Compact(num_feat=16, num_conv=4, upscale=4), 4).state_dict()
    state["body.2.weight"] = torch.zeros(16, 8, 3, 3)
    path = str(tmp_path / "broken_compact.pth")
    torch.save({"params": state}, path)
    with pytest.raises(LoaderError) as error:
        load_model(path)
    assert "broken_compact.pth" in str(error.value) and "body.2.weight" in str(error.value)


def test_sr_arch_mismatch(tmp_path):
    path = str(tmp_path / "compact.pth")
    torch.save(_randomise(Compact(num_feat=16, num_conv=2, upscale=2), 7).state_dict(), path)
    with pytest.raises(LoaderError, match=r"compact.pth: holds \['srvgg'\] \(sr_net\), not 'swinir'"):
        load_model(path, arch="swinir")
    assert load_model(path, arch="srvgg").scale == 2
