"""Spatial tiling: coverage, exact results for position-independent stages, blending, OOM retry, memory."""
import pytest
import torch
import torch.nn.functional as F

from flashstep.runner import MemoryBudget, parse_memory
from flashstep.runner.tiling import SpatialTiler, feather_window, tile_starts

BUDGET = MemoryBudget(1 << 30)


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (33, 32, 8), (32, 32, 8), (7, 32, 8), (257, 96, 32)])
def test_tiles_cover_the_length_and_end_at_the_border(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    assert starts[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("window", ["gaussian", "feather"])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_a_pointwise_stage_is_reproduced_exactly(window, scale):
    x = torch.randn(2, 3, 45, 38)

    def stage(x, gain):
        return F.interpolate(x, scale_factor=scale, mode="nearest") * gain

    tiler = SpatialTiler("x", scale=scale, tile=16, overlap=6, window=window)
    out = tiler.run(stage, {"x": x, "gain": 3.0}, budget=BUDGET)
    assert torch.allclose(out, stage(x, 3.0), atol=1e-5)


def test_small_inputs_run_whole():
    calls = []
    tiler = SpatialTiler("x", tile=64)
    tiler.run(lambda x: calls.append(x.shape) or x, {"x": torch.randn(1, 1, 40, 50)}, budget=BUDGET)
    assert calls == [torch.Size([1, 1, 40, 50])]


def test_feather_window_is_flat_where_there_is_no_neighbour():
    w = feather_window(10, 10, 4, (False, True, False, True))
    assert torch.all(w[0, :6] == 1) and w[-1, -1] < 0.2


def test_out_of_memory_halves_the_tile_and_says_so():
    sides, messages = [], []

    def stage(x):
        sides.append(x.shape[-1])
        if x.shape[-1] > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return x

    tiler = SpatialTiler("x", tile=64, overlap=8, minimum_tile=16)
    out = tiler.run(stage, {"x": torch.randn(1, 1, 100, 100)}, budget=BUDGET, on_retry=messages.append)
    assert out.shape == (1, 1, 100, 100) and min(sides) == 32
    assert messages == ["out of memory; retrying x with 32-pixel tiles"]


def test_tile_side_follows_the_budget():
    tiler = SpatialTiler("x", bytes_per_pixel=1024, multiple=8, minimum_tile=16)
    assert tiler.tile_side(MemoryBudget(1024 * 100 * 100)) == 96
    assert tiler.tile_side(MemoryBudget(1)) == 16


@pytest.mark.parametrize("text,expected", [("8GB", 8 << 30), ("512 MiB", 512 << 20), ("1.5g", int(1.5 * (1 << 30))), (4096, 4096)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "8 parsecs", 0])
def test_parse_memory_rejects_nonsense_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)
