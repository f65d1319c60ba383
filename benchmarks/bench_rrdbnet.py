"""RRDBNet ×4 (RealESRGAN_x4plus: 23 RRDBs, 64 features) against spandrel, on random weights.

    flashstep                  PixelSRPipeline (tiles only beyond its memory budget)
    spandrel                   spandrel's ESRGAN model on the same state dict, eager
    torch.compile(spandrel)    the same compiled

CPU (fp32): 32² -> 128² and 128² -> 512². GPU (fp16): 512² -> 2048².
"""
import pytest
import torch

from peers import BenchCase, benchmark_variant, pipeline_runner

ON_GPU = torch.cuda.is_available()
COMPILE_CPU = "inductor compiles the 351 convolutions for minutes on a CPU"
CASES = ([BenchCase(2048)] if ON_GPU else
         [BenchCase(128, compile_ci_skip=COMPILE_CPU),
          BenchCase(512, ci_skip="the CI run keeps the smallest size", compile_ci_skip=COMPILE_CPU)])
VARIANTS = ("spandrel", "torch.compile(spandrel)", "flashstep")


@pytest.fixture(scope="module", params=CASES, ids=str)
def case(request):
    yield from pipeline_runner("rrdbnet", request.param, request)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rrdbnet(case, variant, benchmark, request, bench_session):
    benchmark_variant(case, variant, benchmark, request, bench_session)
