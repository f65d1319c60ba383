"""The float32 CPU convolution paths of the aten backend (backends/aten/cpu_conv.py): the 1×1 GEMM, NNPACK's
Winograd and oneDNN on a kept blocked weight, each against F.conv2d in float64, in both memory formats; the kept
weight is rebuilt when its tensor changes; and the in-place LoRA merge.

Tolerance: NNPACK's Winograd transform loses about 3e-6 relative (L2) against the fp64 result, oneDNN and the
GEMM about 5e-7; elementwise, 1e-4 of the output's range covers all three with margin.
"""
import pytest
import torch
import torch.nn.functional as F

from flashstep.backends.aten import cpu_conv
from flashstep.ops.lora import LoRA, merge_lora, merge_lora_

pytestmark = pytest.mark.skipif(not cpu_conv.ONEDNN, reason="torch was built without oneDNN")


def reference(x, weight, bias, stride, padding):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding).float()


def assert_close_to_range(actual, expected, fraction=1e-4):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=fraction * scale, rtol=0)


CASES = [
    # (Cin, Cout, kernel, stride, padding, H, W): the path each one takes is asserted below
    (24, 40, 1, 1, 0, 33, 17),   # 1×1: one GEMM per sample
    (16, 24, 3, 1, 1, 37, 41),   # 3×3 over >= 32² outputs: Winograd
    (16, 24, 3, 1, 1, 9, 13),    # 3×3 over a small map: oneDNN, kept weight
    (16, 24, 3, 2, 1, 37, 41),   # stride 2: oneDNN
    (5, 7, 3, 1, 0, 35, 36),     # no padding, odd channels
]


def path_of(x, weight, stride, padding):
    if cpu_conv.is_pointwise(weight, (stride, stride), (padding, padding), 1):
        return "gemm"
    if cpu_conv.uses_winograd(x, weight, (stride, stride), (padding, padding), (1, 1), 1):
        return "winograd"
    return "onednn"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "x".join(map(str, case)))
def test_matches_the_fp64_convolution(case, channels_last):
    cin, cout, kernel, stride, padding, height, width = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, height, width, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator) / (cin * kernel * kernel) ** 0.5
    bias = torch.randn(cout, generator=generator)
    expected_path = {1: "gemm"}.get(kernel) or ("winograd" if stride == 1 and (height + 2 * padding - 2) * (width + 2 * padding - 2) >= 1024 else "onednn")
    if expected_path == "winograd" and not cpu_conv.NNPACK:
        expected_path = "onednn"
    assert path_of(x, weight, stride, padding) == expected_path
    format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        y = cpu_conv.conv2d(x, weight, bias, (stride, stride), (padding, padding), (1, 1), 1, format)
    assert y.is_contiguous(memory_format=format)
    assert_close_to_range(y, reference(x, weight, bias, stride, padding))


def test_a_sample_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 40, 40, generator=generator)
    weight = torch.randn(8, 8, 3, 3, generator=generator)
    with torch.no_grad():
        batched = cpu_conv.conv2d(x, weight, None, (1, 1), (1, 1), (1, 1), 1, torch.contiguous_format)
        alone = cpu_conv.conv2d(x[1:2], weight, None, (1, 1), (1, 1), (1, 1), 1, torch.contiguous_format)
    assert torch.equal(batched[1:2], alone)


def test_the_kept_weight_follows_changes_to_the_tensor():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 12, 12, generator=generator)  # small map: the oneDNN path keeps a packed weight
    weight = torch.randn(16, 8, 3, 3, generator=generator)
    args = (None, (1, 1), (1, 1), (1, 1), 1, torch.contiguous_format)
    cpu_conv.clear()
    with torch.no_grad():
        first = cpu_conv.conv2d(x, weight, *args)
        assert cpu_conv.packed_bytes() > 0
        weight.mul_(-2.0)  # in place: a new version, same storage
        second = cpu_conv.conv2d(x, weight, *args)
    assert_close_to_range(second, reference(x, weight, None, 1, 1))
    assert_close_to_range(second, -2.0 * first)
    del weight
    assert cpu_conv.packed_bytes() == 0  # the kept weight went with its tensor


def test_not_used_when_autograd_needs_the_graph():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3)
    assert not cpu_conv.applies(x, weight)
    with torch.no_grad():
        assert cpu_conv.applies(x, weight)
    assert not cpu_conv.applies(x.double(), weight.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (40, 24)], ids=["conv", "linear"])
def test_merge_in_place_equals_the_merged_copy(shape, dtype):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(*shape, generator=generator).to(dtype)
    down = torch.randn(4, *shape[1:], generator=generator)
    up = torch.randn(shape[0], 4, generator=generator)
    lora = LoRA(down, up, 0.5)
    expected = merge_lora(weight, lora)
    storage = weight.data_ptr()
    merged = merge_lora_(weight, lora)
    assert merged is weight and weight.data_ptr() == storage
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(weight.float(), expected.float(), atol=tolerance * float(expected.abs().max()), rtol=0)


def test_merge_in_place_refuses_a_per_sample_lora():
    weight = torch.randn(8, 4)
    lora = LoRA(torch.randn(2, 4), torch.randn(8, 2), 1.0, mix=torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match="per-sample"):
        merge_lora_(weight, lora)
