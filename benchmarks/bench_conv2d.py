"""conv2d on the SD UNet's 3×3 convolutions (batch 2, as S3Diff's guided UNet runs them): plain, with
OSEDiff's rank-4 LoRA, and with S3Diff's rank-32 per-sample LoRA.

* ``plain``: y = conv(x, W) + b. Peer: ``F.conv2d``.
* ``lora_r4_merged``: flashstep merges a static LoRA into W at load, so the op runs the plain conv on
  W' = W + s·B·A. Peer: peft's unmerged forward, conv(x, W) + b + s · conv1×1(conv(x, A), B).
* ``lora_r32_per_sample``: y_b = conv(x_b, W) + b + s · B · M_bᵀ · conv(x_b, A), M (B, r, r). Peer:
  S3Diff's ``my_lora_fwd``, the same with an einsum for Mᵀ and a 1×1 conv for B.

TFLOP/s count the layer's own 2·Cout·Cin·k²·H·W per image, not the LoRA branch: they compare what
each variant costs for the same layer.
"""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops import LoRA, merge_lora

import shapes


def plain_conv(x, weight, bias):
    """x (B, Cin, H, W) -> (B, Cout, H, W), 3×3 "same"."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)


def peft_lora_conv(x, weight, bias, down, up, scale):
    """peft's LoRA conv: base(x) + scale · lora_B(lora_A(x)); down (r, Cin, k, k), up (Cout, r)."""
    padding = weight.shape[-1] // 2
    t = F.conv2d(x, down, padding=padding)  # (B, r, H, W)
    return F.conv2d(x, weight, bias, padding=padding) + scale * F.conv2d(t, up[:, :, None, None])


def s3diff_lora_conv(x, weight, bias, down, up, mix, scale):
    """S3Diff's per-sample LoRA conv: base(x) + scale · lora_B(einsum('bkhw,bkr->brhw', lora_A(x), M))."""
    padding = weight.shape[-1] // 2
    t = F.conv2d(x, down, padding=padding)  # (B, r, H, W)
    t = torch.einsum("bkhw,bkr->brhw", t, mix)
    return F.conv2d(x, weight, bias, padding=padding) + scale * F.conv2d(t, up[:, :, None, None])


def layer(op_benchmark, shape):
    x = op_benchmark.tensor(shape.batch, shape.in_channels, shape.height, shape.width)
    weight = op_benchmark.weight(shape.out_channels, shape.in_channels, shape.kernel, shape.kernel)
    bias = op_benchmark.tensor(shape.out_channels, scale=0.1)
    return x, weight, bias


def lora(op_benchmark, shape, rank, scale, per_sample):
    down = op_benchmark.weight(rank, shape.in_channels, shape.kernel, shape.kernel)
    up = op_benchmark.weight(shape.out_channels, rank)
    mix = op_benchmark.weight(shape.batch, rank, rank) if per_sample else None
    return LoRA(down, up, scale, mix)


def plain_case(op_benchmark, shape):
    x, weight, bias = layer(op_benchmark, shape)
    ours = lambda name: ops.conv2d(x, weight, bias, padding=shape.kernel // 2, backend=name)  # noqa: E731
    return ours, plain_conv, (x, weight, bias)


def lora_r4_merged_case(op_benchmark, shape):
    x, weight, bias = layer(op_benchmark, shape)
    adapter = lora(op_benchmark, shape, shapes.OSEDIFF_LORA_RANK, shapes.OSEDIFF_LORA_SCALE, per_sample=False)
    merged = merge_lora(weight, adapter)
    ours = lambda name: ops.conv2d(x, merged, bias, padding=shape.kernel // 2, backend=name)  # noqa: E731
    return ours, peft_lora_conv, (x, weight, bias, adapter.down, adapter.up, adapter.scale)


def lora_r32_per_sample_case(op_benchmark, shape):
    x, weight, bias = layer(op_benchmark, shape)
    adapter = lora(op_benchmark, shape, shapes.S3DIFF_LORA_RANK, shapes.S3DIFF_LORA_SCALE, per_sample=True)
    ours = lambda name: ops.conv2d(x, weight, bias, padding=shape.kernel // 2, lora=adapter, backend=name)  # noqa: E731
    return ours, s3diff_lora_conv, (x, weight, bias, adapter.down, adapter.up, adapter.mix, adapter.scale)


# For each shape, the plain conv and then the per-sample LoRA: the pair one target compares.
VARIANTS = {
    "plain": plain_case,
    "lora_r32_per_sample": lora_r32_per_sample_case,
    "lora_r4_merged": lora_r4_merged_case,
}


@pytest.mark.op("conv2d")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", shapes.CONV, ids=shapes.name_of)
def test_conv2d(shape, variant, backend, op_benchmark):
    ours, eager, args = VARIANTS[variant](op_benchmark, shape)
    op_benchmark.run(
        shape,
        backend,
        ours=ours,
        eager=eager,
        args=args,
        variant=variant,
        flops=shape.flops(),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize),
    )
