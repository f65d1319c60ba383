"""SD-Turbo (one Euler step from noise, t = 999) against diffusers, on random weights in the full SD-Turbo
configuration.

    flashstep                   SDTurboPipeline with the prompt embedding given
    diffusers                   EulerDiscreteScheduler ("trailing", one step) around the UNet, VAE decode
    torch.compile(diffusers)    the same compiled

CPU (fp32): 128² and 256². GPU (fp16): 512².
"""
import pytest
import torch

from peers import BenchCase, benchmark_variant, pipeline_runner

ON_GPU = torch.cuda.is_available()
COMPILE_CPU = "inductor compiles the full SD UNet + VAE for minutes on a CPU"
CASES = ([BenchCase(512)] if ON_GPU else
         [BenchCase(128, compile_ci_skip=COMPILE_CPU),
          BenchCase(256, ci_skip="the CI run keeps the smallest size", compile_ci_skip=COMPILE_CPU)])
VARIANTS = ("diffusers", "torch.compile(diffusers)", "flashstep")


@pytest.fixture(scope="module", params=CASES, ids=str)
def case(request):
    yield from pipeline_runner("sd-turbo", request.param, request)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd_turbo(case, variant, benchmark, request, bench_session):
    benchmark_variant(case, variant, benchmark, request, bench_session)
