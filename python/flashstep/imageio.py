"""Reading images from disk and writing them back, safely.

Reading: the file is decoded fully (a truncated or corrupt file fails here, not later), EXIF orientation
is applied, animated images give their first frame, and a header that declares more than
``MAX_PIXELS`` pixels is refused before decoding (a decompression bomb). Every failure is an
:class:`ImageReadError` whose message is one line naming the file and the cause.

Writing: the format follows the extension (PNG, JPEG with a quality, WebP, TIFF); the image is written
to a file with no name in the destination folder (Linux ``O_TMPFILE``; a hidden ``.partial`` file
elsewhere) that gets the destination's name only when complete, so an interrupted or killed run leaves no
partial file. An existing file is replaced only with ``overwrite=True``, and an input file is never a
destination. Every failure is an :class:`ImageWriteError` naming the file and the cause.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Optional, Set, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# NOTE: 16384² output needs about 4096² input at ×4; anything beyond 2^28 input pixels (16384 × 16384)
# is refused as a likely decompression bomb.
MAX_PIXELS = 1 << 28

READ_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".tga", ".ppm", ".pgm")
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


class ImageReadError(ValueError):
    """An input image could not be read; the message names the file and the cause."""


class ImageWriteError(ValueError, OSError):
    """An output image could not be written; the message names the file and the cause. A ValueError (a bad
    path or option) and an OSError (the write itself failed), so handlers of either kind catch it."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
            # NOTE: Pillow warns about damaged metadata it skips ("Corrupt EXIF data"); the image itself
            # either decodes fully or fails below, so these would only clutter a batch's output.
            warnings.simplefilter("ignore", UserWarning)
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
    except PermissionError as error:
        raise ImageReadError(f"{path}: cannot be opened ({error.strerror})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"{path}: the image is truncated or corrupt ({_first_line(error)})") from None
    except Exception as error:
        # NOTE: Pillow's decoders parse untrusted bytes and a damaged file can make them fail with other types
        # too (an IndexError from a short iCCP chunk after the image data, found by fuzzing); to the caller
        # each of them means the same: a file that cannot be read.
        raise ImageReadError(f"{path}: the image is truncated or corrupt "
                             f"({type(error).__name__}: {_first_line(error)})") from None
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


# The modes each format stores as they are; other modes are converted first (see _prepare_for_format).
_NATIVE_MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("1", "L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
}


def _greyscale_16(image: Image.Image) -> np.ndarray:
    """A deep greyscale image (I;16*, I, F) as uint16 (H, W), read the way the pipelines read it: F in [0, 1],
    I as 16-bit when any value is above 255, else as 8-bit."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = np.clip(values, 0.0, 1.0) * 65535.0
    elif image.mode == "I" and values.max() <= 255:
        values = values * 257.0
    return np.clip(np.round(values), 0, 65535).astype(np.uint16)


def _prepare_for_format(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode ``fmt`` stores: deep greyscale stays 16-bit where the format allows (else 8-bit,
    scaled, never clipped), other modes become RGB, or RGBA where there is alpha and the format keeps it."""
    if image.mode in _NATIVE_MODES[fmt]:
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        deep = _greyscale_16(image)
        if "I;16" in _NATIVE_MODES[fmt]:
            return Image.fromarray(deep)
        image = Image.fromarray(np.round(deep / 257.0).astype(np.uint8))
        if image.mode in _NATIVE_MODES[fmt]:
            return image
    has_alpha = "A" in image.mode or "transparency" in image.info
    return image.convert("RGBA" if has_alpha and "RGBA" in _NATIVE_MODES[fmt] else "RGB")


# Named temporary files: .<name>.<pid>.<token>.partial; the pid tells a stale file from one being written.
PARTIAL_SUFFIX = ".partial"
_PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]+\.partial$")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def _partial_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Union[str, os.PathLike]) -> List[Path]:
    """Remove from ``folder`` the named temporary files (``.<name>.<pid>.<token>.partial``) of writers that no
    longer run (killed before they finished); files of running writers stay. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _PARTIAL_NAME.match(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink() or _process_runs(int(match["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def _save_to(fd: int, save: Callable[[BinaryIO], None]) -> None:
    with os.fdopen(fd, "wb", closefd=False) as stream:
        save(stream)
        stream.flush()
        os.fsync(stream.fileno())


def _open_unnamed(folder: Path) -> Optional[int]:
    """An unnamed file in ``folder`` (Linux ``O_TMPFILE``), or None where the system or file system has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | _O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _write_unnamed(fd: int, path: Path, save: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Write into the unnamed file ``fd``, then give it its name: a crash before that leaves nothing behind."""
    try:
        _save_to(fd, save)
        folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        try:
            # NOTE: a dst_dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW); plain link() would link the
            # /proc/self/fd symlink itself and fail with EXDEV.
            source = f"/proc/self/fd/{fd}"
            if not overwrite:
                os.link(source, path.name, dst_dir_fd=folder_fd, follow_symlinks=True)
            else:
                temporary = _partial_name(path.name)
                os.link(source, temporary, dst_dir_fd=folder_fd, follow_symlinks=True)
                try:
                    os.replace(temporary, path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
                except BaseException:
                    os.unlink(temporary, dir_fd=folder_fd)
                    raise
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
    finally:
        os.close(fd)


def _write_named(path: Path, save: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Write into a named temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.parent / _partial_name(path.name)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC, 0o666)
    try:
        try:
            _save_to(fd, save)
        finally:
            os.close(fd)
        if not overwrite and path.exists():
            raise FileExistsError(path)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def write_image(image: Image.Image, path: Union[str, os.PathLike], *, quality: int = 95, overwrite: bool = False,
                protected: Optional[Set[Path]] = None) -> Path:
    """Write ``image`` to ``path`` atomically; ``protected``: paths never written (the inputs).

    On Linux the image goes to an unnamed ``O_TMPFILE`` file in the destination folder that is linked into
    place only when complete, so not even a killed process leaves a partial file; elsewhere it goes to a
    named temporary file (``.<name>.<pid>.<token>.partial``) renamed over the destination, which
    :func:`remove_stale_partials` clears after a crash. Raises :class:`ImageWriteError`.
    """
    path = Path(path)
    fmt = output_format(path)
    resolved = path.resolve()
    if protected and resolved in {p.resolve() for p in protected}:
        raise ImageWriteError(f"{path}: is one of the inputs; refusing to overwrite an input (choose another output)")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    if not 1 <= int(quality) <= 100:
        raise ImageWriteError(f"quality={quality} must be in 1..100")
    options = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}

    def save(stream: BinaryIO) -> None:
        _prepare_for_format(image, fmt).save(stream, format=fmt, **options)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImageWriteError(f"{path}: cannot write the image: cannot create its folder ({error})") from error
    try:
        fd = _open_unnamed(path.parent)
        if fd is None:
            _write_named(path, save, overwrite)
        else:
            _write_unnamed(fd, path, save, overwrite)
    except FileExistsError:
        raise ImageWriteError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it") from None
    except (OSError, ValueError) as error:
        raise ImageWriteError(f"{path}: cannot write the image ({error})") from error
    return path
