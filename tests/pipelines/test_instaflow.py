"""InstaFlow against its one Euler step of the rectified flow written with diffusers + transformers
(``reference.InstaFlowReference``: z = n + v(n, 1000, c), guided against "" when g > 1) on a random folder in
the SD 1.5 layout (1×1-conv projections, 8 heads, 768-wide CLIP-L context).
"""
from __future__ import annotations

import pytest
import reference
import torch

import flashstep
from flashstep.pipelines.instaflow import InstaFlowPipeline

PROMPTS = ["the cat on a mat", "a red car, at night"]


@pytest.fixture(scope="module")
def reference_model(instaflow_set):
    return reference.InstaFlowReference(instaflow_set.folder)


def load(model_set, **options) -> InstaFlowPipeline:
    return flashstep.load("instaflow", base=model_set.folder, device="cpu", **options)


@pytest.fixture(scope="module")
def pipe(instaflow_set) -> InstaFlowPipeline:
    return load(instaflow_set, dtype="fp32")


def images(pipe, prompts, **options) -> torch.Tensor:
    return torch.stack(pipe(prompts, output_type="torch", **options))


@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
def test_matches_the_reference_in_fp32(pipe, reference_model, guidance_scale, helpers):
    ours = images(pipe, PROMPTS, seed=3, height=64, width=96, guidance_scale=guidance_scale)
    expected = reference_model(PROMPTS, seed=3, height=64, width=96, guidance_scale=guidance_scale)
    helpers.assert_fp32_parity(ours, expected, f"instaflow, guidance {guidance_scale}")


def test_guidance_changes_the_image(reference_model, helpers):
    plain = reference_model(PROMPTS[:1], seed=3, height=64, width=64)
    guided = reference_model(PROMPTS[:1], seed=3, height=64, width=64, guidance_scale=1.5)
    assert helpers.psnr(guided, plain) < 40


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_within_40_db_of_fp32(instaflow_set, pipe, reference_model, dtype, helpers):
    options = dict(seed=4, height=64, width=64)
    helpers.assert_low_precision(images(load(instaflow_set, dtype=dtype), PROMPTS[:1], **options),
                                 images(pipe, PROMPTS[:1], **options),
                                 reference_model.cast(dtype)(PROMPTS[:1], **options),
                                 reference_model(PROMPTS[:1], **options), f"instaflow {dtype}")


def test_a_folder_alone_is_detected_as_instaflow(instaflow_set):
    assert isinstance(flashstep.load(instaflow_set.folder, device="cpu"), InstaFlowPipeline)


def test_prompt_embeds_skip_the_text_encoder(instaflow_set, reference_model, helpers):
    own = load(instaflow_set, dtype="fp32")
    own.text_encoder = None
    context = reference.encode_prompts(reference_model.tokenizer, reference_model.text_encoder, PROMPTS)
    empty = reference.encode_prompts(reference_model.tokenizer, reference_model.text_encoder, [""])
    ours = images(own, "", prompt_embeds=context, seed=3, height=64, width=96)
    assert own.graph["prompt"].record.notes == ["skipped: its outputs were given"]
    helpers.assert_fp32_parity(ours, reference_model(PROMPTS, seed=3, height=64, width=96), "prompt_embeds")

    guided = images(own, "", prompt_embeds=(context, empty), seed=3, height=64, width=96, guidance_scale=1.5)
    expected = reference_model(PROMPTS, seed=3, height=64, width=96, guidance_scale=1.5)
    helpers.assert_fp32_parity(guided, expected, "prompt_embeds with guidance")
    with pytest.raises(ValueError, match="guidance_scale > 1 needs the empty prompt's embedding"):
        own("", prompt_embeds=context, height=64, width=64, guidance_scale=1.5)
