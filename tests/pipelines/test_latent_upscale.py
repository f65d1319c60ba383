"""The latent-upscale pipeline on small random generators saved as diffusers folders (SD-Turbo-style SD 2.x
and SDXL-Turbo-style) and small random latent upscalers saved with :func:`save_latent_upscaler`.

Checks: the output size is s× the generated size; with heads whose output is exactly the interpolated latent,
the image equals the generator's own decode of the interpolated latent (bit for bit); the stage sits between
denoise and decode with the precision policy and the NaN fallback of the runner; detection and errors.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import flashstep
from flashstep.models.configs import UNetConfig
from flashstep.models.latent_upscaler import LatentUpscaler, LatentUpscalerConfig, save_latent_upscaler
from flashstep.pipelines.latent_upscale import (InstaFlowLatentUpscalePipeline, SDTurboLatentUpscalePipeline,
                                                SDXLTurboLatentUpscalePipeline, build_latent_upscale,
                                                detect_generator)
from flashstep.pipelines.turbo import build_sd_turbo

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ADAPTER = LatentUpscalerConfig(embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4, num_feat=16,
                               scales=(2, 4))
TEXT_WIDTH = 32
PROMPT = "a b"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """NOTE: the models here are a few channels wide; on the shared 2-core machine a second intra-op thread
    only adds synchronisation (the 64×96 runs of this file took several times longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- random generators in the diffusers layout ---------------------------------------------------------------

def write_tokenizer(folder: str) -> None:
    """A tiny CLIP BPE vocabulary (letters, a merge), saved by transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["!", "<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["ab</w>"]
    vocab, merges = os.path.join(folder, "source_vocab.json"), os.path.join(folder, "source_merges.txt")
    with open(vocab, "w") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(merges, "w") as f:
        f.write("#version: 0.2\na b</w>\n")
    CLIPTokenizer(vocab, merges).save_pretrained(folder)
    os.remove(vocab)
    os.remove(merges)


def clip(projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_attention_heads=1,
                            num_hidden_layers=2, vocab_size=64, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def unet(family: str):
    """SD 2.x style (linear projections, heads of dim 32) or SDXL style (text-time conditions, two encoders)."""
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                  attention_head_dim=(1, 2), use_linear_projection=True)
    if family == "sd2":
        config = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH)
    else:
        config = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * TEXT_WIDTH,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8)
    torch.manual_seed(1)
    return UNet2DConditionModel(**common, **config).eval()


def vae(family: str):
    """An f8 VAE (four levels) narrow enough to decode 1024² on two cores in seconds."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=64, scaling_factor=0.18215 if family == "sd2" else 0.13025,
                         force_upcast=family != "sd2").eval()


def write_generator(folder, family: str) -> str:
    from diffusers import EulerDiscreteScheduler

    models = {"unet": unet(family), "vae": vae(family), "text_encoder": clip(projection=False, seed=3)}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    tokenizers = ["tokenizer"]
    if family == "sdxl":
        models["text_encoder_2"] = clip(projection=True, seed=4)
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
        tokenizers.append("tokenizer_2")
    for name, model in models.items():
        model.save_pretrained(str(folder / name))
    for name in tokenizers:
        write_tokenizer(str(folder / name))
    EulerDiscreteScheduler(timestep_spacing="trailing").save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.fixture(scope="module")
def sd_turbo_folder(tmp_path_factory):
    return write_generator(tmp_path_factory.mktemp("sd_turbo"), "sd2")


@pytest.fixture(scope="module")
def sdxl_turbo_folder(tmp_path_factory):
    return write_generator(tmp_path_factory.mktemp("sdxl_turbo"), "sdxl")


# -- adapters -----------------------------------------------------------------------------------------------

