"""UNet2DCondition against diffusers' UNet2DConditionModel on random weights, small and full configs."""
import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from flashstep.models.attention import GEGLUProjection
from flashstep.models.configs import UNetConfig
from flashstep.models.unet import UNet2DCondition

pytestmark = pytest.mark.usefixtures("one_thread")

LOW_PRECISION = [torch.float16, torch.bfloat16]

# Small configs with every feature of their full counterpart: block kinds and order, conv or linear
# projections, heads per level, transformer depth per level, SDXL's text_time embedding.
SMALL_CONFIGS = {
    "sd15": UNetConfig(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
    "sd21_upcast": UNetConfig(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32,
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ),
    "sdxl": UNetConfig(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 2, 3),
        cross_attention_dim=40,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        norm_num_groups=8,
    ),
}

FULL_CONFIGS = {"sd15": UNetConfig.sd15, "sd21": UNetConfig.sd21, "sdxl": UNetConfig.sdxl}
# Published parameter counts (diffusers): SD1.5 859,520,964; SD2.x 865,910,724; SDXL 2,567,463,684.
FULL_PARAMETERS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}


def reference_factory(config):
    def build():
        model = UNet2DConditionModel(**config.to_diffusers())
        if config.upcast_attention:
            # diffusers' default SDPA processor ignores upcast_attention; this one computes q·kᵀ and softmax in fp32.
            model.set_attn_processor(AttnProcessor())
        return model

    return build


