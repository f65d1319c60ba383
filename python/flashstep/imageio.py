"""Reading images from disk and writing them back, safely.

Reading: the file is decoded fully (a truncated or corrupt file fails here, not later), EXIF orientation
is applied, animated images give their first frame, and a header that declares more than
``MAX_PIXELS`` pixels is refused before decoding (a decompression bomb). Every failure is an
:class:`ImageReadError` whose message is one line naming the file and the cause.

Writing: the format follows the extension (PNG, JPEG with a quality, WebP, TIFF); the image goes to a
temporary file in the destination folder that is renamed over the destination only when complete, so an
interrupted run leaves no partial file. An existing file is replaced only with ``overwrite=True``, and an
input file is never a destination.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Set, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# NOTE: 16384² output needs about 4096² input at ×4; anything beyond 2^28 input pixels (16384 × 16384)
# is refused as a likely decompression bomb.
MAX_PIXELS = 1 << 28

READ_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".tga", ".ppm", ".pgm")
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


class ImageReadError(ValueError):
    """An input image could not be read; the message names the file and the cause."""


class ImageWriteError(ValueError):
    """An output image could not be written; the message names the file and the cause."""


def read_image(path: Union[str, os.PathLike]) -> Image.Image:
    """The image at ``path``, decoded, upright, first frame. Raises :class:`ImageReadError`."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{path}: declares {width}×{height} pixels, more than the limit of {MAX_PIXELS} "
                        "(a decompression bomb or an image too large to upscale)"
                    )
                if getattr(opened, "is_animated", False):
                    opened.seek(0)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image is opened:
                    image = opened.copy()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file that Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"{path}: the image is truncated or corrupt ({error})") from None
    if image.width < 1 or image.height < 1:
        raise ImageReadError(f"{path}: the image has no pixels ({image.width}×{image.height})")
    return image


def list_images(inputs: Iterable[Union[str, os.PathLike]]) -> List[Path]:
    """Files named directly, and the image files (by extension) inside named folders, sorted."""
    found: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READ_EXTENSIONS))
        else:
            found.append(path)
    return found


def output_format(path: Union[str, os.PathLike]) -> str:
    suffix = Path(path).suffix.lower()
    try:
        return WRITE_FORMATS[suffix]
    except KeyError:
        valid = ", ".join(sorted(WRITE_FORMATS))
        raise ImageWriteError(f"{path}: cannot write images with the extension {suffix or '(none)'!r}; valid: {valid}") from None


def _prepare_for_format(image: Image.Image, fmt: str) -> Image.Image:
    if fmt == "JPEG":
        if image.mode in ("RGBA", "LA", "P"):
            return image.convert("RGB")
        if image.mode == "I;16":
            return Image.fromarray((np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8))
        if image.mode in ("I", "F"):
            return image.convert("L")
    if fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if "A" in image.mode else "RGB")
    return image


def write_image(image: Image.Image, path: Union[str, os.PathLike], *, quality: int = 95, overwrite: bool = False,
                protected: Optional[Set[Path]] = None) -> Path:
    """Write atomically (temporary file + rename). ``protected``: paths never written (the inputs)."""
    path = Path(path)
    fmt = output_format(path)
    resolved = path.resolve()
    if protected and resolved in {p.resolve() for p in protected}:
        raise ImageWriteError(f"{path}: is one of the inputs; refusing to overwrite an input (choose another output)")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    if not 1 <= int(quality) <= 100:
        raise ImageWriteError(f"quality={quality} must be in 1..100")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            options = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
            _prepare_for_format(image, fmt).save(stream, format=fmt, **options)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path
