"""group_norm + SiLU on the SD UNet's and VAE's widths, and the device-copy bandwidth ceiling.

y = silu(GroupNorm_32(x) · weight + bias), x (B, C, H, W). Peers: ``eager`` is
``F.silu(F.group_norm(...))`` as diffusers' resnet blocks run it, ``compile`` its ``torch.compile``.
Memory-bound: GB/s counts x read once and y written once; ``test_device_copy`` measures the ceiling
those GB/s are judged against (a large device-to-device copy, bytes read plus bytes written).
"""
import pytest
import torch.nn.functional as F

from flashstep import ops

import shapes


def group_norm_silu(x, num_groups, weight, bias):
    """x (B, C, H, W) -> silu(group_norm(x)), the same shape."""
    return F.silu(F.group_norm(x, num_groups, weight, bias))


# NOTE: the copy runs first, so that a time budget that ends the file early keeps the ceiling.
@pytest.mark.op("device_copy")
@pytest.mark.parametrize("shape", shapes.DEVICE_COPY, ids=shapes.name_of)
def test_device_copy(shape, op_benchmark):
    source = op_benchmark.tensor(shape.numel // op_benchmark.dtype.itemsize)
    target = op_benchmark.tensor(source.numel())
    op_benchmark.run_call(
        shape,
        "eager",
        lambda: target.copy_(source),
        lambda: source,
        bytes_moved=shape.bytes_moved(),
    )


@pytest.mark.op("group_norm")
@pytest.mark.parametrize("shape", shapes.GROUP_NORM, ids=shapes.name_of)
def test_group_norm_silu(shape, backend, op_benchmark):
    x = op_benchmark.tensor(shape.batch, shape.channels, shape.height, shape.width)
    weight = 1 + op_benchmark.tensor(shape.channels, scale=0.1)
    bias = op_benchmark.tensor(shape.channels, scale=0.1)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.group_norm(x, shape.groups, weight, bias, activation="silu", backend=name),
        eager=group_norm_silu,
        args=(x, shape.groups, weight, bias),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize),
    )
