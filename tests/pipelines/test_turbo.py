"""SD-Turbo and SDXL-Turbo against the one Euler step written with diffusers + transformers
(``reference.TurboReference``) on random folders in the SD 2.x and SDXL layouts; diffusers' own
EulerDiscreteScheduler ("trailing", one step) gives the σ and timestep the pipelines use; the generator API.
"""
from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from PIL import Image

import flashstep
from flashstep.pipelines.schedules import LAST_STEP, euler_sigma
from flashstep.pipelines.turbo import SDTurboPipeline, SDXLTurboPipeline
from flashstep.runner import Stage

PROMPTS = ["the cat on a mat", "a red car, at night"]


@pytest.fixture(scope="module")
def sd_reference(sd_turbo_set):
    return reference.TurboReference(sd_turbo_set.folder)


@pytest.fixture(scope="module")
def sd_pipe(sd_turbo_set) -> SDTurboPipeline:
    return flashstep.load("sd-turbo", base=sd_turbo_set.folder, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sdxl_reference(sdxl_turbo_set):
    return reference.TurboReference(sdxl_turbo_set.folder)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_turbo_set) -> SDXLTurboPipeline:
    return flashstep.load("sdxl-turbo", base=sdxl_turbo_set.folder, device="cpu", dtype="fp32")


def images(pipe, prompts, **options) -> torch.Tensor:
    return torch.stack(pipe(prompts, output_type="torch", **options))


# -- the step ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' set_timesteps
def test_euler_scheduler_gives_the_sigma_and_timestep_of_the_pipeline(sd_turbo_set):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_pretrained(sd_turbo_set.folder, subfolder="scheduler")
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [float(LAST_STEP)]
    sigma = float(scheduler.sigmas[0])
    assert scheduler.sigmas[1] == 0
    assert euler_sigma(LAST_STEP) == pytest.approx(sigma, rel=1e-6)
    assert float(scheduler.init_noise_sigma) == pytest.approx(sigma, rel=1e-6)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=generator) * sigma
    eps = torch.randn((1, 4, 8, 8), generator=generator)
    t = scheduler.timesteps[0]
    torch.testing.assert_close(scheduler.scale_model_input(x, t), x / (sigma**2 + 1) ** 0.5)
    torch.testing.assert_close(scheduler.step(eps, t, x).prev_sample, x - sigma * eps)


# -- SD-Turbo ------------------------------------------------------------------------------------------------

def test_sd_turbo_matches_the_reference_in_fp32(sd_pipe, sd_reference, helpers):
    ours = images(sd_pipe, PROMPTS, seed=3, height=64, width=96)
    helpers.assert_fp32_parity(ours, sd_reference(PROMPTS, seed=3, height=64, width=96), "sd-turbo")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd_turbo_low_precision_is_within_40_db_of_fp32(sd_turbo_set, sd_pipe, sd_reference, dtype, helpers):
    pipe = flashstep.load("sd-turbo", base=sd_turbo_set.folder, device="cpu", dtype=dtype)
    options = dict(seed=4, height=64, width=64)
    helpers.assert_low_precision(images(pipe, PROMPTS[:1], **options), images(sd_pipe, PROMPTS[:1], **options),
                                 sd_reference.cast(dtype)(PROMPTS[:1], **options), sd_reference(PROMPTS[:1], **options),
                                 f"sd-turbo {dtype}")


def test_a_folder_alone_is_detected_as_sd_turbo(sd_turbo_set):
    assert isinstance(flashstep.load(sd_turbo_set.folder, device="cpu"), SDTurboPipeline)


def test_outputs_are_one_image_per_prompt_in_the_asked_type(sd_pipe):
    pil = sd_pipe(PROMPTS, seed=1, height=64, width=96)
    assert [type(i) for i in pil] == [Image.Image] * 2 and [i.size for i in pil] == [(96, 64)] * 2
    arrays = sd_pipe(PROMPTS[0], seed=1, height=64, width=96, output_type="numpy")
    assert len(arrays) == 1 and arrays[0].dtype == np.uint8 and arrays[0].shape == (64, 96, 3)
    # The same image from a batch of one and a batch of two: equal up to one level of rounding (GEMM blocking
    # differs with the batch size).
    assert np.abs(arrays[0].astype(int) - np.asarray(pil[0]).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(pil[0]), np.asarray(pil[1]))


