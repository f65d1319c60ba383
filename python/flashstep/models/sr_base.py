"""What every one-pass SR net shares: the image contract, padding to the size the net needs, cropping back.

    y = crop(net(pad(x)))    x: (B, C_in, H, W) in [0, 1]  ->  y: (B, C_out, H·s, W·s), about [0, 1]

``pad`` extends the bottom and right edges by reflection up to the next multiple of ``size_multiple`` (the
pixel-unshuffle factor of RRDBNet x2/x1, SwinIR's window); ``crop`` keeps the top-left H·s × W·s of the
output. Outputs are not clamped: the caller clamps once when it turns the tensor into an image.

``supports_fp16`` / ``supports_bf16`` say which half precisions the net is meant to run in, with the
values of spandrel's descriptors: RRDBNet and SRVGG both, SwinIR bf16 only.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right edges of x (B, C, H, W) up to multiples of ``multiple``.

    NOTE: reflection needs the pad to be smaller than the side; images smaller than the pad (a 3-pixel
    side against a window of 8) are extended by replication instead.
    """
    height, width = x.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class SRNet(nn.Module, abc.ABC):
    """Base of the one-pass SR nets: subclasses set the attributes and implement :meth:`forward_padded`."""

    scale: int
    input_channels: int
    output_channels: int
    size_multiple: int = 1
    supports_fp16: bool = True
    supports_bf16: bool = True

    @abc.abstractmethod
    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) with H and W multiples of ``size_multiple`` -> (B, C_out, H·s, W·s)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) in [0, 1], any H and W -> (B, C_out, H·s, W·s)."""
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(
                f"{type(self).__name__} takes images of shape (B, {self.input_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        y = self.forward_padded(pad_to_multiple(x, self.size_multiple))
        if y.shape[-2] == height * self.scale and y.shape[-1] == width * self.scale:
            return y
        return y[:, :, : height * self.scale, : width * self.scale]
