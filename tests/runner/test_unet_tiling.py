"""TiledUNet: the UNet streamed layer by layer equals the plain UNet up to float rounding, for the SD 1.x
(conv projections), SD 2.x (linear projections) and SDXL (text_time embedding, depth 2-3 transformers, a
first level without attention) layouts; odd tiles, batch 2 with its own contexts, every store kind, a budget
far below the plain peak, half precision and a per-sample LoRA."""
import copy
import math
import os

import pytest
import torch

from flashstep.models.configs import UNetConfig
from flashstep.models.unet import UNet2DCondition
from flashstep.runner import MemoryBudget
from flashstep.runner.stream_steps import TransformerBlockStep, plan_shapes
from flashstep.runner.streaming import group_stats
from flashstep.runner.unet_tiling import TiledUNet, unet_plan
from flashstep import ops
from flashstep.testing import assert_error_within_torch, randomize_

# Small configs with every layout feature of SD 1.5, 2.1 and XL. Up-block resnets read [h, skip] of
# 64 + 32 = 96 channels in 8 groups of 12: one group spans both maps.
CONFIGS = {
    "sd15": UNetConfig(block_out_channels=(32, 64, 64),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8),
    "sd21": UNetConfig(block_out_channels=(32, 64, 64),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       attention_head_dim=(2, 4, 4), cross_attention_dim=32, use_linear_projection=True,
                       norm_num_groups=8),
    "sdxl": UNetConfig(block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=40,
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8),
}
BIG_BUDGET = MemoryBudget(1 << 30)
# Far below the plain UNet's activations on the test shapes (several MB): maps go to disk, tiles are the
# minimum side, attention runs in 1-row query bands.
TINY_BUDGET = MemoryBudget(64 * 1024)
RANGE_FRACTION = 1e-5
TIMESTEP = 999


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return request.param, randomize_(UNet2DCondition(CONFIGS[request.param]), seed=1).eval()


def inputs(config: UNetConfig, batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, height, width, generator=generator)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(batch, 16, generator=generator),
                 "time_ids": torch.rand(batch, 6, generator=generator) * 1024}
    return sample, context, extra


def assert_matches(tiled: torch.Tensor, plain: torch.Tensor, label: str) -> None:
    """max error ≤ 1e-5 of the range (fp32 sums in another order; the range is a few units)."""
    assert tiled.shape == plain.shape, f"{label}: shape {tuple(tiled.shape)} != {tuple(plain.shape)}"
    value_range = (plain.max() - plain.min()).item()
    error = (tiled.double() - plain.double()).abs().max().item()
    assert error <= RANGE_FRACTION * value_range, f"{label}: max error {error:.3g}, range {value_range:.3g}"


def check(unet, tiled_unet, sample, context, extra, label):
    with torch.no_grad():
        plain = unet(sample, TIMESTEP, context, **extra)
    assert_matches(tiled_unet(sample, TIMESTEP, context, **extra), plain, label)


@pytest.mark.parametrize("tile", [3, 7])
@pytest.mark.parametrize("size", [(24, 40), (8, 20)], ids=["24x40", "8x20"])
def test_equals_the_plain_unet(model, tile, size):
    name, unet = model
    sample, context, extra = inputs(unet.config, 2, *size)
    tiled = TiledUNet(unet, BIG_BUDGET, tile=tile)
    check(unet, tiled, sample, context, extra, f"{name} tile {tile} {size}")
    assert tiled.last_run.tiles > 20


def test_tiles_from_the_budget(model):
    name, unet = model
    sample, context, extra = inputs(unet.config, 1, 16, 24, seed=3)
    tiled = TiledUNet(unet, BIG_BUDGET)
    check(unet, tiled, sample, context, extra, f"{name} budget tiles")
    assert set(tiled.last_run.placements.values()) == {"host"}


