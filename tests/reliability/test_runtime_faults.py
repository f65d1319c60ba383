"""Faults while running: NaN/inf in low precision re-run in float32 (and said), non-finite output that
float32 cannot fix refused per image, GPU out-of-memory re-run with smaller tiles (and said), out of memory
at the smallest tile a listed failure. The faults are injected into the bundled SRVGG net."""
from __future__ import annotations

import logging

import pytest
import torch
from cli_runs import noise_image, run_cli, save_image
from corpus import srvgg_state_dict
from safetensors.torch import save_file

import flashstep
from flashstep.models.srvgg import SRVGGNetCompact
from flashstep.pipelines.base import NonFiniteOutputError

ORIGINAL_FORWARD = SRVGGNetCompact.forward_padded


def out_of_memory_above(side: int, seen: list):
    def forward_padded(self, x):
        seen.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > side:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ORIGINAL_FORWARD(self, x)
    return forward_padded


def nan_in(dtype: torch.dtype):
    def forward_padded(self, x):
        y = ORIGINAL_FORWARD(self, x)
        return torch.full_like(y, float("nan")) if x.dtype == dtype else y
    return forward_padded


def test_nan_in_bf16_is_rerun_in_float32_and_said(monkeypatch, caplog):
    image = noise_image(11, 13, seed=4)
    reference = flashstep.load("default", device="cpu", dtype="fp32")(image, output_type="torch")
    pipeline = flashstep.load("default", device="cpu", dtype="bf16")
    monkeypatch.setattr(SRVGGNetCompact, "forward_padded", nan_in(torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="flashstep"):
        result = pipeline(image, output_type="torch")
    assert torch.isfinite(result).all()
    assert (result - reference).abs().max() < 0.05, "the float32 re-run, with bf16-rounded weights"
    assert [r.message for r in caplog.records] == [
        "stage 'upscale' produced NaN/inf in bfloat16; re-ran it in its safe precision"]
    stage = next(s for s in pipeline.graph if s.name == "upscale")
    assert "re-run in safe precision after NaN/inf" in stage.record.notes


def test_nan_in_bf16_through_the_cli(monkeypatch, tmp_path):
    monkeypatch.setattr(SRVGGNetCompact, "forward_padded", nan_in(torch.bfloat16))
    source = save_image(tmp_path / "in.png", noise_image(8, 8))
    assert run_cli("upscale", source, "-o", tmp_path / "out.png", "--dtype", "bf16", "-q").code == 0
    assert flashstep.imageio.read_image(tmp_path / "out.png").size == (32, 32)


def test_non_finite_weights_fail_each_image_clearly(tmp_path):
    weights = {k: torch.full_like(v, float("nan")) for k, v in srvgg_state_dict().items()}
    model = tmp_path / "nan_weights.safetensors"
    save_file(weights, str(model))
    with pytest.raises(NonFiniteOutputError, match="NaN/inf"):
        flashstep.load(str(model))(noise_image(4, 4))
    source = save_image(tmp_path / "in.png", noise_image(4, 4))
    result = run_cli("upscale", source, "-o", tmp_path / "out", "--model", model, "-q")
    assert result.code == 1 and "NonFiniteOutputError" in result.failures()[str(source)]
    assert not (tmp_path / "out").exists()


def test_out_of_memory_retries_with_smaller_tiles_and_says_so(monkeypatch, caplog):
    image = noise_image(100, 100, seed=5)
    pipeline = flashstep.load("default", device="cpu")
    expected = pipeline(image, tile=200, output_type="torch")  # 50-pixel input tiles, no fault
    seen: list = []
    monkeypatch.setattr(SRVGGNetCompact, "forward_padded", out_of_memory_above(60, seen))
    with caplog.at_level(logging.WARNING, logger="flashstep"):
        result = pipeline(image, output_type="torch")
    assert seen[0] == 100 and set(seen[1:]) == {50}, "after the whole image, tiles of half its side at once"
    assert torch.equal(result, expected)
    assert [r.message for r in caplog.records] == ["out of memory; retrying lq with 50-pixel tiles"]


@pytest.mark.parametrize("tile", ["0", None])
def test_out_of_memory_that_tiles_cannot_cure_is_a_listed_failure(monkeypatch, tmp_path, tile):
    """With --tile 0 (never tile), or down to the smallest tile, the image fails; the batch goes on."""
    monkeypatch.setattr(SRVGGNetCompact, "forward_padded", out_of_memory_above(0, []))
    sources = [save_image(tmp_path / f"in_{i}.png", noise_image(40, 40, seed=i)) for i in range(2)]
    options = ["--tile", tile] if tile is not None else []
    result = run_cli("upscale", *sources, "-o", tmp_path / "out", "-q", *options)
    assert result.code == 1 and sorted(result.failures()) == sorted(map(str, sources))
    assert all("OutOfMemoryError: CUDA out of memory" in m for m in result.failures().values())
