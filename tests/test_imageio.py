"""Reading images safely and writing them atomically; a fuzz corpus of malformed files."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flashstep.imageio import MAX_PIXELS, ImageReadError, ImageWriteError, list_images, read_image, write_image
from flashstep.pipelines.images import ImageBatch


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height pixels but holds almost no data."""
    header = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return header + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


PHOTO = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))

MALFORMED = {
    "empty.png": b"",
    "text.png": b"this is not an image at all\n",
    "truncated.png": png_bytes(PHOTO)[:60],
    "truncated.jpg": png_bytes(PHOTO, format="JPEG")[:200],
    "garbage_after_header.png": png_bytes(PHOTO)[:33] + os.urandom(64),
    "bomb.png": bomb_png(70000, 70000),
    "zero_size.png": bomb_png(0, 0),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_fail_with_one_line_naming_the_file(tmp_path, name):
    path = write(tmp_path, name, MALFORMED[name])
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = write(tmp_path, "bomb.png", bomb_png(1 << 15, 1 << 14))
    assert (1 << 15) * (1 << 14) > MAX_PIXELS
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path)


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_reads_and_converts(tmp_path, mode):
    image = PHOTO.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        {"I;16": np.full((20, 30), 40000, np.uint16), "I": np.full((20, 30), 70000, np.int32),
         "F": np.full((20, 30), 0.25, np.float32)}[mode])
    if mode == "P":
        image.info["transparency"] = 0
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    path = write(tmp_path, f"image.{fmt.lower()}", png_bytes(image, format=fmt))
    loaded = read_image(path)
    batch = ImageBatch.from_user(loaded)
    tensor = batch.images[0]
    assert tensor.shape == (3, 20, 30)
    assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1


def test_sixteen_bit_png_stays_sixteen_bit(tmp_path):
    array = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 97) % 65535
    path = write(tmp_path, "deep.png", png_bytes(Image.fromarray(array)))
    batch = ImageBatch.from_user(read_image(path))
    out = batch.to_user(batch.images)
    assert out.mode == "I;16"
    assert np.array_equal(np.asarray(out), array)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = write(tmp_path, "rotated.jpg", png_bytes(image, format="JPEG", exif=exif.tobytes()))
    assert read_image(path).size == (10, 40)


def test_animated_images_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    loaded = read_image(write(tmp_path, "anim.gif", buffer.getvalue())).convert("RGB")
    assert loaded.getpixel((0, 0))[0] > 200


def test_one_pixel_image(tmp_path):
    path = write(tmp_path, "dot.png", png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert read_image(path).size == (1, 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cut=st.integers(min_value=0, max_value=2000), flip=st.integers(0, 255))
def test_fuzzed_bytes_never_raise_anything_but_a_read_error(tmp_path, data, cut, flip):
    """Random bytes and mutations of valid files: an image or ImageReadError, never another exception."""
    base = png_bytes(PHOTO)
    mutated = bytearray(base[: max(1, cut)])
    if mutated:
        mutated[len(mutated) // 2] ^= flip
    for candidate in (data, bytes(mutated), bytes(mutated) + data):
        path = write(tmp_path, "fuzz.png", candidate)
        try:
            read_image(path)
        except ImageReadError:
            pass


# -- writing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".tif"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_every_output_format_is_written(tmp_path, suffix, mode):
    image = PHOTO.convert(mode) if mode != "I;16" else Image.fromarray(np.full((20, 30), 1000, np.uint16))
    path = write_image(image, tmp_path / f"out{suffix}")
    assert read_image(path).size == (30, 20)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left"


def test_existing_output_needs_overwrite(tmp_path):
    target = write_image(PHOTO, tmp_path / "out.png")
    before = target.read_bytes()
    with pytest.raises(ImageWriteError, match="already exists; pass --overwrite"):
        write_image(PHOTO.convert("L"), target)
    assert target.read_bytes() == before
    write_image(PHOTO.convert("L"), target, overwrite=True)
    assert read_image(target).mode == "L"


def test_an_input_is_never_overwritten(tmp_path):
    source = write(tmp_path, "in.png", png_bytes(PHOTO))
    before = source.read_bytes()
    with pytest.raises(ImageWriteError, match="refusing to overwrite an input"):
        write_image(PHOTO, source, overwrite=True, protected={source})
    assert source.read_bytes() == before


def test_unknown_extension_lists_the_valid_ones(tmp_path):
    with pytest.raises(ImageWriteError, match="valid: .jpeg, .jpg, .png"):
        write_image(PHOTO, tmp_path / "out.xyz")


def test_a_failure_while_saving_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(PHOTO, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_list_images_takes_files_and_folders(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(PHOTO))
    (tmp_path / "b.jpg").write_bytes(png_bytes(PHOTO, format="JPEG"))
    (tmp_path / "notes.txt").write_text("x")
    found = list_images([tmp_path, tmp_path / "c.png"])
    assert [p.name for p in found] == ["a.png", "b.jpg", "c.png"]