@pytest.mark.parametrize("store", ["device", "host", "disk"])
def test_every_store_kind(store, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=2).eval()
    sample, context, extra = inputs(unet.config, 2, 16, 12, seed=4)
    tiled = TiledUNet(unet, BIG_BUDGET, tile=5, store=store)
    check(unet, tiled, sample, context, extra, f"{store} store")
    placed = {kind for name, kind in tiled.last_run.placements.items() if name not in ("input", "conv_out")}
    assert placed == {store}
    assert os.listdir(tmp_path) == [], "the disk maps' directory was not removed"


def test_a_budget_far_below_the_plain_peak(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    unet = randomize_(UNet2DCondition(CONFIGS["sd15"]), seed=3).eval()
    sample, context, extra = inputs(unet.config, 2, 24, 16, seed=5)
    tiled = TiledUNet(unet, TINY_BUDGET)
    assert tiled.untiled_peak_bytes(sample.shape, sample.dtype) > 20 * TINY_BUDGET.bytes
    check(unet, tiled, sample, context, extra, "tiny budget")
    record = tiled.last_run
    assert record.attention == "1-row query bands"
    assert "disk" in record.placements.values()
    # maps are freed after their last reader, but the skips wait for the up path
    shapes = plan_shapes(unet_plan(unet, None, None), sample.shape)
    sizes = [math.prod(shape) * 4 for name, shape in shapes.items() if name != "input"]
    assert max(sizes) * 3 < record.peak_bytes["disk"] < sum(sizes) / 2
    assert os.listdir(tmp_path) == []


def test_the_plain_peak_estimate_grows_with_the_latent_and_counts_the_skips():
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=0).eval()
    small = TiledUNet(unet, BIG_BUDGET).untiled_peak_bytes((1, 4, 16, 16), torch.float32)
    large = TiledUNet(unet, BIG_BUDGET).untiled_peak_bytes((1, 4, 32, 32), torch.float32)
    assert large == pytest.approx(4 * small, rel=0.01)
    assert TiledUNet(unet, BIG_BUDGET).untiled_peak_bytes((1, 4, 16, 16), torch.float16) * 2 == small
    steps = unet_plan(unet, None, None)
    shapes = plan_shapes(steps, (1, 4, 16, 16))
    widest_step = max(step.untiled_bytes(shapes, 4) for step in steps)
    skips = 4 * sum(math.prod(shapes[name]) for name in ("conv_in", "down_blocks.0.attentions.0"))
    assert small >= widest_step + skips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_through_disk_maps(dtype):
    """Error against the fp32 UNet within 2× the plain UNet's own in that precision."""
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=4).eval()
    low = copy.deepcopy(unet).to(dtype)
    sample, context, _ = inputs(unet.config, 1, 16, 8, seed=6)
    with torch.no_grad():
        reference = unet(sample, TIMESTEP, context)
        plain = low(sample.to(dtype), TIMESTEP, context.to(dtype))
    tiled = TiledUNet(low, BIG_BUDGET, tile=6, store="disk")(sample.to(dtype), TIMESTEP, context.to(dtype))
    assert tiled.dtype == dtype
    assert_error_within_torch(tiled, reference, plain, label=f"{dtype} UNet through disk maps")


def test_a_per_sample_lora_on_a_resnet_conv_and_an_attention_projection():
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=5).eval()
    conv = unet.down_blocks[1].resnets[0].conv1
    query = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    generator = torch.Generator().manual_seed(5)
    rank, batch = 4, 2
    conv.attach_lora(torch.randn(rank, conv.in_channels, 3, 3, generator=generator) * 0.2,
                     torch.randn(conv.out_channels, rank, generator=generator) * 0.2, scale=1.0)
    query.attach_lora(torch.randn(rank, query.in_features, generator=generator) * 0.2,
                      torch.randn(query.out_features, rank, generator=generator) * 0.2, scale=1.0)
    for layer in (conv, query):
        layer.lora_mix = torch.randn(batch, rank, rank, generator=generator)
    sample, context, extra = inputs(unet.config, batch, 16, 16, seed=7)
    try:
        check(unet, TiledUNet(unet, BIG_BUDGET, tile=6), sample, context, extra, "per-sample LoRA")
        with torch.no_grad():
            with_lora = unet(sample, TIMESTEP, context)
            for layer in (conv, query):
                layer.lora_mix = None
                layer.detach_lora()
            without_lora = unet(sample, TIMESTEP, context)
        assert (with_lora - without_lora).abs().max() > 1e-2, "the LoRA does not change the output"
    finally:
        conv.detach_lora()
        query.detach_lora()