def random_adapter(config: LatentUpscalerConfig = ADAPTER, seed: int = 5) -> LatentUpscaler:
    """Weights ~ U(±√(3/fan_in)), norm scales N(1, 0.1²), biases N(0, 0.1²), position bias tables N(0, 1)."""
    model = LatentUpscaler(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "relative_position_bias_table" in name:
                param.copy_(noise)
            elif param.dim() >= 2:
                bound = math.sqrt(3.0 / param[0].numel())
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "latent_upscaler.safetensors"
    save_latent_upscaler(random_adapter(), path)
    return str(path)


@pytest.fixture(scope="module")
def interpolating_adapter_file(tmp_path_factory):
    """A random backbone whose heads' last convs are zero: every head outputs exactly interp_s(z)."""
    model = random_adapter(seed=6)
    with torch.no_grad():
        for head in model.heads.values():
            head.conv_last.weight.zero_()
            head.conv_last.bias.zero_()
    path = tmp_path_factory.mktemp("interpolating") / "latent_upscaler.safetensors"
    save_latent_upscaler(model, path)
    return str(path)


def generated_latent(generator, prompt: str, seed: int, height: int, width: int) -> torch.Tensor:
    """x̂0 of the plain generator pipeline, through its own graph."""
    values = {"prompts": [prompt], "noise": generator.noise(1, height, width, seed)}
    return generator.runner.run(generator.graph, values, outputs=("x0",))["x0"]


# -- the pipeline -------------------------------------------------------------------------------------------

def test_images_are_scale_times_the_generated_size(sd_turbo_folder, adapter_file):
    pipe = flashstep.load("latent-upscale", base=sd_turbo_folder, adapter=adapter_file, device="cpu", dtype="fp32")
    assert isinstance(pipe, SDTurboLatentUpscalePipeline) and pipe.kind == "latent-upscale"
    image = pipe(PROMPT, seed=0)[0]  # the defaults: 512 × 512, the adapter's smallest scale (2)
    assert image.size == (1024, 1024)
    images = pipe([PROMPT, "c d"], seed=1, scale=4, height=64, width=128, output_type="numpy")
    assert [i.shape for i in images] == [(256, 512, 3)] * 2
    assert not (images[0] == images[1]).all()

    names = [stage.name for stage in pipe.graph]
    assert names == ["prompt", "denoise", "upscale_latent", "decode"]
    record = pipe.graph["upscale_latent"].record
    assert record.input_shapes["x0_small"] == (2, 4, 8, 16) and record.output_shapes["x0"] == (2, 4, 32, 64)
    assert pipe.graph["decode"].record.input_shapes["x0"] == (2, 4, 32, 64)
    assert "upscale_latent: (x0_small, scale) -> (x0)" in str(pipe.graph)


@pytest.mark.parametrize("scale", [2, 4])
def test_interpolating_heads_give_the_decode_of_the_interpolated_latent(sd_turbo_folder, interpolating_adapter_file,
                                                                         adapter_file, scale):
    height, width = 64, 96
    pipe = build_latent_upscale(sd_turbo_folder, interpolating_adapter_file, device="cpu", dtype="fp32")
    ours = pipe(PROMPT, seed=3, scale=scale, height=height, width=width, output_type="torch")[0]
    generator = build_sd_turbo(sd_turbo_folder, device="cpu", dtype="fp32")
    x0 = generated_latent(generator, PROMPT, 3, height, width)
    with torch.inference_mode():
        upscaled = F.interpolate(x0, scale_factor=scale, mode="bicubic", align_corners=False)
        expected = generator.graph["decode"].fn(x0=upscaled)[0].clamp(0, 1)
    assert ours.shape == (3, height * scale, width * scale)
    # The heads interpolate by a convolution whose sums run in oneDNN's order, not F.interpolate's: the two agree
    # to float32 rounding after the decoder (2.3e-6 to 1.1e-5 measured on this [0, 1] image, as the decoder's
    # GroupNorm backend changed), far below any interpolation-mode difference; the limit is the fp32 parity rule,
    # 1e-4 of the range.
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)

    trained = build_latent_upscale(sd_turbo_folder, adapter_file, device="cpu", dtype="fp32")
    other = trained(PROMPT, seed=3, scale=scale, height=height, width=width, output_type="torch")[0]
    assert (other - expected).abs().max() > 1e-3