def test_printed_graph_lists_every_stage_with_shapes_and_backends(sd_pipe, capsys):
    sd_pipe(PROMPTS, seed=0, height=64, width=64, output_type="torch")
    print(sd_pipe.graph)
    text = capsys.readouterr().out
    assert [stage.name for stage in sd_pipe.graph] == ["prompt", "denoise", "decode"]
    assert "noise[2, 4, 8, 8], context[2, 77, 64] -> x0[2, 4, 8, 8]" in text
    assert "x0[2, 4, 8, 8] -> image[2, 3, 64, 64]" in text
    for name in ("denoise", "decode"):
        ops = sd_pipe.graph[name].record.ops
        assert {op for op, _ in ops} >= {"conv2d", "group_norm", "attention"}, name
        backends = ", ".join(f"{backend}×{count}" for (op, backend), count in sorted(ops.items()) if op == "attention")
        assert f"attention {backends}" in text


def test_prompt_embeds_skip_the_text_encoder(sd_turbo_set, sd_reference, helpers):
    pipe = flashstep.load("sd-turbo", base=sd_turbo_set.folder, device="cpu", dtype="fp32")
    pipe.text_encoder = None
    context, _ = sd_reference.encode(PROMPTS)
    ours = images(pipe, "", prompt_embeds=context, seed=3, height=64, width=96)
    assert pipe.graph["prompt"].record.notes == ["skipped: its outputs were given"]
    helpers.assert_fp32_parity(ours, sd_reference(PROMPTS, seed=3, height=64, width=96), "sd-turbo, prompt_embeds")


def test_a_replaced_prompt_stage_is_used(sd_turbo_set, sd_reference, helpers):
    pipe = flashstep.load("sd-turbo", base=sd_turbo_set.folder, device="cpu", dtype="fp32")
    pipe.graph.replace("prompt", Stage("prompt", lambda prompts: sd_reference.encode(prompts)[0], ("prompts",),
                                       ("context",)))
    pipe.text_encoder = None
    ours = images(pipe, PROMPTS, seed=3, height=64, width=96)
    helpers.assert_fp32_parity(ours, sd_reference(PROMPTS, seed=3, height=64, width=96), "sd-turbo, own prompt stage")


# -- SDXL-Turbo ----------------------------------------------------------------------------------------------

def test_sdxl_turbo_matches_the_reference_in_fp32(sdxl_pipe, sdxl_reference, helpers):
    """64×96: the time ids [64, 96, 0, 0, 64, 96] are not symmetric in H and W."""
    ours = images(sdxl_pipe, PROMPTS, seed=5, height=64, width=96)
    helpers.assert_fp32_parity(ours, sdxl_reference(PROMPTS, seed=5, height=64, width=96), "sdxl-turbo")


def test_sdxl_turbo_prompt_embeds_are_context_and_pooled(sdxl_turbo_set, sdxl_reference, helpers):
    pipe = flashstep.load("sdxl-turbo", base=sdxl_turbo_set.folder, device="cpu", dtype="fp32")
    pipe.text_encoder = None
    context, pooled = sdxl_reference.encode(PROMPTS)
    ours = images(pipe, "", prompt_embeds=(context, pooled), seed=5, height=64, width=96)
    assert pipe.graph["prompt"].record.notes == ["skipped: its outputs were given"]
    helpers.assert_fp32_parity(ours, sdxl_reference(PROMPTS, seed=5, height=64, width=96), "sdxl, prompt_embeds")
    with pytest.raises(ValueError, match="prompt_embeds must give context, pooled"):
        pipe("", prompt_embeds=context, height=64, width=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdxl_turbo_low_precision_keeps_the_vae_in_fp32(sdxl_turbo_set, sdxl_pipe, sdxl_reference, dtype, helpers):
    pipe = flashstep.load("sdxl-turbo", base=sdxl_turbo_set.folder, device="cpu", dtype=dtype)
    assert pipe.graph["denoise"].dtype == dtype and pipe.graph["decode"].dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == torch.float32
    options = dict(seed=6, height=64, width=64)
    upcast = sdxl_reference.cast(dtype)
    upcast.vae = sdxl_reference.vae  # force_upcast: diffusers decodes SDXL in fp32 too
    helpers.assert_low_precision(images(pipe, PROMPTS[:1], **options), images(sdxl_pipe, PROMPTS[:1], **options),
                                 upcast(PROMPTS[:1], **options), sdxl_reference(PROMPTS[:1], **options),
                                 f"sdxl-turbo {dtype}")


def test_a_folder_alone_is_detected_as_sdxl_turbo(sdxl_turbo_set):
    assert isinstance(flashstep.load(sdxl_turbo_set.folder, device="cpu"), SDXLTurboPipeline)
