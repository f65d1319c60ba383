"""pixel_shuffle, pixel_unshuffle and conv2d_pixel_shuffle: every backend against the reference."""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops.pixel_shuffle import conv2d_pixel_shuffle_reference
from flashstep.testing import (
    assert_close,
    assert_error_within_torch,
    backends_to_test,
    channels_last,
    non_contiguous,
    random_tensor,
    require_backend,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, C_out, H, W, r)
SHUFFLE_SHAPES = [(2, 3, 5, 7, 2), (1, 4, 3, 9, 3), (1, 3, 6, 4, 4), (2, 1, 1, 1, 2)]
# (B, Cin, H, W, C_out, k, r): SRVGG head (64 -> 3·16), SwinIR pixelshuffle (64 -> 64·4), odd sizes
HEAD_SHAPES = [(1, 16, 7, 9, 3, 3, 4), (2, 8, 5, 6, 4, 3, 2), (1, 12, 9, 5, 1, 1, 3)]
GPU_HEAD_SHAPES = [(1, 64, 512, 512, 3, 3, 4), (1, 64, 256, 256, 64, 3, 2), (1, 60, 512, 512, 3, 3, 4)]
ACTIVATIONS = [None, "relu", "leaky_relu", "silu"]


@pytest.mark.parametrize("backend", backends_to_test("pixel_shuffle"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHUFFLE_SHAPES, ids=str)
def test_shuffle_and_unshuffle_are_exact(backend, shape, layout, dtype, device):
    require_backend("pixel_shuffle", backend, device)
    require_backend("pixel_unshuffle", backend, device)
    batch, channels, height, width, factor = shape
    x = random_tensor((batch, channels * factor * factor, height, width), dtype, device)
    x = {"nchw": x, "channels_last": channels_last(x), "strided": non_contiguous(x)}[layout]
    shuffled = ops.pixel_shuffle(x, factor, backend=backend)
    assert torch.equal(shuffled.cpu(), F.pixel_shuffle(x.contiguous(), factor).cpu())
    if layout == "channels_last":
        assert shuffled.is_contiguous(memory_format=torch.channels_last)
    unshuffled = ops.pixel_unshuffle(shuffled, factor, backend=backend)
    assert torch.equal(unshuffled.cpu(), x.contiguous().cpu())


def check_head(backend, shape, dtype, device, activation, with_residual, layout="nchw"):
    require_backend("conv2d_pixel_shuffle", backend, device)
    batch, cin, height, width, cout, kernel, factor = shape
    x = random_tensor((batch, cin, height, width), dtype, device)
    weight = random_tensor((cout * factor * factor, cin, kernel, kernel), dtype, device, scale=(cin * kernel * kernel) ** -0.5)
    bias = random_tensor((cout * factor * factor,), dtype, device)
    residual = random_tensor((batch, cout, height * factor, width * factor), dtype, device) if with_residual else None
    if layout == "channels_last":
        x = channels_last(x)
    out = ops.conv2d_pixel_shuffle(x, weight, bias, factor, activation, residual, negative_slope=0.2, backend=backend)
    reference = conv2d_pixel_shuffle_reference(x.float(), weight.float(), bias.float(), factor, activation, 0.2,
                                               None if residual is None else residual.float())
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference, atol=1e-4, rtol=1e-4)
    else:
        baseline = ops.conv2d_pixel_shuffle(x, weight, bias, factor, activation, residual, negative_slope=0.2, backend="aten")
        assert_error_within_torch(out, reference, baseline)


@pytest.mark.parametrize("backend", backends_to_test("conv2d_pixel_shuffle"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=str)
def test_conv2d_pixel_shuffle_matches_reference(backend, shape, dtype, device):
    check_head(backend, shape, dtype, device, "leaky_relu", with_residual=True)


@pytest.mark.parametrize("backend", backends_to_test("conv2d_pixel_shuffle"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv2d_pixel_shuffle_options(backend, activation, layout, device):
    check_head(backend, HEAD_SHAPES[1], torch.float32, device, activation, with_residual=activation is None, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_to_test("conv2d_pixel_shuffle"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_HEAD_SHAPES, ids=str)
def test_conv2d_pixel_shuffle_model_shapes_gpu(backend, shape, dtype):
    check_head(backend, shape, dtype, "cuda", None, with_residual=True, layout="channels_last")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.pixel_shuffle(torch.randn(1, 6, 2, 2), 2)
    with pytest.raises(ValueError, match="pad the image first"):
        ops.pixel_unshuffle(torch.randn(1, 3, 5, 4), 2)
    with pytest.raises(ValueError, match="odd kernels"):
        ops.conv2d_pixel_shuffle(torch.randn(1, 3, 4, 4), torch.randn(12, 3, 2, 2), None, 2)
    with pytest.raises(ValueError, match="activation='tanh'"):
        ops.conv2d_pixel_shuffle(torch.randn(1, 3, 4, 4), torch.randn(12, 3, 3, 3), None, 2, "tanh")


@pytest.mark.parametrize("backend", backends_to_test("conv2d_pixel_shuffle"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv2d_pixel_shuffle_strided_input_no_bias_wide_kernel(backend, dtype, device):
    """A 5×3 kernel, no bias, a strided x and a channels_last residual."""
    require_backend("conv2d_pixel_shuffle", backend, device)
    batch, cin, height, width, cout, factor = 2, 5, 6, 7, 2, 2
    x = non_contiguous(random_tensor((batch, cin, height, width), dtype, device))
    weight = random_tensor((cout * factor * factor, cin, 5, 3), dtype, device, scale=(cin * 15) ** -0.5)
    residual = channels_last(random_tensor((batch, cout, height * factor, width * factor), dtype, device))
    out = ops.conv2d_pixel_shuffle(x, weight, None, factor, "silu", residual, backend=backend)
    reference = conv2d_pixel_shuffle_reference(x.float(), weight.float(), None, factor, "silu", 0.01, residual.float())
    assert out.dtype == dtype and out.shape == reference.shape
    if dtype == torch.float32:
        assert_close(out, reference, atol=1e-4, rtol=1e-4)
    else:
        baseline = ops.conv2d_pixel_shuffle(x, weight, None, factor, "silu", residual, backend="aten")
        assert_error_within_torch(out, reference, baseline)
