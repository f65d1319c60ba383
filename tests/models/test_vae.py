"""AutoencoderKL against diffusers' AutoencoderKL on random weights: encode (mean, logvar) and decode."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from flashstep.models import layers
from flashstep.models.configs import VAEConfig
from flashstep.models.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")

LOW_PRECISION = [torch.float16, torch.bfloat16]

SMALL_CONFIG = VAEConfig(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
FULL_CONFIGS = {"sd": VAEConfig.sd, "sdxl": VAEConfig.sdxl}
SD_VAE_PARAMETERS = 83_653_863


def reference_factory(config):
    return lambda: DiffusersAutoencoderKL(**config.to_diffusers())


def reference_encode(model, x):
    posterior = model.encode(x).latent_dist
    return posterior.mean, posterior.logvar


def image_and_latent(config, height, width, dtype, seed=0):
    """An image in [-1, 1] (B, 3, H, W) and a latent (B, 4, H/f, W/f), rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    image = (torch.rand(1, config.in_channels, height, width, generator=generator) * 2 - 1).to(dtype)
    factor = config.downscale_factor
    latent = torch.randn(1, config.latent_channels, height // factor, width // factor, generator=generator).to(dtype)
    return image, latent


@pytest.fixture(scope="module")
def small_models(parity):
    reference = parity.random_reference(reference_factory(SMALL_CONFIG), seed=11)
    ours = AutoencoderKL(SMALL_CONFIG)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def check_fp32(parity, reference, ours, image, latent, label):
    mean, logvar = ours.encode(image)
    expected_mean, expected_logvar = reference_encode(reference, image)
    parity.assert_fp32_parity(mean, expected_mean, f"{label} encode mean")
    parity.assert_fp32_parity(logvar, expected_logvar, f"{label} encode logvar")
    parity.assert_fp32_parity(ours.decode(latent), reference.decode(latent).sample, f"{label} decode")


@pytest.mark.parametrize("size", [(32, 32), (24, 40)], ids=["32x32", "24x40"])
def test_small_config_fp32(small_models, parity, size):
    reference, ours = small_models
    image, latent = image_and_latent(SMALL_CONFIG, *size, torch.float32)
    check_fp32(parity, reference, ours, image, latent, f"vae small {size}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_small_config_low_precision(small_models, parity, dtype):
    reference, _ = small_models
    reference_low = parity.cast_copy(reference_factory(SMALL_CONFIG), reference.state_dict(), dtype)
    ours_low = parity.ours_sharing(lambda: AutoencoderKL(SMALL_CONFIG), reference_low.state_dict())
    image, latent = image_and_latent(SMALL_CONFIG, 32, 32, dtype)
    expected = reference_encode(reference, image.float())
    expected_low = reference_encode(reference_low, image)
    for name, ours_out, ref32, ref_low in zip(("mean", "logvar"), ours_low.encode(image), expected, expected_low):
        parity.assert_low_precision_parity(ours_out, ref32, ref_low, f"vae encode {name} {dtype}")
    parity.assert_low_precision_parity(ours_low.decode(latent), reference.decode(latent.float()).sample,
                                       reference_low.decode(latent).sample, f"vae decode {dtype}")


def test_logvar_is_clamped(small_models):
    reference, ours = small_models
    clamped = AutoencoderKL(SMALL_CONFIG)
    clamped.load_state_dict(ours.state_dict())
    latent_channels = SMALL_CONFIG.latent_channels
    with torch.no_grad():
        clamped.quant_conv.bias[latent_channels:] = 100.0
        clamped.quant_conv.bias[latent_channels + 1] = -100.0
    image, _ = image_and_latent(SMALL_CONFIG, 16, 16, torch.float32)
    _, logvar = clamped.encode(image)
    assert logvar[:, 0].eq(20.0).all() and logvar[:, 1].eq(-30.0).all()


def test_every_norm_is_a_flashstep_group_norm(small_models):
    """TiledVAE streams the VAE by its GroupNorm layers; a torch.nn.GroupNorm would escape it."""
    _, ours = small_models
    assert not [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert sum(isinstance(m, layers.GroupNorm) for m in ours.modules()) > 0


@pytest.fixture(scope="module")
def full_model(request, parity):
    config = FULL_CONFIGS[request.param]()
    reference = parity.random_reference(reference_factory(config), seed=13)
    ours = parity.ours_sharing(lambda: AutoencoderKL(config), reference.state_dict())
    yield request.param, config, reference, ours


@pytest.mark.slow
@pytest.mark.parametrize("full_model", list(FULL_CONFIGS), indirect=True)
def test_full_config_fp32(full_model, parity):
    """The real SD / SDXL VAE: encode a 32×32 image, decode a 4×4 latent."""
    name, config, reference, ours = full_model
    image, latent = image_and_latent(config, 32, 32, torch.float32, seed=2)
    check_fp32(parity, reference, ours, image, latent, f"vae {name} full")
    assert ours.scaling_factor == config.scaling_factor


def test_presets_and_parameter_count():
    sd, sdxl = VAEConfig.sd(), VAEConfig.sdxl()
    assert sd.scaling_factor == 0.18215 and sdxl.scaling_factor == 0.13025
    assert sdxl.force_upcast and not sd.force_upcast
    assert sd.downscale_factor == 8
    with torch.device("meta"):
        ours = AutoencoderKL(sd)
        reference = DiffusersAutoencoderKL(**sd.to_diffusers())
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMETERS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_config_round_trips_through_diffusers(name):
    config = FULL_CONFIGS[name]()
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**config.to_diffusers())
    assert VAEConfig.from_diffusers(dict(reference.config)) == config


def test_missing_keys_take_diffusers_defaults():
    """An SD 1.x vae/config.json names no scaling_factor or force_upcast: diffusers' defaults apply."""
    file_config = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    config = VAEConfig.from_diffusers(file_config)
    assert config.scaling_factor == 0.18215 and config.force_upcast
    assert config.block_out_channels == VAEConfig.sd().block_out_channels


@pytest.mark.parametrize("change", [{"use_quant_conv": False}, {"shift_factor": 0.1}, {"mid_block_add_attention": False},
                                    {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}])
def test_unsupported_configs_raise(change):
    config = VAEConfig.sd().to_diffusers()
    config.update(change)
    with pytest.raises(ValueError):
        VAEConfig.from_diffusers(config)
