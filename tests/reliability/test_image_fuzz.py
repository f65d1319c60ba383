"""Fuzzing image decoding below the byte level that tests/test_imageio.py fuzzes: files whose structure is
valid (PNG chunks with correct CRCs, GIF, BMP, JPEG and TIFF headers) but whose fields are drawn by hypothesis.
Every outcome is an image the pipelines accept or a one-line ImageReadError naming the file."""
from __future__ import annotations

import struct

from corpus import encode, photo, png_chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trials import try_image

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SIDES = st.one_of(st.integers(0, 64), st.sampled_from([1 << 15, 70000, 2**31 - 1, 2**32 - 1]))
BASE = photo(6, 5)
JPEG, TIFF, BMP = encode(BASE, "JPEG"), encode(BASE, "TIFF"), encode(BASE, "BMP")


def assert_clean(path) -> None:
    (through, result, message), = try_image(path)
    assert result != "traceback", message


@SETTINGS
@given(width=SIDES, height=SIDES, bit_depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]),
       colour=st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7]), interlace=st.sampled_from([0, 1, 2]),
       rows=st.binary(max_size=300), compress=st.booleans(),
       extra=st.lists(st.tuples(st.sampled_from([b"PLTE", b"tRNS", b"gAMA", b"eXIf", b"iCCP", b"zTXt", b"acTL",
                                                 b"fcTL", b"sBIT", b"pHYs", b"IDAT"]),
                                st.binary(max_size=64)), max_size=4))
def test_png_with_drawn_header_and_chunks(tmp_path, width, height, bit_depth, colour, interlace, rows, compress,
                                          extra):
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, interlace)
    body = b"".join(png_chunk(kind, data) for kind, data in extra)
    idat = zlib.compress(rows) if compress else rows
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + body + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))
    path = tmp_path / "drawn.png"
    path.write_bytes(data)
    assert_clean(path)


@SETTINGS
@given(width=SIDES, height=SIDES, flags=st.integers(0, 255), frame=st.tuples(SIDES, SIDES, st.integers(0, 255)),
       lzw=st.integers(0, 12), data=st.binary(max_size=64), frames=st.integers(1, 3))
def test_gif_with_drawn_screen_and_frames(tmp_path, width, height, flags, frame, lzw, data, frames):
    screen = b"GIF89a" + struct.pack("<HHBBB", width % 65536, height % 65536, flags, 0, 0)
    if flags & 0x80:
        screen += bytes(3 * (2 << (flags & 7)))
    frame_width, frame_height, frame_flags = frame
    block = (b"\x2c" + struct.pack("<HHHHB", 0, 0, frame_width % 65536, frame_height % 65536, frame_flags & 0x40)
             + bytes([lzw]) + bytes([len(data)]) + data + b"\x00")
    path = tmp_path / "drawn.gif"
    path.write_bytes(screen + block * frames + b"\x3b")
    assert_clean(path)


@SETTINGS
@given(width=st.integers(-70000, 70000), height=st.integers(-70000, 70000),
       bits=st.sampled_from([0, 1, 4, 8, 16, 24, 32, 7]),
       compression=st.integers(0, 6), colours=st.integers(0, 2**20), offset=st.integers(0, 4096))
def test_bmp_with_drawn_header(tmp_path, width, height, bits, compression, colours, offset):
    header = bytearray(BMP)
    header[10:14] = struct.pack("<I", offset)
    header[18:26] = struct.pack("<ii", width, height)
    header[28:30] = struct.pack("<H", bits)
    header[30:34] = struct.pack("<I", compression)
    header[46:50] = struct.pack("<I", colours)
    path = tmp_path / "drawn.bmp"
    path.write_bytes(bytes(header))
    assert_clean(path)


@SETTINGS
@given(height=st.integers(0, 65535), width=st.integers(0, 65535), components=st.integers(0, 5),
       precision=st.sampled_from([8, 12, 16, 0]), sampling=st.integers(0, 255),
       marker=st.sampled_from([0xC0, 0xC1, 0xC2]))
def test_jpeg_with_drawn_frame_header(tmp_path, height, width, components, precision, sampling, marker):
    data = bytearray(JPEG)
    at = data.index(b"\xff\xc0")
    data[at + 1] = marker
    data[at + 4] = precision
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    data[at + 9] = components
    data[at + 11] = sampling
    path = tmp_path / "drawn.jpg"
    path.write_bytes(bytes(data))
    assert_clean(path)


TIFF_TAGS = st.sampled_from([256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 338, 339, 322, 323, 324, 325,
                             320, 34665])


@SETTINGS
@given(edits=st.lists(st.tuples(TIFF_TAGS, st.sampled_from([1, 3, 4, 5, 16]), st.integers(0, 2**32 - 1),
                                st.integers(0, 2**32 - 1)), min_size=1, max_size=4))
def test_tiff_with_drawn_tags(tmp_path, edits):
    """Entries of the first IFD replaced by (tag, type, count, value) drawn ones."""
    data = bytearray(TIFF)
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd : ifd + 2])[0]
    for index, (tag, kind, number, value) in enumerate(edits):
        entry = ifd + 2 + 12 * (index * 3 % count)
        data[entry : entry + 12] = struct.pack("<HHII", tag, kind, number, value)
    path = tmp_path / "drawn.tif"
    path.write_bytes(bytes(data))
    assert_clean(path)
