"""Option values that cannot work: exit code 2 and one line that names the option and lists the valid values,
before any work is done; the same checks as ValueErrors in the Python API."""
from __future__ import annotations

import pytest
import torch
from cli_runs import noise_image, run_cli, run_cli_process, save_image

import flashstep
from flashstep.pipelines.base import check_scale, check_tile, parse_device, parse_dtype
from flashstep.runner.memory import parse_memory

MEMORY_FORMS = "write e.g. 8GB, 512MB, 1.5GiB or a number of bytes"
BAD_OPTIONS = [
    (["--scale", "0"], "--scale: scale=0.0: valid values are numbers in (0, 16]"),
    (["--scale", "-2"], "valid values are numbers in (0, 16]"),
    (["--scale", "17"], "valid values are numbers in (0, 16]"),
    (["--scale", "nan"], "valid values are numbers in (0, 16]"),
    (["--scale", "inf"], "valid values are numbers in (0, 16]"),
    (["--scale", "two"], "argument --scale: invalid float value: 'two'"),
    (["--tile", "10"], "--tile: tile=10: valid values are 0 (never tile) or a whole number of pixels >= 64"),
    (["--tile", "-64"], "valid values are 0 (never tile) or a whole number of pixels >= 64"),
    (["--tile", "big"], "argument --tile: invalid int value: 'big'"),
    (["--max-memory", "lots"], f"--max-memory: cannot read the memory size 'lots'; {MEMORY_FORMS}"),
    (["--max-memory=-4GB"], MEMORY_FORMS),
    (["--max-memory", "0GB"], "a memory size must be positive"),
    (["--max-memory", "12 parsecs"], MEMORY_FORMS),
    (["--device", "tpu"], "--device: unknown device 'tpu'; valid: cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "valid: cpu, cuda, cuda:N"),
    (["--device", "meta"], "device type 'meta' is not supported; valid: cpu, cuda, cuda:N"),
    (["--dtype", "fp8"], ("argument --dtype: invalid choice: 'fp8' (choose from ", "fp32", "fp16", "bf16")),
    (["--quality", "0"], "--quality 0: valid values are whole numbers from 1 to 100"),
    (["--quality", "101"], "valid values are whole numbers from 1 to 100"),
    (["--format", "bmp"], "--format 'bmp': valid values are png, jpg, jpeg, webp, tif, tiff"),
    (["--latent-tiling", "blend"], ("argument --latent-tiling: invalid choice: 'blend' (choose from ", "exact",
                                    "gaussian")),
    (["--latent-tiling", "exact"], "--latent-tiling applies to the diffusion SR models (osediff, s3diff), not "
                                   "default; drop it"),
    (["--color-fix", "magic"], ("argument --color-fix: invalid choice: 'magic' (choose from ", "adain", "wavelet")),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "--device: device 'cuda' was asked for but no CUDA device is visible "
                                              "here; valid here: cpu"))


@pytest.fixture
def one_image(tmp_path):
    return save_image(tmp_path / "in.png", noise_image(6, 7))


@pytest.mark.parametrize("option, expected", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_option_is_a_usage_error_listing_the_valid_values(one_image, tmp_path, option, expected):
    result = run_cli("upscale", one_image, "-o", tmp_path / "out", *option)
    assert result.code == 2
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is created on a usage error"


def test_options_are_checked_even_when_every_output_exists(one_image, tmp_path):
    save_image(tmp_path / "out" / "in.png", noise_image(2, 2))
    result = run_cli("upscale", one_image, "-o", tmp_path / "out", "--tile", "3")
    assert result.code == 2 and len(result.lines) == 1 and "--tile" in result.stderr


def test_the_usage_error_is_one_line(one_image, tmp_path):
    result = run_cli("upscale", one_image, "-o", tmp_path / "out", "--max-memory", "lots")
    assert result.lines == ["flashstep upscale: error: --max-memory: cannot read the memory size 'lots'; "
                            + MEMORY_FORMS]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(one_image, tmp_path):
    """The real command in a subprocess: exit 2, one line, nothing written."""
    result = run_cli_process("upscale", one_image, "-o", tmp_path / "out", "--device", "cuda")
    assert result.code == 2
    assert result.lines == ["flashstep upscale: error: --device: device 'cuda' was asked for but no CUDA device "
                            "is visible here; valid here: cpu"]
    assert not (tmp_path / "out").exists()


def test_good_values_pass(one_image, tmp_path):
    result = run_cli("upscale", one_image, "-o", tmp_path / "out.webp", "--scale", "2.5", "--tile", "64",
                     "--max-memory", "64MB", "--device", "cpu", "--dtype", "fp32", "--quality", "80", "-q")
    assert result.code == 0, result.stderr
    assert flashstep.imageio.read_image(tmp_path / "out.webp").size == (18, 15)


@pytest.mark.parametrize("check, value, expected", [
    (check_scale, 0, "valid values are numbers in (0, 16]"),
    (check_scale, "x", "valid values are numbers in (0, 16]"),
    (check_tile, 63, "valid values are 0 (never tile) or a whole number of pixels >= 64"),
    (check_tile, 64.5, "whole number of pixels"),
    (check_tile, float("inf"), "whole number of pixels"),
    (parse_memory, "lots", MEMORY_FORMS),
    (parse_memory, -1, "must be positive"),
    (parse_device, "npu", "valid: cpu, cuda, cuda:N"),
    (lambda value: parse_dtype(value, torch.device("cpu")), "fp8", "valid: fp32, fp16, bf16"),
    (lambda value: parse_dtype(value, torch.device("cpu")), torch.int8, "valid: fp32, fp16, bf16"),
])
def test_the_python_api_raises_value_errors_with_the_valid_values(check, value, expected):
    with pytest.raises(ValueError) as error:
        check(value)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_pipeline_call_checks_scale_and_tile_first(default_pipeline):
    image = noise_image(5, 5)
    with pytest.raises(ValueError, match="scale=-1"):
        default_pipeline(image, scale=-1)
    with pytest.raises(ValueError, match="tile=8"):
        default_pipeline(image, tile=8)
    with pytest.raises(ValueError, match="output_type='jpeg'; valid: pil, numpy, torch"):
        default_pipeline(image, output_type="jpeg")
    with pytest.raises(ValueError, match="unknown option"):
        flashstep.load("default", devices="cpu")
