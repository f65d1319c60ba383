"""S3Diff against the paper's form in diffusers + peft, on random weights in the full SD-Turbo configuration.

    flashstep                          the per-image LoRA through flashstep.ops (scale · B · Mᵀ · A x), both
                                       guidance branches in one batched UNet call
    diffusers+peft (per-image LoRA)    S3Diff.forward: the r×r matrices rebuilt for the image and set on every
                                       LoRA layer, S3Diff's my_lora_fwd, one UNet call per prompt
    torch.compile(diffusers+peft)      the paper's form compiled

CPU (fp32): 128² and 256² output (×4 from 32², 64²). GPU (fp16): 512².
"""
import pytest
import torch

from peers import BenchCase, benchmark_variant, pipeline_runner

ON_GPU = torch.cuda.is_available()
COMPILE_CPU = "inductor compiles the full SD UNet + VAE for minutes on a CPU"
CASES = ([BenchCase(512)] if ON_GPU else
         [BenchCase(128, compile_ci_skip=COMPILE_CPU),
          BenchCase(256, ci_skip="the CI run keeps the smallest size", compile_ci_skip=COMPILE_CPU)])
VARIANTS = ("diffusers+peft (per-image LoRA)", "torch.compile(diffusers+peft)", "flashstep")


@pytest.fixture(scope="module", params=CASES, ids=str)
def case(request):
    yield from pipeline_runner("s3diff", request.param, request)


@pytest.mark.parametrize("variant", VARIANTS)
def test_s3diff(case, variant, benchmark, request, bench_session):
    benchmark_variant(case, variant, benchmark, request, bench_session)
