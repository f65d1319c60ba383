"""The bundled default SR nets (python/flashstep/data): present, small, declaring their config, loading
into SRVGGNetCompact, computing the SRVGG formula, and beating bicubic on a held-out photo at ×4."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from flashstep.data import default_model_path, load_default_model
from flashstep.loaders import load_model
from flashstep.loaders.files import LoaderError
from flashstep.models.srvgg import SRVGGConfig, SRVGGNetCompact

SCALES = (2, 4)
MAX_TOTAL_BYTES = 5 * 1024 * 1024
MIN_GAIN_DB = 0.3
DEGRADATIONS_FILE = pathlib.Path(__file__).resolve().parent.parent / "tools" / "degradations.py"


def metadata_of(scale: int) -> dict:
    with safe_open(str(default_model_path(scale)), framework="pt") as handle:
        return handle.metadata()


def declared_config(scale: int) -> SRVGGConfig:
    metadata = metadata_of(scale)
    return SRVGGConfig(in_channels=int(metadata.get("in_channels", 3)), num_feat=int(metadata["num_feat"]),
                       num_conv=int(metadata["num_conv"]), scale=int(metadata["scale"]))


def srvgg_formula(model: SRVGGNetCompact, x: torch.Tensor) -> torch.Tensor:
    """f = PReLU(conv(x)), f = PReLU(conv(f)) × num_conv, y = pixel_shuffle(conv(f)) + nearest(x), in plain torch."""
    feat = x
    body = list(model.body)
    for conv, prelu in zip(body[0:-1:2], body[1:-1:2]):
        feat = F.prelu(F.conv2d(feat, conv.weight, conv.bias, padding=1), prelu.weight)
    last = body[-1]
    upscaled = F.pixel_shuffle(F.conv2d(feat, last.weight, last.bias, padding=1), model.scale)
    return upscaled + F.interpolate(x, scale_factor=model.scale, mode="nearest")


@pytest.mark.parametrize("scale", SCALES)
def test_file_declares_its_architecture(scale):
    path = default_model_path(scale)
    assert path.is_file(), f"{path} is missing"
    assert path.name == f"default_sr_x{scale}.safetensors"
    metadata = metadata_of(scale)
    assert metadata["arch"] == "srvgg"
    assert metadata["scale"] == str(scale)
    assert metadata["trained_by"] == "tools/train_default.py"
    assert int(metadata["seed"]) >= 0
    assert int(metadata["num_feat"]) > 0 and int(metadata["num_conv"]) >= 0


def test_files_fit_the_size_budget():
    total = sum(default_model_path(scale).stat().st_size for scale in SCALES)
    assert total <= MAX_TOTAL_BYTES, f"the bundled weights take {total} bytes, more than {MAX_TOTAL_BYTES}"


def test_only_x2_and_x4_are_bundled():
    with pytest.raises(ValueError, match="×2 and ×4"):
        default_model_path(3)


@pytest.mark.parametrize("scale", SCALES)
def test_loads_with_the_declared_config(scale):
    model = load_default_model(scale)
    assert isinstance(model, SRVGGNetCompact)
    assert model.config == declared_config(scale)
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    # The generic loader, which reads only keys and shapes, finds the same net.
    detected = load_model(str(default_model_path(scale)))
    assert isinstance(detected, SRVGGNetCompact) and detected.config == model.config


def test_loads_in_the_requested_dtype():
    model = load_default_model(4, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_rejects_a_file_that_declares_another_architecture(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    import flashstep.data as data

    tensors = {key: value.contiguous() for key, value in load_default_model(4).state_dict().items()}
    metadata = dict(metadata_of(4), arch="rrdbnet")
    path = tmp_path / "default_sr_x4.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    monkeypatch.setattr(data, "default_model_path", lambda scale: path)
    with pytest.raises(LoaderError, match="arch='rrdbnet'"):
        data.load_default_model(4)


@pytest.mark.parametrize("scale", SCALES)
def test_runs_on_a_small_image(scale):
    model = load_default_model(scale)
    x = torch.rand(2, 3, 13, 19)
    with torch.no_grad():
        y = model(x)
        expected = srvgg_formula(model, x)
    assert y.shape == (2, 3, 13 * scale, 19 * scale)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # A trained net stays near the input's range on a real-looking (smooth) image.
    smooth = F.interpolate(torch.rand(1, 3, 4, 4), size=(24, 24), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model(smooth)
    assert out.min() > -0.1 and out.max() < 1.1


def psnr(output: torch.Tensor, target: torch.Tensor, border: int) -> float:
    """On 8-bit RGB, a border of ``border`` pixels cropped."""
    def to_8bit(image: torch.Tensor) -> torch.Tensor:
        return (image.clamp(0, 1) * 255).round()[..., border:-border, border:-border]

    mse = float(((to_8bit(output) - to_8bit(target)) ** 2).mean())
    return 10 * np.log10(255.0**2 / mse)


def test_beats_bicubic_on_a_held_out_photo_x4(monkeypatch):
    """astronaut (never trained on, 512²), degraded to 128² by the evaluation model at a fixed seed."""
    skimage_data = pytest.importorskip("skimage.data")
    spec = importlib.util.spec_from_file_location("degradations", DEGRADATIONS_FILE)
    degradations = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "degradations", degradations)  # dataclasses look their module up there
    spec.loader.exec_module(degradations)

    scale = 4
    hr = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255  # (3, 512, 512)
    lr = degradations.degrade(hr, scale, torch.Generator().manual_seed(0), degradations.EVALUATION)  # (3, 128, 128)
    model = load_default_model(scale)
    with torch.no_grad():
        sr = model(lr[None])[0]
    bicubic = F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0]
    model_psnr, bicubic_psnr = psnr(sr, hr, scale), psnr(bicubic, hr, scale)
    assert model_psnr > bicubic_psnr + MIN_GAIN_DB, f"model {model_psnr:.2f} dB, bicubic {bicubic_psnr:.2f} dB"
