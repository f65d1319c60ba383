"""attention: every backend against the fp32 reference, with the long-reduction rule for fp16/bf16."""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops.attention import attention_reference
from flashstep.testing import (
    assert_close,
    assert_error_within_torch,
    backends_to_test,
    non_contiguous,
    random_tensor,
    require_backend,
)

# (B, H, N, M, D): odd lengths (tails of every block size), cross-attention to 77 tokens, the SD head
# dims (40, 64, 80, 160) and the VAE's single head of 512.
SHAPES = [
    (1, 2, 37, 37, 64),
    (2, 1, 19, 77, 40),
    (1, 1, 33, 17, 80),
    (1, 2, 9, 65, 160),
    (1, 1, 21, 21, 512),
    (1, 3, 1, 5, 32),
]
GPU_SHAPES = [(2, 5, 4096, 4096, 64), (1, 10, 1024, 77, 64), (1, 1, 4096, 4096, 512), (2, 8, 1000, 1000, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def low_precision_attention(q, k, v, scale):
    """torch in the input dtype, no upcast: the baseline of the 2x rule."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def check(backend, shape, dtype, device, *, make_non_contiguous=False, scale=None):
    require_backend("attention", backend, device)
    batch, heads, n, m, d = shape
    q = random_tensor((batch, heads, n, d), dtype, device)
    k = random_tensor((batch, heads, m, d), dtype, device)
    v = random_tensor((batch, heads, m, d), dtype, device)
    if make_non_contiguous:
        q, k, v = non_contiguous(q), k.transpose(1, 2).contiguous().transpose(1, 2), non_contiguous(v)
    out = ops.attention(q, k, v, scale, backend=backend)
    q32, k32, v32 = q.float(), k.float(), v.float()
    reference = attention_reference(q32, k32, v32, scale)
    assert out.shape == q.shape and out.dtype == dtype
    if dtype == torch.float32:
        assert_close(out, reference, atol=2e-5, rtol=2e-5)
    else:
        used_scale = d**-0.5 if scale is None else scale
        assert_error_within_torch(out, reference, low_precision_attention(q, k, v, used_scale))


@pytest.mark.parametrize("backend", backends_to_test("attention"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_matches_reference(backend, shape, dtype, device):
    check(backend, shape, dtype, device)


@pytest.mark.parametrize("backend", backends_to_test("attention"))
def test_attention_non_contiguous_and_custom_scale(backend, device):
    check(backend, (1, 2, 23, 29, 64), torch.float16, device, make_non_contiguous=True, scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_to_test("attention"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_attention_model_shapes_gpu(backend, shape, dtype):
    check(backend, shape, dtype, "cuda")


def test_reference_equals_softmax_formula():
    q, k, v = torch.randn(2, 3, 11, 16), torch.randn(2, 3, 13, 16), torch.randn(2, 3, 13, 16)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    assert_close(attention_reference(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_reference_blocks_rows_without_changing_the_result(monkeypatch):
    import sys

    attention_module = sys.modules["flashstep.ops.attention"]

    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    whole = attention_reference(q, k, v)
    monkeypatch.setattr(attention_module, "REFERENCE_SCORE_BLOCK", 2 * 30 * 7)
    assert_close(attention_reference(q, k, v), whole, atol=1e-6, rtol=1e-6)


def test_bad_inputs_are_named():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        ops.attention(q[0], q, q)
    with pytest.raises(ValueError, match="agree on B, H and D"):
        ops.attention(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(TypeError, match="share one dtype"):
        ops.attention(q, q.half(), q)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.attention(q.long(), q.long(), q.long())


# -- the triton backend's own choices ---------------------------------------------------------------


@pytest.mark.parametrize("element_size", [2, 4], ids=["16-bit", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 40, 64, 80, 128, 160, 256, 512])
def test_triton_gpu_blocks_fit_an_h100_block(head_dim, element_size):
    """The operand tiles (Q, and K and V per stage) fit the shared-memory budget below an H100 block's
    227 KB, tiles are powers of two >= 16 (the smallest dot), and acc stays <= 128 registers a thread."""
    from flashstep.backends.triton.attention import SHARED_MEMORY_BUDGET, gpu_blocks, head_dim_block

    block_d = head_dim_block(head_dim)
    blocks = gpu_blocks(block_d, element_size)
    assert blocks.shared_memory_bytes(block_d, element_size) <= SHARED_MEMORY_BUDGET < 227 * 1024
    for size in (blocks.block_m, blocks.block_n):
        assert size >= 16 and size & (size - 1) == 0
    assert blocks.block_m * block_d <= 128 * 32 * blocks.num_warps, "fp32 accumulator per thread"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 70, 45, 512), (1, 2, 80, 37, 160), (1, 1, 130, 70, 64)], ids=str)
def test_triton_attention_with_the_gpu_block_sizes(shape, dtype, device):
    """The tiles a GPU launch picks (64×32 at D = 512) give the same results, tails included."""
    require_backend("attention", "triton", device)
    from flashstep.backends.triton.attention import attention_fwd, gpu_blocks, head_dim_block

    batch, heads, n, m, d = shape
    q = random_tensor((batch, heads, n, d), dtype, device)
    k = random_tensor((batch, heads, m, d), dtype, device)
    v = random_tensor((batch, heads, m, d), dtype, device)
    blocks = gpu_blocks(head_dim_block(d), q.element_size())
    assert n > blocks.block_m and m > blocks.block_n, "the shape must cross block tails"
    out = attention_fwd(q, k, v, None, blocks)
    reference = attention_reference(q.float(), k.float(), v.float())
    if dtype == torch.float32:
        assert_close(out, reference, atol=2e-5, rtol=2e-5)
    else:
        assert_error_within_torch(out, reference, low_precision_attention(q, k, v, d**-0.5))


def test_triton_attention_reads_token_major_views_and_broadcast_keys(device):
    """q as a (B, N, H, D) buffer viewed (B, H, N, D), k/v broadcast over the batch (stride 0): no copies,
    and the output keeps q's token-major layout."""
    require_backend("attention", "triton", device)
    batch, heads, n, m, d = 2, 3, 21, 77, 40
    q = random_tensor((batch, n, heads, d), torch.float16, device).transpose(1, 2)
    k = random_tensor((1, heads, m, d), torch.float16, device).expand(batch, -1, -1, -1)
    v = random_tensor((1, heads, m, d), torch.float16, device).expand(batch, -1, -1, -1)
    out = ops.attention(q, k, v, backend="triton")
    assert out.transpose(1, 2).is_contiguous(), "token-major q, token-major output"
    reference = attention_reference(q.float(), k.float(), v.float())
    assert_error_within_torch(out, reference, low_precision_attention(q, k, v, d**-0.5))


def test_triton_attention_refuses_head_dims_over_512():
    from flashstep.backends.triton.attention import why_not

    q = torch.empty(1, 1, 4, 640)
    assert "head dim 640 > 512" in why_not(q, q, q, None)
