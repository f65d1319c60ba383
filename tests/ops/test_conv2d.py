"""conv2d: every backend against the fp32 reference, plain, static LoRA and per-sample LoRA."""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops.conv2d import conv2d_reference
from flashstep.testing import (
    assert_close,
    assert_error_within_torch,
    backends_to_test,
    channels_last,
    random_tensor,
    require_backend,
)

# (B, Cin, H, W, Cout, k, stride, padding, rank)
SHAPES = [
    (2, 16, 9, 11, 24, 3, 1, 1, 4),
    (1, 12, 8, 7, 20, 3, 2, 1, 8),
    (3, 8, 5, 5, 8, 1, 1, 0, 2),
    (2, 5, 6, 9, 7, 3, 1, 1, 3),
]
GPU_SHAPES = [
    (1, 320, 64, 64, 320, 3, 1, 1, 32),
    (2, 640, 32, 32, 640, 3, 1, 1, 32),
    (1, 128, 256, 256, 128, 3, 1, 1, 16),
    (2, 1280, 16, 16, 1280, 3, 1, 1, 4),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LORA_KINDS = ["none", "static", "per_sample"]


def make_case(shape, dtype, device, lora_kind):
    batch, cin, height, width, cout, kernel, stride, padding, rank = shape
    x = random_tensor((batch, cin, height, width), dtype, device)
    weight = random_tensor((cout, cin, kernel, kernel), dtype, device, scale=(cin * kernel * kernel) ** -0.5)
    bias = random_tensor((cout,), dtype, device)
    lora = None
    if lora_kind != "none":
        down = random_tensor((rank, cin, kernel, kernel), dtype, device, scale=(cin * kernel * kernel) ** -0.5)
        up = random_tensor((cout, rank), dtype, device, scale=rank**-0.5)
        mix = random_tensor((batch, rank, rank), dtype, device) if lora_kind == "per_sample" else None
        lora = ops.LoRA(down, up, 0.75, mix)
    return x, weight, bias, stride, padding, lora


def low_precision_conv(x, weight, bias, stride, padding, lora):
    """torch in the input dtype: the per-sample weights merged in that dtype, one conv per sample."""
    if lora is None:
        return F.conv2d(x, weight, bias, stride, padding)
    rank = lora.rank
    mixed = lora.up if lora.mix is None else torch.matmul(lora.up, lora.mix.transpose(-1, -2))
    delta = torch.matmul(mixed * lora.scale, lora.down.reshape(rank, -1))
    merged = weight + delta.reshape(delta.shape[:-2] + weight.shape)
    if merged.dim() == 4:
        return F.conv2d(x, merged, bias, stride, padding)
    return torch.cat([F.conv2d(x[b : b + 1], merged[b], bias, stride, padding) for b in range(x.shape[0])])


def check(backend, shape, dtype, device, lora_kind, layout="nchw"):
    require_backend("conv2d", backend, device)
    x, weight, bias, stride, padding, lora = make_case(shape, dtype, device, lora_kind)
    if layout == "channels_last":
        x = channels_last(x)
    out = ops.conv2d(x, weight, bias, stride, padding, lora=lora, backend=backend)
    reference = conv2d_reference(x.float(), weight.float(), bias.float(), (stride, stride), (padding, padding), (1, 1), 1,
                                 _float_lora(lora))
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference, atol=1e-4, rtol=1e-4)
    else:
        assert_error_within_torch(out, reference, low_precision_conv(x, weight, bias, stride, padding, lora))


def _float_lora(lora):
    if lora is None:
        return None
    return ops.LoRA(lora.down.float(), lora.up.float(), lora.scale, None if lora.mix is None else lora.mix.float())


@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv2d_matches_reference(backend, shape, lora_kind, dtype, device):
    check(backend, shape, dtype, device, lora_kind)


@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
def test_conv2d_channels_last(backend, lora_kind, device):
    check(backend, SHAPES[0], torch.float32, device, lora_kind, layout="channels_last")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lora_kind", LORA_KINDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_conv2d_model_shapes_gpu(backend, shape, lora_kind, dtype):
    check(backend, shape, dtype, "cuda", lora_kind, layout="channels_last")


def test_merge_lora_equals_unmerged_application():
    x, weight, bias, stride, padding, lora = make_case(SHAPES[0], torch.float32, "cpu", "static")
    merged = ops.merge_lora(weight, lora)
    assert_close(F.conv2d(x, merged, bias, stride, padding), ops.conv2d(x, weight, bias, stride, padding, lora=lora),
                 atol=1e-4, rtol=1e-4)