def test_transformer_blocks_attend_to_the_whole_latent():
    """A change in one corner of the latent reaches the opposite corner through the first self-attention
    (the conv receptive field of conv_in + one resnet is 5 pixels): the streamed run sees it as the plain
    one does."""
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=6).eval()
    sample, context, _ = inputs(unet.config, 1, 16, 16, seed=8)
    steps = unet_plan(unet, None, None)
    assert sum(isinstance(step, TransformerBlockStep) for step in steps) == 4 + 1 + 6  # down, mid, up
    changed = sample.clone()
    changed[..., :2, :2] += 3
    tiled = TiledUNet(unet, BIG_BUDGET, tile=4)
    far = (tiled(changed, TIMESTEP, context) - tiled(sample, TIMESTEP, context))[..., -3:, -3:]
    with torch.no_grad():
        plain = unet(sample, TIMESTEP, context)
        plain_far = (unet(changed, TIMESTEP, context) - plain)[..., -3:, -3:]
    tolerance = RANGE_FRACTION * (plain.max() - plain.min()).item()
    assert plain_far.abs().max() > 100 * tolerance
    assert (far - plain_far).abs().max() <= tolerance


def test_group_statistics_spanning_two_maps_equal_those_of_their_concatenation():
    generator = torch.Generator().manual_seed(9)
    first, second = torch.randn(2, 64, 5, 7, generator=generator), torch.randn(2, 32, 5, 7, generator=generator) * 3
    parts = [tuple(t.double() for t in ops.group_norm_moments(x, x.shape[1])) for x in (first, second)]
    mean, rstd = group_stats(parts, 8, 1e-5)
    grouped = torch.cat([first, second], dim=1).double().reshape(2, 8, -1)
    torch.testing.assert_close(mean, grouped.mean(-1).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rstd, torch.rsqrt(grouped.var(-1, unbiased=False) + 1e-5).float(), atol=0, rtol=1e-5)


def test_latent_sides_must_be_multiples_of_the_downsampling():
    unet = randomize_(UNet2DCondition(CONFIGS["sd15"]), seed=0).eval()
    sample, context, _ = inputs(unet.config, 1, 10, 16)
    with pytest.raises(ValueError, match="multiples of 4, got 10×16; pad the latent"):
        TiledUNet(unet, BIG_BUDGET, tile=4)(sample, TIMESTEP, context)


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["device", "host"])
def test_on_the_gpu_in_fp16(store):
    """Maps on the GPU or in host RAM; error against the fp32 UNet within 2× the plain fp16 UNet's own."""
    unet = randomize_(UNet2DCondition(CONFIGS["sd21"]), seed=7).eval().cuda()
    low = copy.deepcopy(unet).half()
    sample, context, _ = inputs(unet.config, 2, 32, 24, seed=10)
    sample, context = sample.cuda(), context.cuda()
    with torch.no_grad():
        reference = unet(sample, TIMESTEP, context)
        plain = low(sample.half(), TIMESTEP, context.half())
    tiled = TiledUNet(low, BIG_BUDGET, tile=8, store=store)(sample.half(), TIMESTEP, context.half())
    assert tiled.device.type == "cuda" and tiled.dtype == torch.float16
    assert_error_within_torch(tiled, reference, plain, label=f"fp16 UNet, {store} maps")
