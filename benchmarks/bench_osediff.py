"""OSEDiff-shaped SR against the paper's form in diffusers + peft, on random weights in the full SD 2.1-base
configuration (flashstep.bench builds them; benchmarks/peers.py holds the peers).

    flashstep                        the LoRA merged at load (OSEDiffAdapter), one fused pipeline
    diffusers+peft (LoRA unmerged)   OSEDiff_test.forward as the paper's code runs it
    diffusers (LoRA merged)          the same with merge_and_unload's weights
    torch.compile(diffusers+peft)    the paper's form compiled (inductor, static shapes)

CPU (fp32): 128² and 256² output (×4 from 32², 64²); ×4 to 2048² in the reduced config (a fifth of the
width: the full one would take hours here) with flashstep under a 1 GB budget, so that its VAE and UNet
run streamed tile by tile (exactly: the error limit is the untiled one), against the whole-image peers.
GPU (fp16): 512² and ×4 to 2048².
"""
import pytest
import torch

from peers import BenchCase, benchmark_variant, pipeline_runner

ON_GPU = torch.cuda.is_available()
COMPILE_CPU = "inductor compiles the full SD UNet + VAE for minutes on a CPU"
CASES = (
    [BenchCase(512), BenchCase(2048)]
    if ON_GPU else
    [BenchCase(128, compile_ci_skip=COMPILE_CPU),
     BenchCase(256, ci_skip="the CI run keeps the smallest size", compile_ci_skip=COMPILE_CPU),
     BenchCase(2048, config="reduced", max_memory="1GB",
               ci_skip="minutes per call on a CPU", compile_ci_skip=COMPILE_CPU, repeats=1)]
)
VARIANTS = ("diffusers+peft (LoRA unmerged)", "diffusers (LoRA merged)", "torch.compile(diffusers+peft)", "flashstep")


@pytest.fixture(scope="module", params=CASES, ids=str)
def case(request):
    yield from pipeline_runner("osediff", request.param, request)


@pytest.mark.parametrize("variant", VARIANTS)
def test_osediff(case, variant, benchmark, request, bench_session):
    benchmark_variant(case, variant, benchmark, request, bench_session)