def test_per_sample_lora_equals_per_sample_merge():
    x, weight, bias, stride, padding, lora = make_case(SHAPES[0], torch.float32, "cpu", "per_sample")
    out = ops.conv2d(x, weight, bias, stride, padding, lora=lora, backend="aten")
    for b in range(x.shape[0]):
        merged = ops.merge_lora(weight, lora.with_mix(lora.mix[b]))
        assert_close(out[b : b + 1], F.conv2d(x[b : b + 1], merged, bias, stride, padding), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels"):
        ops.conv2d(torch.randn(2, 3, 5, 5), weight)
    with pytest.raises(ValueError, match="LoRA down"):
        ops.conv2d(x, weight, lora=ops.LoRA(torch.randn(2, 4, 1, 1), torch.randn(6, 2)))
    with pytest.raises(ValueError, match="input batch is 2"):
        ops.conv2d(x, weight, lora=ops.LoRA(torch.randn(2, 4, 3, 3), torch.randn(6, 2), 1.0, torch.randn(3, 2, 2)))
    with pytest.raises(ValueError, match="ranks disagree"):
        ops.LoRA(torch.randn(2, 4, 3, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="cannot be merged"):
        ops.merge_lora(weight, ops.LoRA(torch.randn(2, 4, 3, 3), torch.randn(6, 2), 1.0, torch.randn(2, 2, 2)))


@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv2d_shared_mix_dilation_and_wide_rank(backend, layout, dtype, device):
    """A shared (r, r) mix, dilation 2, stride 2 and a rank above 32."""
    require_backend("conv2d", backend, device)
    batch, cin, cout, rank = 2, 6, 10, 40
    x = random_tensor((batch, cin, 11, 9), dtype, device)
    if layout == "channels_last":
        x = channels_last(x)
    weight = random_tensor((cout, cin, 3, 3), dtype, device, scale=(cin * 9) ** -0.5)
    bias = random_tensor((cout,), dtype, device)
    lora = ops.LoRA(random_tensor((rank, cin, 3, 3), dtype, device, scale=(cin * 9) ** -0.5),
                    random_tensor((cout, rank), dtype, device, scale=rank**-0.5), 0.5,
                    random_tensor((rank, rank), dtype, device, scale=rank**-0.5))
    out = ops.conv2d(x, weight, bias, 2, 2, 2, lora=lora, backend=backend)
    reference = conv2d_reference(x.float(), weight.float(), bias.float(), (2, 2), (2, 2), (2, 2), 1, _float_lora(lora))
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference, atol=1e-4, rtol=1e-4)
    else:
        mixed = torch.matmul(lora.up, lora.mix.t()) * lora.scale
        merged = weight + torch.matmul(mixed, lora.down.reshape(rank, -1)).reshape(weight.shape)
        assert_error_within_torch(out, reference, F.conv2d(x, merged, bias, 2, 2, 2))


@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
def test_conv2d_lora_follows_in_place_updates(backend, device):
    """Writing the weight, A or the bias in place, or swapping A, changes the next result."""
    require_backend("conv2d", backend, device)
    x, weight, bias, stride, padding, lora = make_case(SHAPES[0], torch.float32, device, "per_sample")

    def run_and_check(lora):
        out = ops.conv2d(x, weight, bias, stride, padding, lora=lora, backend=backend)
        reference = conv2d_reference(x, weight, bias, (stride, stride), (padding, padding), (1, 1), 1, lora)
        assert_close(out, reference, atol=1e-4, rtol=1e-4)

    run_and_check(lora)
    with torch.no_grad():
        weight.mul_(-2.0)
    run_and_check(lora)
    with torch.no_grad():
        lora.down.mul_(3.0)
    run_and_check(lora)
    with torch.no_grad():
        bias.add_(1.0)
    run_and_check(lora)
    run_and_check(ops.LoRA(lora.down.flip(0).contiguous(), lora.up, lora.scale, lora.mix))


@pytest.mark.parametrize("backend", backends_to_test("conv2d"))
def test_conv2d_lora_with_inference_mode_weights(backend, device):
    """Weights made under torch.inference_mode (no version counter) still give fresh results."""
    require_backend("conv2d", backend, device)
    with torch.inference_mode():
        x, weight, bias, stride, padding, lora = make_case(SHAPES[1], torch.float32, device, "per_sample")
        for _ in range(2):
            out = ops.conv2d(x, weight, bias, stride, padding, lora=lora, backend=backend)
            reference = conv2d_reference(x, weight, bias, (stride, stride), (padding, padding), (1, 1), 1, lora)
            assert_close(out, reference, atol=1e-4, rtol=1e-4)
            weight.mul_(-1.0)