def make_inputs(config, batch, height, width, tokens, dtype, seed=0):
    """Inputs rounded to ``dtype`` once, so the fp32 runs see the same values."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, height, width, generator=generator).to(dtype),
        "timestep": torch.tensor([999, 261, 40][:batch]),
        "context": torch.randn(batch, tokens, config.cross_attention_dim, generator=generator).to(dtype),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, text_dim, generator=generator).to(dtype)
        size = [8 * height, 8 * width]
        inputs["time_ids"] = torch.tensor([size + [0, 0] + size] * batch, dtype=dtype)
    return inputs


def as_float(inputs):
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


def run_reference(model, inputs):
    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"],
                 added_cond_kwargs=added).sample


def run_ours(model, inputs):
    return model(inputs["sample"], inputs["timestep"], inputs["context"], inputs.get("text_embeds"), inputs.get("time_ids"))


@pytest.fixture(scope="module")
def small_models(parity):
    """name -> (diffusers reference, ours built normally and loaded with strict=True)."""
    models = {}
    for index, (name, config) in enumerate(SMALL_CONFIGS.items()):
        reference = parity.random_reference(reference_factory(config), seed=index)
        ours = UNet2DCondition(config)
        ours.load_state_dict(reference.state_dict(), strict=True)
        models[name] = (reference, ours)
    return models


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 10, 14)], ids=["16x16_batch2", "odd_10x14"])
def test_small_config_fp32(small_models, parity, name, shape):
    reference, ours = small_models[name]
    batch, height, width = shape
    inputs = make_inputs(SMALL_CONFIGS[name], batch, height, width, tokens=7, dtype=torch.float32)
    if batch == 1:
        inputs["timestep"] = 999.0  # a Python scalar, broadcast over the batch
    parity.assert_fp32_parity(run_ours(ours, inputs), run_reference(reference, inputs), f"unet {name} {shape}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_config_low_precision(small_models, parity, name, dtype):
    reference, _ = small_models[name]
    config = SMALL_CONFIGS[name]
    inputs = make_inputs(config, 2, 8, 8, tokens=7, dtype=dtype)
    expected = run_reference(reference, as_float(inputs))
    reference_low = parity.cast_copy(reference_factory(config), reference.state_dict(), dtype)
    ours_low = parity.ours_sharing(lambda: UNet2DCondition(config), reference_low.state_dict())
    parity.assert_low_precision_parity(run_ours(ours_low, inputs), expected, run_reference(reference_low, inputs),
                                       f"unet {name} {dtype}")


@pytest.fixture(scope="module")
def full_model(request, parity):
    """One full config at a time: (config, diffusers reference, ours sharing its weights)."""
    config = FULL_CONFIGS[request.param]()
    reference = parity.random_reference(reference_factory(config), seed=7)
    ours = parity.ours_sharing(lambda: UNet2DCondition(config), reference.state_dict())
    yield request.param, config, reference, ours
    del reference, ours


@pytest.mark.slow
@pytest.mark.parametrize("full_model", list(FULL_CONFIGS), indirect=True)
def test_full_config_fp32(full_model, parity):
    """The real configs at an 8×8 latent with 16 context tokens."""
    name, config, reference, ours = full_model
    inputs = make_inputs(config, 1, 8, 8, tokens=16, dtype=torch.float32, seed=3)
    parity.assert_fp32_parity(run_ours(ours, inputs), run_reference(reference, inputs), f"unet {name} full")


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_full_config_parameter_count_and_keys(name):
    config = FULL_CONFIGS[name]()
    with torch.device("meta"):
        ours = UNet2DCondition(config)
        reference = UNet2DConditionModel(**config.to_diffusers())
    assert sum(p.numel() for p in ours.parameters()) == FULL_PARAMETERS[name]
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_config_round_trips_through_diffusers(name):
    config = FULL_CONFIGS[name]()
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config.to_diffusers())
    assert UNetConfig.from_diffusers(dict(reference.config)) == config


def test_preset_values():
    sd15, sd21, sdxl = UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.sdxl()
    assert sd15.heads_per_block == (8, 8, 8, 8) and not sd15.use_linear_projection and sd15.cross_attention_dim == 768
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.heads_per_block)] == [64] * 4
    assert sd21.use_linear_projection and sd21.cross_attention_dim == 1024 and not sd21.upcast_attention
    assert sdxl.depth_per_block == (1, 2, 10) and sdxl.cross_attention_dim == 2048
    assert sdxl.projection_class_embeddings_input_dim == 1280 + 6 * sdxl.addition_time_embed_dim


def test_num_attention_heads_takes_precedence():
    config = dataclasses.replace(SMALL_CONFIGS["sd15"], attention_head_dim=3, num_attention_heads=(2, 4, 4))
    assert config.heads_per_block == (2, 4, 4)
    written = config.to_diffusers()
    assert written["attention_head_dim"] == [2, 4, 4] and written.get("num_attention_heads") is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"some_future_key": 1}, "unknown key"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "block types"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"transformer_layers_per_block": [[1, 1], [1, 2], [1, 1], [1, 1]]}, "transformer_layers_per_block"),
        ({"attention_head_dim": [5, 10, 20]}, "attention heads"),
    ],
)
def test_unsupported_configs_raise(change, message):
    config = UNetConfig.sd15().to_diffusers()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(config)


def test_default_valued_fixed_keys_are_accepted():
    config = UNetConfig.sd21().to_diffusers()
    config.update({"_class_name": "UNet2DConditionModel", "dropout": 0.0, "class_embed_type": None, "act_fn": "silu"})
    assert UNetConfig.from_diffusers(config) == UNetConfig.sd21()
    sdxl_file = dict(UNetConfig.sdxl().to_diffusers(), upcast_attention=None)  # as SDXL's config.json writes it
    assert UNetConfig.from_diffusers(sdxl_file) == UNetConfig.sdxl()


def test_text_time_unet_requires_text_embeds_and_time_ids(small_models):
    _, ours = small_models["sdxl"]
    inputs = make_inputs(SMALL_CONFIGS["sdxl"], 1, 8, 8, tokens=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="text_embeds"):
        ours(inputs["sample"], 999, inputs["context"])


def test_geglu_projection_runs_its_lora(small_models):
    """ff.net.0.proj is a LoRA host: an attached (unmerged) LoRA gives the merged weights' output."""
    _, ours = small_models["sd21_upcast"]
    config = SMALL_CONFIGS["sd21_upcast"]
    attached = UNet2DCondition(config)
    attached.load_state_dict(ours.state_dict())
    merged = UNet2DCondition(config)
    merged.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(5)
    hosts = [name for name, m in attached.named_modules() if isinstance(m, GEGLUProjection)]
    assert hosts and all(name.endswith("ff.net.0.proj") for name in hosts)
    for name in hosts:
        weight = dict(attached.named_modules())[name].weight
        down = torch.randn(4, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], 4, generator=generator) * 0.3
        dict(attached.named_modules())[name].attach_lora(down, up, 2.0)
        dict(merged.named_modules())[name].merge_lora(down, up, 2.0)
    inputs = make_inputs(config, 1, 8, 8, tokens=5, dtype=torch.float32)
    plain, with_lora = run_ours(ours, inputs), run_ours(attached, inputs)
    assert (plain - with_lora).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, run_ours(merged, inputs), atol=1e-4, rtol=1e-4)