def test_sdxl_turbo_base_is_detected_and_upscaled(sdxl_turbo_folder, adapter_file):
    pipe = build_latent_upscale(sdxl_turbo_folder, adapter_file, device="cpu", dtype="fp32")
    assert isinstance(pipe, SDXLTurboLatentUpscalePipeline)
    assert pipe.graph["denoise"].inputs == ("noise", "context", "pooled")
    image = pipe(PROMPT, seed=0, scale=2, height=64, width=64)[0]
    assert image.size == (128, 128)


def test_instaflow_generator_keeps_its_guidance_option(sd_turbo_folder, adapter_file):
    pipe = build_latent_upscale(sd_turbo_folder, adapter_file, generator="instaflow", device="cpu", dtype="fp32")
    assert isinstance(pipe, InstaFlowLatentUpscalePipeline)
    image = pipe(PROMPT, scale=2, height=64, width=64, guidance_scale=1.5, output_type="torch")[0]
    assert image.shape == (3, 128, 128) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="guidance_scale=0.5 must be >= 1"):
        pipe(PROMPT, scale=2, height=64, width=64, guidance_scale=0.5)


def test_detect_generator_from_the_unet_config():
    def components(**unet_fields):
        return {"unet": SimpleNamespace(config=UNetConfig(**unet_fields))}

    assert detect_generator(components(cross_attention_dim=1024)) == "sd-turbo"
    assert detect_generator(components(cross_attention_dim=768)) == "instaflow"
    assert detect_generator({**components(cross_attention_dim=768), "text_encoder_2": object()}) == "sdxl-turbo"
    assert detect_generator(components(cross_attention_dim=2048, addition_embed_type="text_time",
                                       addition_time_embed_dim=256,
                                       projection_class_embeddings_input_dim=2816)) == "sdxl-turbo"


def test_adapter_follows_the_precision_policy_and_nan_falls_back_to_fp32(sd_turbo_folder, adapter_file):
    fp32 = build_latent_upscale(sd_turbo_folder, adapter_file, device="cpu", dtype="fp32")
    stage = fp32.graph["upscale_latent"]
    assert stage.dtype == torch.float32 and stage.safe_fn is None

    fp16 = build_latent_upscale(sd_turbo_folder, adapter_file, device="cpu", dtype="fp16")
    stage = fp16.graph["upscale_latent"]
    assert stage.dtype == torch.bfloat16 and stage.safe_fn is not None
    assert next(fp16.adapter.parameters()).dtype == torch.bfloat16

    bf16 = build_latent_upscale(sd_turbo_folder, adapter_file, device="cpu", dtype="bf16")
    stage = bf16.graph["upscale_latent"]
    stage.fn = lambda x0_small, scale: torch.full_like(bf16.adapter.interpolate(x0_small, scale), float("nan"))
    image = bf16(PROMPT, seed=0, scale=2, height=64, width=64, output_type="torch")[0]
    assert image.shape == (3, 128, 128) and torch.isfinite(image).all()
    assert "re-run in safe precision after NaN/inf" in stage.record.notes
    assert next(bf16._safe_adapter.get().parameters()).dtype == torch.float32


def test_errors_name_the_problem(sd_turbo_folder, adapter_file, tmp_path):
    pipe = build_latent_upscale(sd_turbo_folder, adapter_file, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match=r"scale=3: the latent upscaler has heads for \[2, 4\]"):
        pipe(PROMPT, scale=3, height=64, width=64)
    with pytest.raises(ValueError, match="unknown argument"):
        pipe(PROMPT, scale=2, height=64, width=64, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"generator='sd3'; valid: sd-turbo, sdxl-turbo, instaflow"):
        build_latent_upscale(sd_turbo_folder, adapter_file, generator="sd3")
    wide = LatentUpscalerConfig(**{**ADAPTER.to_dict(), "latent_channels": 16})
    with pytest.raises(ValueError, match="takes 16-channel latents, the sd-turbo generator makes 4-channel ones"):
        build_latent_upscale(sd_turbo_folder, LatentUpscaler(wide), device="cpu")
    missing = str(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="absent.safetensors: no such file"):
        build_latent_upscale(sd_turbo_folder, missing)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\]"):
        build_latent_upscale(sd_turbo_folder, adapter_file, steps=4)
