"""linear and geglu: every backend against the fp32 reference, plain, static and per-sample LoRA."""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops.geglu import geglu_reference
from flashstep.ops.linear import linear_reference
from flashstep.testing import (
    assert_close,
    assert_error_within_torch,
    backends_to_test,
    non_contiguous,
    random_tensor,
    require_backend,
)

# (Batch, tokens, in, out, rank)
SHAPES = [(2, 7, 24, 40, 4), (1, 77, 32, 16, 8), (3, 1, 9, 13, 2), (2, 33, 64, 48, 32)]
GPU_SHAPES = [(2, 4096, 320, 320, 32), (2, 1024, 640, 5120, 32), (1, 77, 1024, 1280, 4), (2, 256, 1280, 10240, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LORA_KINDS = ["none", "static", "per_sample"]


def make_case(shape, dtype, device, lora_kind, out_multiplier=1):
    batch, tokens, fan_in, fan_out, rank = shape
    fan_out *= out_multiplier
    x = random_tensor((batch, tokens, fan_in), dtype, device)
    weight = random_tensor((fan_out, fan_in), dtype, device, scale=fan_in**-0.5)
    bias = random_tensor((fan_out,), dtype, device)
    lora = None
    if lora_kind != "none":
        down = random_tensor((rank, fan_in), dtype, device, scale=fan_in**-0.5)
        up = random_tensor((fan_out, rank), dtype, device, scale=rank**-0.5)
        mix = random_tensor((batch, rank, rank), dtype, device) if lora_kind == "per_sample" else None
        lora = ops.LoRA(down, up, 0.5, mix)
    return x, weight, bias, lora


def low_precision_linear(x, weight, bias, lora):
    if lora is None:
        return F.linear(x, weight, bias)
    mixed = lora.up if lora.mix is None else torch.matmul(lora.up, lora.mix.transpose(-1, -2))
    merged = weight + torch.matmul(mixed * lora.scale, lora.down)
    if merged.dim() == 2:
        return F.linear(x, merged, bias)
    return torch.stack([F.linear(x[b], merged[b], bias) for b in range(x.shape[0])])


def low_precision_geglu(x, weight, bias, lora):
    hidden, gate = low_precision_linear(x, weight, bias, lora).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def check(op_name, backend, shape, dtype, device, lora_kind, strided=False):
    require_backend(op_name, backend, device)
    x, weight, bias, lora = make_case(shape, dtype, device, lora_kind, out_multiplier=2 if op_name == "geglu" else 1)
    if strided:
        x = non_contiguous(x)
    public, reference_fn, baseline_fn = {
        "linear": (ops.linear, linear_reference, low_precision_linear),
        "geglu": (ops.geglu, geglu_reference, low_precision_geglu),
    }[op_name]
    out = public(x, weight, bias, lora, backend=backend)
    reference = reference_fn(x.float(), weight.float(), bias.float(), lora)
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference.float(), atol=1e-4, rtol=1e-4)
    else:
        assert_error_within_torch(out, reference.float(), baseline_fn(x, weight, bias, lora))


BACKENDS = sorted(set(backends_to_test("linear")) | set(backends_to_test("geglu")))


@pytest.mark.parametrize("op_name", ["linear", "geglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(op_name, backend, shape, lora_kind, dtype, device):
    check(op_name, backend, shape, dtype, device, lora_kind)


@pytest.mark.parametrize("op_name", ["linear", "geglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(op_name, backend, device):
    check(op_name, backend, SHAPES[0], torch.float32, device, "per_sample", strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", ["linear", "geglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_model_shapes_gpu(op_name, backend, shape, lora_kind, dtype):
    check(op_name, backend, shape, dtype, "cuda", lora_kind)


def test_geglu_reference_equals_diffusers_formula():
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    hidden, gate = F.linear(x.double(), weight.double(), bias.double()).chunk(2, dim=-1)
    assert_close(geglu_reference(x, weight, bias, None), (hidden * F.gelu(gate)).float(), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="in-features"):
        ops.linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="even number"):
        ops.geglu(torch.randn(2, 4), torch.randn(5, 4))


@pytest.mark.parametrize("op_name", ["linear", "geglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shared_mix_4d_input_wide_rank_no_bias(op_name, backend, dtype, device):
    """x (Batch, h, w, in), a shared (r, r) mix, rank 40 (above one 32-wide block), no bias."""
    require_backend(op_name, backend, device)
    fan_in, fan_out, rank = 20, 18 if op_name == "geglu" else 9, 40
    x = random_tensor((2, 3, 5, fan_in), dtype, device)
    weight = random_tensor((fan_out, fan_in), dtype, device, scale=fan_in**-0.5)
    lora = ops.LoRA(random_tensor((rank, fan_in), dtype, device, scale=fan_in**-0.5),
                    random_tensor((fan_out, rank), dtype, device, scale=rank**-0.5), 0.5,
                    random_tensor((rank, rank), dtype, device, scale=rank**-0.5))
    public, reference_fn, baseline_fn = {
        "linear": (ops.linear, linear_reference, low_precision_linear),
        "geglu": (ops.geglu, geglu_reference, low_precision_geglu),
    }[op_name]
    out = public(x, weight, None, lora, backend=backend)
    reference = reference_fn(x.float(), weight.float(), None, lora)
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference.float(), atol=1e-4, rtol=1e-4)
    else:
        assert_error_within_torch(out, reference.float(), baseline_fn(x, weight, None, lora))


@pytest.mark.parametrize("op_name", ["linear", "geglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
def test_per_sample_rows_one_token_each(op_name, backend, lora_kind, device):
    """x (Batch, in): every sample is a single row (per-sample tiles hold one row each)."""
    require_backend(op_name, backend, device)
    x, weight, bias, lora = make_case((5, 1, 12, 10, 3), torch.float32, device, lora_kind,
                                      out_multiplier=2 if op_name == "geglu" else 1)
    x = x[:, 0]
    public, reference_fn = {"linear": (ops.linear, linear_reference), "geglu": (ops.geglu, geglu_reference)}[op_name]
    assert_close(public(x, weight, bias, lora, backend=backend), reference_fn(x, weight, bias, lora).float(),
                 atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_vector_input(backend, device):
    require_backend("linear", backend, device)
    x, weight, bias, lora = make_case((1, 1, 24, 40, 4), torch.float32, device, "static")
    x = x[0, 0]
    out = ops.linear(x, weight, bias, lora, backend=backend)
    assert out.shape == (40,)
    assert_close(out, linear_reference(x, weight, bias, lora), atol=1e-4, rtol=1e-4)
