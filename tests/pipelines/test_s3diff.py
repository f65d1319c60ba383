"""S3Diff against the reference written with diffusers + peft + transformers (``reference.S3DiffReference``:
S3Diff's own ``my_lora_fwd`` on the peft layers, its modulation MLPs and DE net) on a random SD-Turbo-like
folder, an s3diff.pkl saved as ``S3Diff.save_model`` saves it and a de_net.pth state dict.
"""
from __future__ import annotations

import pytest
import reference
import torch

import flashstep
from flashstep.pipelines.s3diff import S3DiffPipeline
from flashstep.testing import assert_close


@pytest.fixture(scope="module")
def reference_model(s3diff_files):
    return reference.S3DiffReference(s3diff_files.base, s3diff_files.lora, s3diff_files.de_net)


def load(files, **options) -> S3DiffPipeline:
    return flashstep.load("s3diff", base=files.base, lora=files.lora, de_net=files.de_net, device="cpu", **options)


@pytest.fixture(scope="module")
def pipe(s3diff_files) -> S3DiffPipeline:
    return load(s3diff_files, dtype="fp32")


def two_images(helpers, height: int, width: int) -> torch.Tensor:
    """A dim smooth image and a bright noisy one: the DE net gives them different degradation scores."""
    dim = helpers.smooth_image(height, width, seed=2) * 0.6
    noisy = helpers.smooth_image(height, width, seed=3) + 0.3 * torch.rand((3, height, width),
                                                                            generator=torch.Generator().manual_seed(4))
    return torch.stack([dim, noisy.clamp(0, 1)])


@pytest.fixture(scope="module")
def case(reference_model, helpers):
    """Two 12×20 images: ×4 is 48×80, reflect-padded to 64×128 and cropped back."""
    lq = two_images(helpers, 12, 20)
    return lq, reference_model(lq)


def test_matches_the_reference_in_fp32(pipe, case, reference_model, helpers):
    lq, expected = case
    ours = pipe(lq, color_fix="none")
    helpers.assert_fp32_parity(ours, expected, "s3diff")

    with torch.no_grad():
        scores = reference_model.de_net(lq)
    assert (scores[0] - scores[1]).abs().max() > 0.05, f"degradation scores {scores.tolist()} barely differ"
    swapped = reference_model(lq, deg_score=scores.flip(0))
    assert helpers.psnr(swapped, expected) < 35, "the per-image modulation barely changes the output"


def test_default_colour_fix_is_wavelet_against_the_bilinear_upsample(pipe, case, helpers):
    lq, expected = case
    ours = pipe(lq)
    fixed = reference.wavelet_color_fix(expected, reference.upsample_bilinear(lq, 4))
    helpers.assert_fp32_parity(ours, fixed, "wavelet")


def test_a_prompt_replaces_the_positive_prompt(pipe, case, reference_model, helpers):
    lq, _ = case
    ours = pipe(lq[:1], prompt="the cat on a mat", color_fix="none")
    helpers.assert_fp32_parity(ours, reference_model(lq[:1], positive="the cat on a mat"), "s3diff, own prompt")


def test_a_list_of_two_sizes_runs_each_with_its_own_degradation(pipe, reference_model, helpers):
    first, second = two_images(helpers, 12, 20)[0], two_images(helpers, 16, 16)[1]
    outputs = pipe([first, second], color_fix="none")
    assert isinstance(outputs, list) and [tuple(o.shape) for o in outputs] == [(3, 48, 80), (3, 64, 64)]
    helpers.assert_fp32_parity(outputs[0], reference_model(first[None])[0], "first image")
    helpers.assert_fp32_parity(outputs[1], reference_model(second[None])[0], "second image")


def test_degradation_estimator_matches_de_net(pipe, reference_model):
    x = torch.rand((2, 3, 23, 17), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = pipe.de_net(x)
        expected = reference_model.de_net(x)
    assert ours.shape == (2, 2)
    assert_close(ours, expected, atol=1e-5, rtol=0, label="degradation scores")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_within_40_db_of_fp32(s3diff_files, pipe, reference_model, dtype, helpers):
    lq = two_images(helpers, 16, 16)[1:]
    ours = load(s3diff_files, dtype=dtype)(lq, color_fix="none")
    helpers.assert_low_precision(ours, pipe(lq, color_fix="none"), reference_model.cast(dtype)(lq),
                                 reference_model(lq), f"s3diff {dtype}")


def test_exact_latent_tiling_equals_the_untiled_run(pipe, helpers):
    """Both guidance branches and each image's own LoRA mix run through the streamed UNet: tiled (8-latent
    tiles of a 16×24 latent) and untiled agree within 1e-4 of the range."""
    lq = two_images(helpers, 32, 48)
    whole = pipe(lq, color_fix="none", tile=0)
    tiled = pipe(lq, color_fix="none", tile=64)
    assert pipe.graph["denoise"].record.tiles > 0
    helpers.assert_fp32_parity(tiled, whole, "s3diff, exact latent tiles")
    assert all(layer.lora_mix is None for layer, _ in pipe.unet_layers)
