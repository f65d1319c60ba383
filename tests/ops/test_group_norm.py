"""group_norm: every backend against the fp32 reference; NCHW and channels_last; SiLU, residual, given stats."""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops.group_norm import combine_moments, group_norm_moments, group_norm_reference, stats_from_moments
from flashstep.testing import (
    assert_close,
    assert_error_within_torch,
    backends_to_test,
    channels_last,
    non_contiguous,
    random_tensor,
    require_backend,
)

# (B, C, H, W, groups): odd spatial sizes, SD widths with 32 groups, groups of one channel.
SHAPES = [
    (2, 64, 9, 11, 32),
    (1, 96, 5, 7, 32),
    (1, 40, 13, 3, 8),
    (3, 16, 1, 1, 8),
    (1, 32, 17, 17, 1),
]
GPU_SHAPES = [(1, 320, 64, 64, 32), (1, 1280, 16, 16, 32), (1, 128, 512, 512, 32), (1, 512, 128, 128, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def low_precision_group_norm(x, num_groups, weight, bias, eps, activation, residual):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if activation == "silu":
        y = F.silu(y)
    return y if residual is None else y + residual


def check(backend, shape, dtype, device, *, layout="nchw", activation="silu", with_residual=True, eps=1e-6):
    require_backend("group_norm", backend, device)
    batch, channels, height, width, groups = shape
    x = random_tensor((batch, channels, height, width), dtype, device, scale=3.0) + 0.5
    weight = random_tensor((channels,), dtype, device)
    bias = random_tensor((channels,), dtype, device)
    residual = random_tensor(x.shape, dtype, device) if with_residual else None
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "strided":
        x = non_contiguous(x)
    out = ops.group_norm(x, groups, weight, bias, eps, activation, residual, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    reference = group_norm_reference(x.float(), groups, weight.float(), bias.float(), eps, activation,
                                     None if residual is None else residual.float(), None)
    if dtype == torch.float32:
        assert_close(out, reference, atol=2e-5, rtol=2e-5)
    else:
        baseline = low_precision_group_norm(x, groups, weight, bias, eps, activation, residual)
        assert_error_within_torch(out, reference, baseline)


@pytest.mark.parametrize("backend", backends_to_test("group_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_norm_matches_reference(backend, shape, layout, dtype, device):
    check(backend, shape, dtype, device, layout=layout)


@pytest.mark.parametrize("backend", backends_to_test("group_norm"))
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("silu", False), (None, True)])
def test_group_norm_options(backend, activation, with_residual, device):
    check(backend, (2, 64, 7, 5, 32), torch.float32, device, activation=activation, with_residual=with_residual)


@pytest.mark.parametrize("backend", backends_to_test("group_norm"))
def test_group_norm_strided_input(backend, device):
    check(backend, (1, 32, 6, 9, 8), torch.float32, device, layout="strided")


@pytest.mark.parametrize("backend", backends_to_test("group_norm"))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_with_given_stats_matches_whole_image(backend, layout, device):
    """Tiles normalised with statistics gathered over the whole image equal the untiled result."""
    require_backend("group_norm", backend, device)
    x = random_tensor((1, 64, 12, 10), torch.float32, device, scale=2.0)
    weight, bias = random_tensor((64,), device=device), random_tensor((64,), device=device)
    whole = ops.group_norm(x, 32, weight, bias, 1e-6, "silu", backend="torch")
    left, right = x[..., :4], x[..., 4:]
    stats = stats_from_moments(combine_moments([group_norm_moments(left, 32), group_norm_moments(right, 32)]), 1e-6)
    if layout == "channels_last":
        left, right = channels_last(left), channels_last(right)
    tiles = [ops.group_norm(t, 32, weight, bias, 1e-6, "silu", stats=stats, backend=backend) for t in (left, right)]
    assert_close(torch.cat(tiles, dim=-1), whole, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_to_test("group_norm"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_group_norm_model_shapes_gpu(backend, shape, layout, dtype):
    check(backend, shape, dtype, "cuda", layout=layout)


def test_reference_equals_torch_group_norm():
    x, w, b = torch.randn(2, 32, 5, 6), torch.randn(32), torch.randn(32)
    expected = F.silu(F.group_norm(x.double(), 8, w.double(), b.double(), 1e-5)).float()
    assert_close(group_norm_reference(x, 8, w, b, 1e-5, "silu", None, None), expected, atol=1e-5, rtol=1e-5)


def test_combined_moments_equal_whole_moments():
    x = torch.randn(2, 16, 9, 7) * 5 + 3
    parts = [group_norm_moments(x[..., :2], 4), group_norm_moments(x[..., 2:3], 4), group_norm_moments(x[..., 3:], 4)]
    count, mean, m2 = combine_moments(parts)
    whole = group_norm_moments(x, 4)
    assert_close(mean, whole[1], atol=1e-5, rtol=1e-5)
    assert_close(m2, whole[2], atol=1e-3, rtol=1e-5)
    assert torch.equal(count, whole[0])


def test_bad_inputs_are_named():
    x = torch.randn(1, 6, 4, 4)
    with pytest.raises(ValueError, match="positive divisor of the 6 channels"):
        ops.group_norm(x, 4)
    with pytest.raises(ValueError, match="activation='gelu'"):
        ops.group_norm(x, 2, activation="gelu")
    with pytest.raises(ValueError, match="residual has shape"):
        ops.group_norm(x, 2, residual=torch.randn(1, 6, 4, 5))
    with pytest.raises(ValueError, match="weight has 5 entries"):
        ops.group_norm(x, 2, torch.randn(5))


# -- the triton backend's split statistics ----------------------------------------------------------


@pytest.mark.parametrize("layout,residual_layout", [("nchw", "channels_last"), ("channels_last", "nchw"), ("nchw", None)])
def test_triton_split_reduction_matches_reference(layout, residual_layout, device):
    """Tiny tiles force every split at once: 4-channel blocks straddling groups of 5 channels, 2 tiles a
    chunk, 2 chunks a channel (the last tile cut short), so 4 channel blocks × 2 chunks per group."""
    require_backend("group_norm", "triton", device)
    from flashstep.backends.triton.group_norm import GroupNormBlocks, group_norm_fwd

    batch, channels, height, width, groups = 2, 30, 7, 9, 6
    blocks = GroupNormBlocks(block_c=4, block_s=16, tiles_per_chunk=2)
    assert height * width > blocks.block_s * blocks.tiles_per_chunk, "several chunks per channel"
    assert (channels // groups) % blocks.block_c, "channel blocks straddle groups"
    x = random_tensor((batch, channels, height, width), torch.float32, device, scale=3.0) + 0.5
    weight, bias = random_tensor((channels,), device=device), random_tensor((channels,), device=device)
    residual = None if residual_layout is None else random_tensor(x.shape, device=device)
    if layout == "channels_last":
        x = channels_last(x)
    if residual_layout == "channels_last":
        residual = channels_last(residual)
    out = group_norm_fwd(x, groups, weight, bias, 1e-6, "silu", residual, None, blocks)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert_close(out, group_norm_reference(x, groups, weight, bias, 1e-6, "silu", residual, None), atol=2e-5, rtol=2e-5)


def test_triton_split_statistics_stay_exact_far_from_zero(device):
    """mean 1000, std 1: E[x²] - E[x]² in fp32 would miss rstd by ~10%; the two-level Welford/Chan
    reduction keeps it within a few fp32 ulps of the float64 value."""
    require_backend("group_norm", "triton", device)
    from flashstep.backends.triton.group_norm import GroupNormBlocks, channels_spatial, group_norm_statistics

    x = random_tensor((1, 8, 64, 64), torch.float32, device) + 1000.0
    mean, rstd = group_norm_statistics(channels_spatial(x), 2, 1e-6, GroupNormBlocks(4, 256, 4))
    grouped = x.double().reshape(1, 2, -1)
    expected_mean = grouped.mean(dim=-1)
    expected_rstd = torch.rsqrt(grouped.var(dim=-1, unbiased=False) + 1e-6)
    assert_close(mean.double(), expected_mean, atol=1e-4, rtol=1e-7, label="mean")
    assert_close(rstd.double(), expected_rstd, atol=0.0, rtol=1e-5, label="rstd")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_gpu_launch_spreads_the_vae_groups_over_the_gpu(layout, monkeypatch):
    """On a 132-SM GPU the VAE decoder's (1, 128, 2048², 32 groups) runs its statistics over several hundred
    programs, not one per group, and tiles along the contiguous axis."""
    import triton

    from flashstep.backends.triton import group_norm as triton_group_norm

    monkeypatch.setattr(triton_group_norm, "interpreting", lambda: False)
    monkeypatch.setattr(triton_group_norm, "multiprocessor_count", lambda device: 132)
    batch, channels, size = 1, 128, 2048
    x = torch.empty((batch, channels, size, size), dtype=torch.float16, device="meta")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    view = triton_group_norm.channels_spatial(x)
    blocks = triton_group_norm.default_blocks(view, batch, channels, size * size)
    assert blocks.block_c * blocks.block_s == triton_group_norm.GPU_TILE
    if layout == "channels_last":
        assert blocks.block_c == 64
    else:
        assert blocks.block_c == 1 and blocks.block_s == triton_group_norm.GPU_TILE
    chunks = triton.cdiv(size * size, blocks.block_s * blocks.tiles_per_chunk)
    statistics_programs = chunks * batch * triton.cdiv(channels, blocks.block_c)
    assert 2 * 132 <= statistics_programs <= 16 * 132


def test_triton_group_norm_of_a_sequence(device):
    """(B, C, L) inputs, as a 1-D feature map, with a transposed (channels-fastest) residual."""
    require_backend("group_norm", "triton", device)
    x = random_tensor((2, 12, 50), torch.float32, device, scale=2.0) - 1.0
    weight, bias = random_tensor((12,), device=device), random_tensor((12,), device=device)
    residual = random_tensor((2, 50, 12), device=device).transpose(1, 2)
    out = ops.group_norm(x, 3, weight, bias, 1e-5, "silu", residual, backend="triton")
    assert_close(out, group_norm_reference(x, 3, weight, bias, 1e-5, "silu", residual, None), atol=2e-5, rtol=2e-5)
