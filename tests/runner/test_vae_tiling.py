"""TiledVAE: the streamed encoder and decoder equal the plain ones up to float rounding (no seams, no
brightness steps) for odd tiles, sizes that are not multiples of the tile, batch 2, every store kind, a
per-sample LoRA and budgets far below the untiled peak; a 4096² decode on the CPU stays within its budget."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashstep.models.configs import VAEConfig
from flashstep.models.vae import AutoencoderKL
from flashstep.runner import MemoryBudget, parse_memory
from flashstep.runner.vae_tiling import TiledVAE, conv_input_window, decoder_plan, plan_shapes
from flashstep.testing import randomize_
from flashstep.testing import assert_error_within_torch

SMALL = VAEConfig(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
BIG_BUDGET = MemoryBudget(1 << 30)
# Far below what the plain model needs on the test shapes (about 3 MB): maps go to disk, tiles are the
# minimum side, the attention runs in query bands.
TINY_BUDGET = MemoryBudget(64 * 1024)
RANGE_FRACTION = 1e-4
MIN_PSNR_DB = 60.0


@pytest.fixture(scope="module")
def vae():
    return randomize_(AutoencoderKL(SMALL), seed=3).eval()


def image(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def latent(batch, height, width, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SMALL.latent_channels, height, width, generator=generator)


def assert_matches(tiled: torch.Tensor, plain: torch.Tensor, label: str) -> None:
    assert tiled.shape == plain.shape, f"{label}: shape {tuple(tiled.shape)} != {tuple(plain.shape)}"
    value_range = (plain.max() - plain.min()).item()
    difference = (tiled.double() - plain.double())
    error = difference.abs().max().item()
    psnr = 20 * math.log10(value_range / max(difference.square().mean().sqrt().item(), 1e-30))
    assert error <= RANGE_FRACTION * value_range, (
        f"{label}: max error {error:.3g} exceeds {RANGE_FRACTION:g} x the range {value_range:.3g}"
    )
    assert psnr >= MIN_PSNR_DB, f"{label}: PSNR {psnr:.1f} dB < {MIN_PSNR_DB} dB"


def check_encode(vae, tiled_vae, x, label):
    with torch.no_grad():
        plain_mean, plain_logvar = vae.encode(x)
    mean, logvar = tiled_vae.encode(x)
    assert_matches(mean, plain_mean, f"{label} mean")
    assert_matches(logvar, plain_logvar, f"{label} logvar")


def check_decode(vae, tiled_vae, z, label):
    with torch.no_grad():
        plain = vae.decode(z)
    assert_matches(tiled_vae.decode(z), plain, f"{label} decode")


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (3, 2, 1), (1, 1, 0), (5, 1, 2)])
def test_a_conv_on_its_window_gives_the_slice_of_the_full_conv(kernel, stride, padding):
    length = 23
    x = torch.randn(1, 2, length)
    weight = torch.randn(3, 2, kernel)
    full = F.conv1d(x, weight, stride=stride, padding=padding)
    for start, stop in [(0, 4), (3, 7), (full.shape[-1] - 3, full.shape[-1])]:
        first, last, skip = conv_input_window(start, stop, kernel, stride, padding)
        window = F.pad(x[..., max(first, 0) : min(last, length)], (max(-first, 0), max(last - length, 0)))
        out = F.conv1d(window, weight, stride=stride, padding=padding)
        assert torch.allclose(out[..., skip : skip + stop - start], full[..., start:stop], atol=1e-5), (start, stop)


@pytest.mark.parametrize("tile", [7, 13])
@pytest.mark.parametrize("size", [(44, 60), (37, 29)], ids=["44x60", "37x29"])
def test_encode_equals_the_plain_encoder(vae, tile, size):
    check_encode(vae, TiledVAE(vae, BIG_BUDGET, tile=tile), image(2, *size), f"tile {tile} {size}")


@pytest.mark.parametrize("tile", [5, 11])
@pytest.mark.parametrize("size", [(7, 9), (5, 6)], ids=["7x9", "5x6"])
def test_decode_equals_the_plain_decoder(vae, tile, size):
    check_decode(vae, TiledVAE(vae, BIG_BUDGET, tile=tile), latent(2, *size), f"tile {tile} {size}")


@pytest.mark.parametrize("store", ["device", "host", "disk"])
def test_every_store_kind(vae, store, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    tiled = TiledVAE(vae, BIG_BUDGET, tile=9, store=store)
    check_encode(vae, tiled, image(2, 40, 48), f"{store} store")
    placed = {name: kind for name, kind in tiled.last_run.placements.items() if name not in ("input", "quant_conv")}
    assert set(placed.values()) == {store}
    check_decode(vae, tiled, latent(2, 6, 7), f"{store} store")
    assert os.listdir(tmp_path) == [], "the disk maps' directory was not removed"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_maps_on_disk(vae, dtype):
    """Half-precision maps survive the disk (bf16 as raw bits); error vs fp32 within 2x the plain decoder's."""
    low = copy.deepcopy(vae).to(dtype)
    z = latent(1, 6, 7)
    with torch.no_grad():
        reference, plain = vae.decode(z), low.decode(z.to(dtype))
    tiled = TiledVAE(low, BIG_BUDGET, tile=9, store="disk").decode(z.to(dtype))
    assert tiled.dtype == dtype
    assert_error_within_torch(tiled, reference, plain, label=f"{dtype} decode through disk maps")


