"""linear on the SD UNet transformer's projections (batch 2), plain and with S3Diff's rank-32 per-sample
LoRA.

* ``plain``: y = x·Wᵀ + b. Peer: ``F.linear``.
* ``lora_r32_per_sample``: y_b = x_b·Wᵀ + b + s · (x_b·Aᵀ) · M_b · Bᵀ, M (B, r, r). Peer: S3Diff's
  ``my_lora_fwd``, base(x) + s · lora_B(einsum('blk,bkr->blr', lora_A(x), M)).

TFLOP/s count the layer's own 2·M·N·K (M = batch·tokens), not the LoRA branch.
"""
import pytest
import torch
import torch.nn.functional as F

from flashstep import ops
from flashstep.ops import LoRA

import shapes


def plain_linear(x, weight, bias):
    """x (B, L, in) -> (B, L, out)."""
    return F.linear(x, weight, bias)


def s3diff_lora_linear(x, weight, bias, down, up, mix, scale):
    """x (B, L, in) -> (B, L, out); down (r, in), up (out, r), mix (B, r, r)."""
    t = torch.einsum("blk,bkr->blr", F.linear(x, down), mix)  # (B, L, r)
    return F.linear(x, weight, bias) + scale * F.linear(t, up)


def layer(op_benchmark, shape):
    x = op_benchmark.tensor(shape.batch, shape.tokens, shape.in_features)
    weight = op_benchmark.weight(shape.out_features, shape.in_features)
    bias = op_benchmark.tensor(shape.out_features, scale=0.1)
    return x, weight, bias


def work(op_benchmark, shape):
    return {"flops": shape.flops(), "bytes_moved": shape.bytes_moved(op_benchmark.dtype.itemsize)}


@pytest.mark.op("linear")
@pytest.mark.parametrize("shape", shapes.LINEAR, ids=shapes.name_of)
def test_linear(shape, backend, op_benchmark):
    x, weight, bias = layer(op_benchmark, shape)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.linear(x, weight, bias, backend=name),
        eager=plain_linear,
        args=(x, weight, bias),
        variant="plain",
        **work(op_benchmark, shape),
    )


@pytest.mark.op("linear")
@pytest.mark.parametrize("shape", shapes.LINEAR_PER_SAMPLE_LORA, ids=shapes.name_of)
def test_linear_lora_r32_per_sample(shape, backend, op_benchmark):
    x, weight, bias = layer(op_benchmark, shape)
    rank = shapes.S3DIFF_LORA_RANK
    adapter = LoRA(
        op_benchmark.weight(rank, shape.in_features),
        op_benchmark.weight(shape.out_features, rank),
        shapes.S3DIFF_LORA_SCALE,
        op_benchmark.weight(shape.batch, rank, rank),
    )
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.linear(x, weight, bias, lora=adapter, backend=name),
        eager=s3diff_lora_linear,
        args=(x, weight, bias, adapter.down, adapter.up, adapter.mix, adapter.scale),
        variant="lora_r32_per_sample",
        **work(op_benchmark, shape),
    )
