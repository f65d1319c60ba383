"""geglu: the SD UNet transformer's feed-forward projection with its gate (batch 2).

[h, g] = x·Wᵀ + b with W (2·inner, in), y = h · gelu(g). Peer: diffusers' ``GEGLU``,
``F.linear`` then ``chunk(2, -1)`` then ``h * F.gelu(g)``. TFLOP/s count the GEMM's 2·M·N·K
(M = batch·tokens, N = 2·inner); GB/s count x and W read and y (inner wide) written once.
"""
import pytest
import torch.nn.functional as F

from flashstep import ops

import shapes


def diffusers_geglu(x, weight, bias):
    """x (B, L, in) -> (B, L, inner)."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@pytest.mark.op("geglu")
@pytest.mark.parametrize("shape", shapes.GEGLU, ids=shapes.name_of)
def test_geglu(shape, backend, op_benchmark):
    x = op_benchmark.tensor(shape.batch, shape.tokens, shape.in_features)
    weight = op_benchmark.weight(shape.out_features, shape.in_features)
    bias = op_benchmark.tensor(shape.out_features, scale=0.1)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.geglu(x, weight, bias, backend=name),
        eager=diffusers_geglu,
        args=(x, weight, bias),
        flops=shape.flops(),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize, out_features=shape.out_features // 2),
    )
