"""Pixel SR in feathered tiles against the same pipeline untiled: the bundled ×4 net and a random RRDBNet
(whose receptive field, ~35 input pixels, is wider than the 16-pixel overlap), at two tile sizes."""
from __future__ import annotations

import pytest
import torch

import flashstep
from flashstep.models.rrdbnet import RRDBNet, RRDBNetConfig
from flashstep.pipelines.pixel_sr import TILE_OVERLAP, build_pixel_sr
from flashstep.runner.tiling import tile_starts
from flashstep.testing import randomize_

MIN_PSNR_DB = 40.0
# A seam is a jump at a tile border that the untiled image does not have: at most a third of one 8-bit level
# on average along any border. Measured on the bundled net at 128-pixel tiles: 0.10 levels with the 16-pixel
# overlap, 11.4 levels (and 40.8 dB) with none.
MAX_EXTRA_STEP = 1 / 255 / 3


@pytest.fixture(scope="module", params=["default", "rrdbnet"])
def pipe(request):
    if request.param == "default":
        return flashstep.load("default", device="cpu")
    net = randomize_(RRDBNet(RRDBNetConfig(num_feat=16, num_block=2)), seed=1).eval()
    return build_pixel_sr(net, device="cpu")


def _borders(length: int, tile: int) -> list:
    starts = tile_starts(length, tile, TILE_OVERLAP)
    return sorted({s for s in starts[1:]} | {s + tile for s in starts[:-1]})


@pytest.mark.parametrize("tile", [128, 256])
def test_tiles_match_the_untiled_image_without_a_seam(pipe, helpers, tile):
    lq = helpers.smooth_image(150, 110, seed=3)
    whole = pipe(lq, tile=0)
    tiled = pipe(lq, tile=tile)
    assert pipe.graph["upscale"].record.tiles > 1
    assert helpers.psnr(tiled, whole) >= MIN_PSNR_DB

    scale, input_tile = pipe.scale, tile // pipe.scale
    for axis, length in ((1, lq.shape[1]), (2, lq.shape[2])):
        for border in _borders(length, input_tile):
            edge = border * scale
            step_tiled = (tiled.narrow(axis, edge, 1) - tiled.narrow(axis, edge - 1, 1)).abs().mean()
            step_whole = (whole.narrow(axis, edge, 1) - whole.narrow(axis, edge - 1, 1)).abs().mean()
            assert (step_tiled - step_whole).abs() <= MAX_EXTRA_STEP, (
                f"tile {tile}: a step of {step_tiled:.5f} across the border at {edge} px (axis {axis}) where the "
                f"untiled image steps {step_whole:.5f}")
