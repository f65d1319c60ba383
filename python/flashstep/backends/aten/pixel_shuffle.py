"""pixel_shuffle, pixel_unshuffle and conv2d_pixel_shuffle through torch's own kernels."""
from __future__ import annotations

import torch.nn.functional as F

from ...ops.pixel_shuffle import apply_activation


def pixel_shuffle(x, factor):
    return F.pixel_shuffle(x, factor)


def pixel_unshuffle(x, factor):
    return F.pixel_unshuffle(x, factor)


def conv2d_pixel_shuffle(x, weight, bias, factor, activation, negative_slope, residual):
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    y = apply_activation(F.pixel_shuffle(F.conv2d(x, weight, bias, padding=padding), factor), activation, negative_slope)
    return y if residual is None else y.add_(residual)
