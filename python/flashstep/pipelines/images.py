"""Images in and out of pipelines: PIL, numpy or torch, one image or a list, back in the same kind.

Inside, an image is a float32 tensor (3, H, W) in [0, 1]. An alpha channel is split off on the way in
(upscaled separately by the pipeline) and re-attached on the way out; 16-bit inputs come back as 16-bit
where the kind allows (numpy uint16, PIL "I;16" for greyscale, else 8-bit RGB). Float pixels are clipped
to [0, 1], NaN read as 0, +inf as 1 and -inf as 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "numpy", "torch")


@dataclass
class ImageInfo:
    """How one input image was given, so that its output can be given back the same way."""

    kind: str  # "pil" | "numpy" | "torch"
    dtype: Any = None  # numpy dtype or torch dtype of the input
    alpha: Optional[torch.Tensor] = None  # (1, H, W) in [0, 1]
    greyscale: bool = False
    bits: int = 8


@dataclass
class ImageBatch:
    """Images as (3, H, W) float tensors in [0, 1], with how each was given."""

    images: List[torch.Tensor]
    infos: List[ImageInfo]
    single: bool
    torch_batched: bool = False  # the input was one (B, 3, H, W) tensor
    sizes: List[tuple] = field(default_factory=list)

    @classmethod
    def from_user(cls, images: Any) -> "ImageBatch":
        single = not isinstance(images, (list, tuple))
        torch_batched = isinstance(images, torch.Tensor) and images.dim() == 4
        if torch_batched:
            items: Sequence[Any] = list(images)
            single = False
        else:
            items = [images] if single else list(images)
        if not items:
            raise ValueError("no images given")
        tensors, infos = [], []
        for index, item in enumerate(items):
            tensor, info = to_tensor(item, where=f"image {index}")
            tensors.append(tensor)
            infos.append(info)
        return cls(tensors, infos, single, torch_batched, [tuple(t.shape[-2:]) for t in tensors])

    def to_user(self, outputs: List[torch.Tensor], output_type: Optional[str] = None) -> Any:
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; valid: {', '.join(OUTPUT_TYPES)} or None (same as the input)")
        converted = [from_tensor(out, info, output_type) for out, info in zip(outputs, self.infos)]
        if self.torch_batched and (output_type in (None, "torch")) and len({tuple(c.shape) for c in converted}) == 1:
            return torch.stack(converted)
        return converted[0] if self.single else converted


def _finite_unit(values: np.ndarray) -> np.ndarray:
    """Float pixels clipped to [0, 1], NaN as 0 and ±inf as 1 / 0 (a float file may hold any value)."""
    return np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _from_numpy(array: np.ndarray, where: str):
    info = ImageInfo("numpy", dtype=array.dtype)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{where}: a numpy image must be (H, W), (H, W, 1|2|3|4), got shape {array.shape}")
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values, info.bits = array.astype(np.float32) / 65535.0, 16
    elif np.issubdtype(array.dtype, np.floating):
        values = _finite_unit(array.astype(np.float32))
    else:
        raise ValueError(f"{where}: numpy images must be uint8, uint16 or float in [0, 1], got {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1)
    return _split_channels(tensor, info)


def _split_channels(tensor: torch.Tensor, info: ImageInfo):
    channels = tensor.shape[0]
    if channels in (2, 4):
        info.alpha = tensor[-1:].clone()
        tensor = tensor[:-1]
    if tensor.shape[0] == 1:
        info.greyscale = True
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous().float(), info


def _from_pil(image, where: str):
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.float64)
        scale = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        info = ImageInfo("pil", dtype=mode, greyscale=True, bits=16 if scale > 255 else 8)
        tensor = torch.from_numpy((np.clip(array / scale, 0, 1)).astype(np.float32))[None].expand(3, -1, -1)
        return tensor.contiguous(), info
    if mode == "F":
        array = _finite_unit(np.asarray(image, dtype=np.float32))
        return torch.from_numpy(array)[None].expand(3, -1, -1).contiguous(), ImageInfo("pil", dtype=mode, greyscale=True)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")
    info = ImageInfo("pil", dtype=mode)
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return _split_channels(tensor, info)


def to_tensor(item: Any, where: str = "image"):
    """(tensor (3, H, W) float32 in [0, 1], ImageInfo) from a PIL image, numpy array or torch tensor."""
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] not in (1, 2, 3, 4):
            raise ValueError(f"{where}: a torch image must be (C, H, W) with C in 1..4 (or a (B, C, H, W) batch), got {tuple(item.shape)}")
        if not item.is_floating_point():
            raise ValueError(f"{where}: torch images must be floating point in [0, 1], got {item.dtype}")
        info = ImageInfo("torch", dtype=item.dtype)
        return _split_channels(item.detach().float().nan_to_num(0.0, 1.0, 0.0).clamp(0, 1).cpu(), info)
    if isinstance(item, np.ndarray):
        return _from_numpy(item, where)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return _from_pil(item, where)
    raise TypeError(f"{where}: expected a PIL image, a numpy array or a torch tensor, got {type(item).__name__}")


def _attach(tensor: torch.Tensor, info: ImageInfo) -> torch.Tensor:
    """(C, H, W) with greyscale collapsed and the (resized) alpha re-attached."""
    if info.greyscale:
        tensor = tensor.mean(dim=0, keepdim=True)
    if info.alpha is not None:
        alpha = info.alpha
        if alpha.shape[-2:] != tensor.shape[-2:]:
            alpha = torch.nn.functional.interpolate(alpha[None], size=tensor.shape[-2:], mode="bicubic",
                                                    align_corners=False)[0].clamp(0, 1)
        tensor = torch.cat([tensor, alpha.to(tensor)], dim=0)
    return tensor


def from_tensor(tensor: torch.Tensor, info: ImageInfo, output_type: Optional[str] = None):
    """Back to the kind (and bit depth) the image came in, or to ``output_type``."""
    kind = output_type or info.kind
    tensor = _attach(tensor.detach().float().clamp(0, 1).cpu(), info)
    if kind == "torch":
        dtype = info.dtype if isinstance(info.dtype, torch.dtype) else torch.float32
        return tensor.to(dtype)
    array = tensor.permute(1, 2, 0).numpy()
    if kind == "numpy":
        if info.kind == "numpy" and info.dtype == np.uint16:
            return np.round(array * 65535.0).astype(np.uint16)
        if info.kind == "numpy" and info.dtype is not None and np.issubdtype(info.dtype, np.floating):
            return array.astype(info.dtype)
        return np.round(array * 255.0).astype(np.uint8)
    from PIL import Image

    if info.bits == 16 and array.shape[2] == 1:
        return Image.fromarray(np.round(array[:, :, 0] * 65535.0).astype(np.uint16))  # mode I;16
    array8 = np.round(array * 255.0).astype(np.uint8)
    return Image.fromarray(array8[:, :, 0] if array8.shape[2] == 1 else array8)  # L, LA, RGB or RGBA