def test_a_per_sample_lora_on_an_encoder_conv(vae):
    conv = vae.encoder.down_blocks[0].resnets[0].conv1
    generator = torch.Generator().manual_seed(5)
    rank, batch = 4, 2
    conv.attach_lora(torch.randn(rank, conv.in_channels, 3, 3, generator=generator) * 0.2,
                     torch.randn(conv.out_channels, rank, generator=generator) * 0.2, scale=1.0)
    conv.lora_mix = torch.randn(batch, rank, rank, generator=generator)
    try:
        x = image(batch, 36, 44)
        tiled = TiledVAE(vae, BIG_BUDGET, tile=10)
        check_encode(vae, tiled, x, "per-sample LoRA")
        with torch.no_grad():
            with_lora = vae.encode(x)[0]
            conv.lora_mix = None
            conv.detach_lora()
            without_lora = vae.encode(x)[0]
        assert (with_lora - without_lora).abs().max() > 1e-2, "the LoRA does not change the encoding"
    finally:
        conv.detach_lora()


def test_a_budget_far_below_the_untiled_peak(vae, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    x, z = image(2, 48, 40), latent(2, 6, 5)
    tiled = TiledVAE(vae, TINY_BUDGET)
    assert tiled.untiled_peak_bytes(x.shape, x.dtype) > 20 * TINY_BUDGET.bytes
    assert tiled.should_tile(x.shape, x.dtype) and tiled.should_tile(z.shape, z.dtype)
    check_encode(vae, tiled, x, "tiny budget")
    check_decode(vae, tiled, z, "tiny budget")
    record = tiled.last_run
    assert record.attention.endswith("query bands")
    assert "disk" in record.placements.values()
    # every map is freed after its last reader: at most a resnet's three maps of the widest level are live
    sizes = [math.prod(shape) * 4 for name, shape in plan_shapes(decoder_plan(vae), z.shape).items() if name != "input"]
    assert record.peak_bytes["disk"] <= 3 * max(sizes) < sum(sizes)
    assert os.listdir(tmp_path) == []


def test_should_tile_follows_the_budget(vae):
    generous, tight = TiledVAE(vae, BIG_BUDGET), TiledVAE(vae, MemoryBudget(4 * 2**20))
    assert not generous.should_tile((1, 3, 64, 64), torch.float32)
    assert not generous.should_tile((1, 4, 8, 8), torch.float32)
    assert tight.should_tile((1, 4, 64, 64), torch.float32)  # a 512² decode: 32 channels × 512² maps
    assert tight.should_tile((1, 3, 256, 256), torch.float32)
    assert tight.untiled_peak_bytes((1, 4, 64, 64), torch.float16) * 2 == pytest.approx(
        tight.untiled_peak_bytes((1, 4, 64, 64), torch.float32))
    with pytest.raises(ValueError, match="direction"):
        tight.should_tile((1, 5, 64, 64), torch.float32)


# Decodes a 4096² image on the CPU in a fresh process and reports its peak RSS: VmHWM, the high-water mark of
# its own address space (ru_maxrss would not do: Linux carries it over fork + exec from the parent, and the
# pytest process that starts this one may be many GiB by then).
# NOTE: 5 levels (latent 256², 16× down) rather than SD's 4 (latent 512²): the mid-block attention over
# 512² = 262144 tokens alone takes several minutes on 2 shared cores; at 256² it takes about 25 s. The
# full-resolution stages, where the memory goes, are those of SD's decoder at 8 channels.
BIG_DECODE = r"""
import json, sys, time
def status_bytes(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB
import torch
torch.set_num_threads(1)
from flashstep.models.configs import VAEConfig
from flashstep.models.vae import AutoencoderKL
from flashstep.runner import MemoryBudget
from flashstep.runner.vae_tiling import TiledVAE

levels, latent_side, budget = 5, 256, sys.argv[1]
config = VAEConfig(block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4,
                   down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
vae = AutoencoderKL(config).eval()
z = torch.randn(1, config.latent_channels, latent_side, latent_side)
tiled = TiledVAE(vae, MemoryBudget.for_device("cpu", budget))
rss_before = status_bytes("VmRSS")
start = time.perf_counter()
out = tiled.decode(z)
print(json.dumps({
    "seconds": time.perf_counter() - start, "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
    "rss_before": rss_before, "peak_rss": status_bytes("VmHWM"),
    "untiled_estimate": tiled.untiled_peak_bytes(z.shape, z.dtype), "should_tile": tiled.should_tile(z.shape, z.dtype),
    "kinds": sorted(set(tiled.last_run.placements.values())), "attention": tiled.last_run.attention,
}))
"""


@pytest.mark.slow
def test_a_4096_decode_on_the_cpu_stays_within_its_budget():
    budget = "1GB"
    done = subprocess.run([sys.executable, "-c", BIG_DECODE, budget], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    grown = result["peak_rss"] - result["rss_before"]
    print(f"\n4096² decode under --max-memory {budget}: {result['seconds']:.0f} s, peak RSS "
          f"{result['peak_rss'] / 2**30:.2f} GiB ({result['rss_before'] / 2**30:.2f} GiB before the decode, "
          f"+{grown / 2**30:.2f} GiB); the plain decoder needs about {result['untiled_estimate'] / 2**30:.2f} GiB; "
          f"maps in {result['kinds']}, attention {result['attention']}")
    assert result["shape"] == [1, 3, 4096, 4096] and result["finite"]
    assert result["should_tile"] and result["untiled_estimate"] > 2 * parse_memory(budget)
    assert "disk" in result["kinds"]
    assert grown <= parse_memory(budget), f"the decode grew the process by {grown / 2**30:.2f} GiB"
