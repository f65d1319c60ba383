"""The SR nets' upscaling heads: pixel_shuffle, pixel_unshuffle and conv2d_pixel_shuffle.

* ``pixel_shuffle`` (B, C·r², H, W) -> (B, C, H·r, W·r); peer ``F.pixel_shuffle``.
* ``pixel_unshuffle`` the inverse, on the input image; peer ``F.pixel_unshuffle``.
* ``conv2d_pixel_shuffle``: y = pixel_shuffle(conv3×3(x, W) + b, r) (+ the nearest-upsampled image for
  SRVGG); peer: ``F.conv2d``, ``F.pixel_shuffle`` and the add as the nets run them.

Shuffles are memory-bound (GB/s: input read once, output written once); the fused head reports the
conv's TFLOP/s and GB/s of x, W, the residual read and y written once.
"""
import pytest
import torch.nn.functional as F

from flashstep import ops

import shapes


def shuffle(x, factor):
    """(B, C·r², H, W) -> (B, C, H·r, W·r)."""
    return F.pixel_shuffle(x, factor)


def unshuffle(x, factor):
    """(B, C, H·r, W·r) -> (B, C·r², H, W)."""
    return F.pixel_unshuffle(x, factor)


def conv_then_shuffle(x, weight, bias, factor, residual):
    """x (B, Cin, H, W) -> (B, C, H·r, W·r); residual None or (B, C, H·r, W·r)."""
    y = F.pixel_shuffle(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2), factor)
    return y if residual is None else y + residual


@pytest.mark.op("pixel_shuffle")
@pytest.mark.parametrize("shape", shapes.PIXEL_SHUFFLE, ids=shapes.name_of)
def test_pixel_shuffle(shape, backend, op_benchmark):
    x = op_benchmark.tensor(shape.batch, shape.channels * shape.factor**2, shape.height, shape.width)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.pixel_shuffle(x, shape.factor, backend=name),
        eager=shuffle,
        args=(x, shape.factor),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize),
    )


@pytest.mark.op("pixel_unshuffle")
@pytest.mark.parametrize("shape", shapes.PIXEL_UNSHUFFLE, ids=shapes.name_of)
def test_pixel_unshuffle(shape, backend, op_benchmark):
    x = op_benchmark.tensor(shape.batch, shape.channels, shape.height * shape.factor, shape.width * shape.factor)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.pixel_unshuffle(x, shape.factor, backend=name),
        eager=unshuffle,
        args=(x, shape.factor),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize),
    )


@pytest.mark.op("conv2d_pixel_shuffle")
@pytest.mark.parametrize("shape", shapes.CONV_PIXEL_SHUFFLE, ids=shapes.name_of)
def test_conv2d_pixel_shuffle(shape, backend, op_benchmark):
    x = op_benchmark.tensor(shape.batch, shape.in_channels, shape.height, shape.width)
    weight = op_benchmark.weight(shape.conv_channels, shape.in_channels, shape.kernel, shape.kernel)
    bias = op_benchmark.tensor(shape.conv_channels, scale=0.1)
    residual = None
    if shape.residual:
        out_height, out_width = shape.height * shape.factor, shape.width * shape.factor
        residual = op_benchmark.tensor(shape.batch, shape.channels, out_height, out_width)
    op_benchmark.run(
        shape,
        backend,
        ours=lambda name: ops.conv2d_pixel_shuffle(x, weight, bias, shape.factor, residual=residual, backend=name),
        eager=conv_then_shuffle,
        args=(x, weight, bias, shape.factor, residual),
        flops=shape.flops(),
        bytes_moved=shape.bytes_moved(op_benchmark.dtype.itemsize),
    )
