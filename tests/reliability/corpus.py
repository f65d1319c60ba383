"""The malformed corpus: images and checkpoints that are broken, hostile or at the edges of what is valid,
generated here (nothing is downloaded) for tests/reliability and tools/reliability_report.py.

Each :class:`Case` says what must happen to its file:

* ``"ok"``: a valid but unusual input that must work (every PIL mode, 16-bit, float, 1×1, EXIF, animation);
* ``"error"``: it must fail with a one-line error naming the file;
* ``"either"``: it may work or fail (a JPEG cut after its last scan still decodes), but never with a
  traceback.

A malicious checkpoint (``Case.marker`` set) holds a pickle whose ``__reduce__`` would create the marker
file if anything ran it. Random mutations (bytes flipped, cut, overwritten, inserted, spliced) of valid
files come from a seeded generator, so a corpus is the same on every run.
"""
from __future__ import annotations

import builtins
import io
import json
import math
import os
import pickle
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from flashstep.models.srvgg import SRVGGConfig, SRVGGNetCompact


@dataclass(frozen=True)
class Case:
    """One file of the corpus and what must happen to it."""

    path: Path
    expect: str  # "ok" | "error" | "either"
    cause: str  # what is wrong (or unusual) about the file
    marker: Optional[Path] = None  # malicious: the file its payload would create

    @property
    def name(self) -> str:
        return self.path.name


# -- images -------------------------------------------------------------------------------------------------
def photo(height: int = 20, width: int = 30, seed: int = 0) -> Image.Image:
    """A small RGB noise image (H, W, 3) uint8."""
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG built chunk by chunk: IHDR as given, ``rows`` (filter byte + samples per row) as IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height RGB pixels but that holds almost no data."""
    return png_from_rows(width, height, 8, 2, b"\x00" * 16)


def sixteen_bit_rgb_png(height: int = 9, width: int = 11) -> bytes:
    samples = (np.arange(height * width * 3, dtype=np.uint32).reshape(height, width * 3) * 331 % 65536)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    return png_from_rows(width, height, 16, 2, rows)


def patch_jpeg_size(data: bytes, height: int, width: int) -> bytes:
    """The JPEG with the frame size in its SOF0 marker replaced."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def patch_bmp_size(data: bytes, height: int, width: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose screen and only frame declare width×height pixels, with one byte of image data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def with_exif(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes())


def animated(fmt: str, frames: int = 3) -> bytes:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (9, 7), colours[i % len(colours)]) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def deep_image(mode: str, height: int = 12, width: int = 10) -> Image.Image:
    """A gradient in a deep mode: I;16 (0..65535), I (0..70000), F (0..1)."""
    ramp = np.linspace(0.0, 1.0, height * width).reshape(height, width)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((ramp * 70000).astype(np.int32))
    return Image.fromarray(ramp.astype(np.float32))


def float_image(values) -> Image.Image:
    return Image.fromarray(np.asarray(values, dtype=np.float32))


def palette_with_transparency() -> bytes:
    image = photo().convert("P")
    return encode(image, "PNG", transparency=0)


def with_alpha(image: Image.Image) -> Image.Image:
    """``image`` with a left-to-right alpha ramp (0 .. 255) added."""
    ramp = Image.linear_gradient("L").rotate(90).resize(image.size)
    out = image.copy()
    out.putalpha(ramp)
    return out


def valid_images() -> Dict[str, bytes]:
    """Unusual but valid images, each of which must be upscaled."""
    base = photo()
    grey_alpha = with_alpha(base.convert("L"))
    return {
        "mode_1.png": encode(base.convert("1"), "PNG"),
        "mode_L.png": encode(base.convert("L"), "PNG"),
        "mode_LA.png": encode(grey_alpha, "PNG"),
        "mode_P_transparency.png": palette_with_transparency(),
        "mode_P.gif": encode(base.convert("P"), "GIF"),
        "mode_RGB.png": encode(base, "PNG"),
        "mode_RGBA.png": encode(with_alpha(base), "PNG"),
        "mode_RGBA_lossless.webp": encode(with_alpha(base), "WEBP", lossless=True),
        "mode_CMYK.jpg": encode(base.convert("CMYK"), "JPEG"),
        "mode_CMYK_tiff.tif": encode(base.convert("CMYK"), "TIFF"),
        "mode_I16.png": encode(deep_image("I;16"), "PNG"),
        "mode_I16_tiff.tif": encode(deep_image("I;16"), "TIFF"),
        "mode_I.tif": encode(deep_image("I"), "TIFF"),
        "mode_F.tif": encode(deep_image("F"), "TIFF"),
        "float_out_of_range.tif": encode(float_image([[-2.0, 0.5, 7.0], [1e30, -1e30, 0.25]]), "TIFF"),
        "float_nan_inf.tif": encode(float_image([[np.nan, np.inf], [-np.inf, 0.5]]), "TIFF"),
        "rgb_16bit.png": sixteen_bit_rgb_png(),
        "exif_rotate_90.jpg": with_exif(Image.new("RGB", (16, 6), (200, 10, 10)), "JPEG", 6),
        "exif_rotate_180.jpg": with_exif(base, "JPEG", 3),
        "exif_rotate_270.png": with_exif(Image.new("RGB", (16, 6), (10, 200, 10)), "PNG", 8),
        "exif_orientation_invalid.jpg": with_exif(base, "JPEG", 9),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "one_pixel_alpha.png": encode(Image.new("RGBA", (1, 1), (10, 20, 30, 40)), "PNG"),
        "odd_5x3_alpha.tif": encode(with_alpha(photo(3, 5)), "TIFF"),
        "one_pixel_jpeg.jpg": encode(Image.new("RGB", (1, 1), (10, 20, 30)), "JPEG"),
        "odd_1x9.png": encode(photo(9, 1), "PNG"),
        "odd_7x3.jpg": encode(photo(3, 7), "JPEG"),
        "odd_13x11.webp": encode(photo(11, 13), "WEBP"),
        "animated_gif.gif": animated("GIF"),
        "animated_png.png": animated("PNG"),
        "animated_webp.webp": animated("WEBP"),
        "progressive.jpg": encode(base, "JPEG", progressive=True),
        "greyscale.jpg": encode(base.convert("L"), "JPEG"),
        "bitmap.bmp": encode(base, "BMP"),
        "targa.tga": encode(base, "TGA"),
        "portable.ppm": encode(base, "PPM"),
        "portable_grey.pgm": encode(base.convert("L"), "PPM"),
    }


def malformed_images() -> Dict[str, bytes]:
    """Broken or hostile image files, each of which must fail with a clear error."""
    png, jpeg = encode(photo(), "PNG"), encode(photo(), "JPEG")
    gif, webp, tiff, bmp = (encode(photo(), fmt) for fmt in ("GIF", "WEBP", "TIFF", "BMP"))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "not an image")
    corrupt_idat = bytearray(png)
    idat = png.index(b"IDAT")
    corrupt_idat[idat + 10 : idat + 30] = bytes(20)
    return {
        "empty.png": b"",
        "empty_jpeg.jpg": b"",
        "text.png": b"this is not an image at all\n",
        "html.jpg": b"<!doctype html><html><body>404</body></html>",
        "zip_archive.png": zipped.getvalue(),
        "pickle.webp": pickle.dumps({"a": 1}, protocol=4),
        "riff_wave.webp": b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28),
        "png_signature_only.png": png[:8],
        "png_cut_in_header.png": png[:20],
        "png_cut_after_header.png": png[:33],
        "png_cut_in_data.png": png[: len(png) // 2],
        "png_bad_header_crc.png": png[:29] + bytes(4) + png[33:],
        "png_corrupt_data.png": bytes(corrupt_idat),
        "png_garbage_after_header.png": png[:33] + bytes(range(64)),
        "png_zero_size.png": bomb_png(0, 0),
        "png_bomb_70000x70000.png": bomb_png(70000, 70000),
        "png_bomb_32768x16384.png": bomb_png(1 << 15, 1 << 14),
        "png_bomb_max_uint31.png": bomb_png(2**31 - 1, 2**31 - 1),
        "jpeg_soi_only.jpg": jpeg[:2],
        "jpeg_cut_in_header.jpg": jpeg[:100],
        "jpeg_cut_in_scan.jpg": jpeg[: len(jpeg) // 2],
        "jpeg_bomb_65500x65500.jpg": patch_jpeg_size(jpeg, 65500, 65500),
        "jpeg_zero_size.jpg": patch_jpeg_size(jpeg, 0, 0),
        "gif_cut.gif": gif[: len(gif) // 2],
        "gif_bomb_65535x65535.gif": gif_bomb(65535, 65535),
        "webp_cut.webp": webp[: len(webp) // 2],
        "tiff_cut.tif": tiff[: len(tiff) // 2],
        "tiff_header_only.tif": tiff[:8],
        "bmp_cut.bmp": bmp[: len(bmp) // 2],
        "bmp_bomb_100000x100000.bmp": patch_bmp_size(bmp, 100000, 100000),
    }


def with_chunk_before_end(png: bytes, kind: bytes, body: bytes) -> bytes:
    end = png.rindex(b"IEND") - 4
    return png[:end] + png_chunk(kind, body) + png[end:]


def either_images() -> Dict[str, bytes]:
    """Damaged files that a decoder may still read (a missing end marker); clear error or image."""
    png, jpeg = encode(photo(), "PNG"), encode(photo(), "JPEG")
    exif_segment = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 24) + b"Exif\x00\x00" + bytes(range(24))
    corrupt_exif = jpeg[:2] + exif_segment + jpeg[2:]
    return {
        "png_without_end.png": png[:-12],
        "png_bad_end_crc.png": png[:-4] + bytes(4),
        "jpeg_without_end.jpg": jpeg[:-2],
        "jpeg_corrupt_exif.jpg": corrupt_exif,
        "png_trailing_garbage.png": png + b"garbage" * 10,
        "png_short_iccp_after_data.png": with_chunk_before_end(png, b"iCCP", b"x\x00"),
        "png_huge_text_after_data.png": with_chunk_before_end(png, b"zTXt",
                                                              b"k\x00\x00" + zlib.compress(bytes(1 << 24))),
    }


MUTATION_BASES = ("png", "jpg", "gif", "webp", "tif", "bmp")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of ``data``: a cut, a flipped byte, an overwritten span, inserted bytes or a
    spliced copy of a span."""
    data = bytearray(data)
    at = rng.randrange(len(data))
    kind = rng.choice(("cut", "flip", "overwrite", "insert", "splice"))
    if kind == "cut":
        return bytes(data[:at])
    if kind == "flip":
        data[at] ^= rng.randrange(1, 256)
    elif kind == "overwrite":
        span = rng.randrange(1, 33)
        data[at : at + span] = bytes(rng.randrange(256) for _ in range(span))
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 33)))
    else:
        start = rng.randrange(len(data))
        data[at:at] = data[start : start + rng.randrange(1, 65)]
    return bytes(data)


def mutated_images(count: int, seed: int) -> Dict[str, bytes]:
    rng = random.Random(seed)
    bases = {ext: encode(photo(14, 18, seed=1), {"jpg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper()))
             for ext in MUTATION_BASES}
    out = {}
    for index in range(count):
        ext = MUTATION_BASES[index % len(MUTATION_BASES)]
        out[f"mutated_{index:04d}.{ext}"] = mutate(bases[ext], rng)
    return out


def image_corpus(folder: Path, mutations: int = 0, seed: int = 0) -> List[Case]:
    """Write the image corpus into ``folder`` (created) and return its cases."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    groups = (("ok", valid_images(), "valid"), ("error", malformed_images(), "malformed"),
              ("either", either_images(), "damaged"), ("either", mutated_images(mutations, seed), "mutated"))
    for expect, files, cause in groups:
        for name, data in files.items():
            path = folder / name
            path.write_bytes(data)
            cases.append(Case(path, expect, cause))
    stems = [case.path.stem for case in cases]
    assert len(set(stems)) == len(stems), "the CLI writes <stem>.<ext>: corpus stems must differ"
    dangling = folder / "dangling_link.png"
    dangling.symlink_to(folder / "no_such_target.png")
    cases.append(Case(dangling, "error", "a link to nothing"))
    return cases


# -- checkpoints --------------------------------------------------------------------------------------------
SMALL_SRVGG = SRVGGConfig(num_feat=8, num_conv=2, scale=4)


def srvgg_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """The weights of a small SRVGG ×4 net (random, deterministic)."""
    with torch.device("meta"):
        model = SRVGGNetCompact(SMALL_SRVGG)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in model.state_dict().items()}


class Payload:
    """Pickles as a call that creates ``marker`` when unpickled: a stand-in for any code in a pickle."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        if self.how == "eval":
            return builtins.eval, (f"open({self.marker!r}, 'w')",)
        return builtins.open, (self.marker, "w")


PAYLOADS = ("system", "exec", "eval", "open")


def _save_torch(obj, path: Path, legacy: bool = False) -> None:
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)


def malicious_checkpoints(folder: Path, markers: Path) -> List[Case]:
    """Pickles with a payload in every container the loaders accept, and in every place of the object."""
    cases = []
    weights = srvgg_state_dict()
    for how in PAYLOADS:
        def case(name: str, write: Callable[[Path, "Payload"], None], where: str) -> None:
            path, marker = folder / name, markers / f"{name}.ran"
            write(path, Payload(marker, how))
            cases.append(Case(path, "error", f"a pickle whose __reduce__ calls {how} ({where})", marker))

        case(f"evil_{how}.pth", lambda p, pay: _save_torch({"weight": torch.zeros(2), "x": pay}, p), "torch zip")
        case(f"evil_{how}.bin", lambda p, pay: _save_torch(pay, p), "torch zip, the payload alone")
        case(f"evil_{how}.ckpt", lambda p, pay: _save_torch({"state_dict": {"a": pay}}, p, legacy=True),
             "legacy torch pickle")
        case(f"evil_{how}.pkl", lambda p, pay: p.write_bytes(pickle.dumps({"rank_unet": 4, "x": pay}, protocol=4)),
             "plain pickle")
        case(f"evil_{how}_weights.pth", lambda p, pay: _save_torch({"params_ema": {**weights, "body.0.alpha": pay}}, p),
             "beside valid SR weights")
    marker = markers / "evil_named.safetensors.ran"
    named = folder / "evil_named.safetensors"
    _save_torch({"x": Payload(marker, "system")}, named)
    cases.append(Case(named, "error", "a malicious torch pickle named .safetensors", marker))
    marker = markers / "evil_osediff.pkl.ran"
    osediff = folder / "evil_osediff.pkl"
    _save_torch({"unet_lora_encoder_modules": [], "rank_unet": 4, "rank_vae": 4, "state_dict_unet": {},
                 "state_dict_vae": Payload(marker, "system")}, osediff)
    cases.append(Case(osediff, "error", "an OSEDiff-shaped .pkl with a payload", marker))
    marker = markers / "evil_protocol2.pkl.ran"
    old = folder / "evil_protocol2.pkl"
    old.write_bytes(pickle.dumps(Payload(marker, "system"), protocol=2))
    cases.append(Case(old, "error", "a protocol-2 pickle payload", marker))
    marker = markers / "evil_protocol0.pth.ran"
    text = folder / "evil_protocol0.pth"
    text.write_bytes(pickle.dumps(Payload(marker, "system"), protocol=0))
    cases.append(Case(text, "error", "a protocol-0 (text) pickle payload", marker))
    return cases


def _rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _safetensors_bytes(tensors: Dict[str, torch.Tensor], folder: Path, metadata=None) -> bytes:
    path = folder / ".base.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    data = path.read_bytes()
    path.unlink()
    return data


def _first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _second(header: dict) -> str:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[1]


def _set_first(field: str, value) -> Callable[[dict], None]:
    """An edit that sets ``field`` of the tensor stored first."""
    def edit(header: dict) -> None:
        header[_first(header)][field] = value
    return edit


def _shift_second(delta: int) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        begin, end = header[_second(header)]["data_offsets"]
        header[_second(header)]["data_offsets"] = [begin + delta, end + delta]
    return edit


def broken_safetensors(folder: Path) -> Dict[str, bytes]:
    """Truncations and every kind of lying header, from a valid small file."""
    good = _safetensors_bytes({"a.weight": torch.arange(12.0).reshape(4, 3), "b.bias": torch.arange(5.0)}, folder,
                              metadata={"format": "pt"})
    header_len = struct.unpack("<Q", good[:8])[0]
    lies = {
        "size_too_big": _set_first("shape", [4, 4]),
        "size_too_small": _set_first("shape", [1, 3]),
        "offset_past_end": _shift_second(1000),
        "offsets_overlap": _shift_second(-4),
        "offsets_reversed": _set_first("data_offsets", [48, 0]),
        "offsets_three": _set_first("data_offsets", [0, 24, 48]),
        "offsets_negative": _set_first("data_offsets", [-48, 0]),
        "offsets_float": _set_first("data_offsets", [0.0, 48.0]),
        "dtype_unknown": _set_first("dtype", "F128"),
        "dtype_number": _set_first("dtype", 7),
        "dtype_wrong_width": _set_first("dtype", "F64"),
        "shape_negative": _set_first("shape", [-4, -3]),
        "shape_string": _set_first("shape", "4x3"),
        "shape_overflow": _set_first("shape", [2**62, 2**62, 2**62]),
        "shape_missing": lambda h: h[_first(h)].pop("shape"),
        "entry_not_object": lambda h: h.__setitem__(_first(h), [1, 2, 3]),
        "metadata_not_object": lambda h: h.__setitem__("__metadata__", ["x"]),
        "metadata_numbers": lambda h: h.__setitem__("__metadata__", {"scale": 4}),
        "no_tensors": lambda h: [h.pop(k) for k in list(h) if k != "__metadata__"],
    }
    files = {f"st_lie_{name}.safetensors": _rewrite_header(good, edit) for name, edit in lies.items()}
    files.update({
        "st_truncated_4.safetensors": good[:4],
        "st_truncated_8.safetensors": good[:8],
        "st_truncated_in_header.safetensors": good[: 8 + header_len // 2],
        "st_truncated_in_data.safetensors": good[: len(good) - 10],
        "st_truncated_last_byte.safetensors": good[:-1],
        "st_trailing_bytes.safetensors": good + bytes(16),
        "st_header_length_huge.safetensors": struct.pack("<Q", 2**63) + good[8:],
        "st_header_length_zero.safetensors": struct.pack("<Q", 0) + good[8:],
        "st_header_length_past_end.safetensors": struct.pack("<Q", 10**6) + good[8:],
        "st_header_not_json.safetensors": good[:8] + b"{" + b"x" * (header_len - 1) + good[8 + header_len :],
        "st_header_json_list.safetensors": struct.pack("<Q", 2) + b"[]",
        "st_header_not_utf8.safetensors": good[:8] + b"{\xff\xfe" + good[11:],
        "st_header_nested_deep.safetensors": _deep_header(),
    })
    return files


def _deep_header() -> bytes:
    raw = (b"[" * 100000) + (b"]" * 100000)
    return struct.pack("<Q", len(raw)) + raw


def broken_torch_files(folder: Path) -> Dict[str, bytes]:
    """Damaged torch zip archives and legacy pickles, and objects that are not state dicts."""
    weights = srvgg_state_dict()
    scratch = folder / ".scratch.pth"

    def saved(obj, legacy: bool = False) -> bytes:
        _save_torch(obj, scratch, legacy)
        data = scratch.read_bytes()
        scratch.unlink()
        return data

    zipped, legacy = saved(weights), saved(weights, legacy=True)

    def without(member_suffix: str) -> bytes:
        source, out = zipfile.ZipFile(io.BytesIO(zipped)), io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for item in source.infolist():
                if not item.filename.endswith(member_suffix):
                    archive.writestr(item, source.read(item))
        return out.getvalue()

    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("weights.txt", "1 2 3")
    central = zipped.rindex(b"PK\x01\x02")
    return {
        "zip_truncated_half.pth": zipped[: len(zipped) // 2],
        "zip_truncated_100.pth": zipped[:100],
        "zip_end_record_only.pth": zipped[zipped.rindex(b"PK\x05\x06") :],
        "zip_corrupt_directory.pth": zipped[:central] + bytes(64) + zipped[central + 64 :],
        "zip_without_data_pkl.pth": without("data.pkl"),
        "zip_without_storage.pth": without("data/0"),
        "zip_not_torch.pth": plain_zip.getvalue(),
        "legacy_truncated.ckpt": legacy[: len(legacy) // 2],
        "legacy_cut_in_magic.ckpt": legacy[:12],
        "pickle_list_of_tensors.pth": saved(list(weights.values())),
        "pickle_int_keys.pth": saved({1: torch.zeros(2), 2: torch.ones(3)}),
        "pickle_only_numbers.pth": saved({"epoch": 3, "lr": 0.1}),
        "pickle_tensor_alone.pth": saved(torch.zeros(3, 3)),
        "pickle_nested_deep.pth": saved(_nested(200)),
        "pickle_complex_weights.pth": saved({k: v.to(torch.complex64) for k, v in weights.items()}),
        "pickle_bool_weights.pth": saved({k: v > 0 for k, v in weights.items()}),
        "pickle_empty_dict.pth": saved({}),
        "pickle_empty_tensors.pth": saved({k: v[:0] for k, v in weights.items()}),
        "pickle_text_protocol0.pth": pickle.dumps({"a": [1, 2]}, protocol=0),
    }


def _nested(depth: int):
    value = {"w": torch.zeros(1)}
    for _ in range(depth):
        value = {"inner": value}
    return value


def wrong_weights(folder: Path) -> Dict[str, bytes]:
    """Readable files whose weights do not make a model: unknown architecture, missing keys, wrong shapes."""
    weights = srvgg_state_dict()
    last = max(int(k.split(".")[1]) for k in weights)
    missing_bias = {k: v for k, v in weights.items() if k != "body.0.bias"}
    wrong_shape = dict(weights, **{"body.2.weight": torch.zeros(8, 4, 3, 3)})
    bad_head = dict(weights, **{f"body.{last}.weight": torch.zeros(7, 8, 3, 3), f"body.{last}.bias": torch.zeros(7)})
    as_int = {k: (v * 100).to(torch.int64) for k, v in weights.items()}
    with_nan = {k: torch.full_like(v, math.nan) for k, v in weights.items()}

    def st(tensors, metadata=None) -> bytes:
        return _safetensors_bytes(tensors, folder, metadata)

    return {
        "arch_unknown_keys.safetensors": st({"backbone.layer1.weight": torch.zeros(2, 2)}),
        "arch_renamed_prefix.safetensors": st({f"generator.{k}": v for k, v in weights.items()}),
        "arch_srvgg_missing_bias.safetensors": st(missing_bias),
        "arch_srvgg_wrong_shape.safetensors": st(wrong_shape),
        "arch_srvgg_bad_head.safetensors": st(bad_head),
        "arch_srvgg_int_weights.safetensors": st(as_int),
        "arch_srvgg_nan_weights.safetensors": st(with_nan),
        "arch_scalars_only.safetensors": st({"step": torch.tensor(3)}),
        "arch_vae_conv_in_1d.safetensors": st({"encoder.conv_in.weight": torch.zeros(4),
                                                "decoder.conv_in.weight": torch.zeros(4)}),
        "lora_alpha_empty.safetensors": st({
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.zeros(0),
        }),
        "arch_lora_only.safetensors": st({
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        }),
    }


# Readable files a model may or may not be built from (NaN weights load; the pipeline then refuses the output).
EITHER_WEIGHTS = {"arch_srvgg_nan_weights.safetensors", "arch_lora_only.safetensors"}
# Cases a loader once failed on with another exception than a LoaderError (or, for complex weights, silently
# dropped the imaginary part): name -> the check that now refuses them.
LOADER_GAPS = {
    "arch_srvgg_int_weights.safetensors": "loaders/load_model.py: integer tensors for float parameters",
    "pickle_bool_weights.pth": "loaders/load_model.py: bool tensors for float parameters",
    "pickle_complex_weights.pth": "loaders/load_model.py: complex tensors cast to real",
    "arch_vae_conv_in_1d.safetensors": "loaders/state_dict_config.py: a VAE conv weight that is not 4-D",
    "lora_alpha_empty.safetensors": "loaders/lora_files.py: a LoRA alpha tensor with no elements",
    "folder_class_name_not_string": "loaders/diffusers_folder.py: a '_class_name' that is not a string",
    "folder_architectures_not_list": "loaders/diffusers_folder.py: 'architectures' that is not a list of names",
    "folder_model_index_class_not_string": "loaders/diffusers_folder.py: a model_index class that is not a string",
    "folder_config_nested_deep": "loaders/diffusers_folder.py: JSON nested too deeply to parse (RecursionError)",
    "folder_vae_zero_channels": "loaders/load_model.py: a config the model cannot be built from (IndexError)",
}


def broken_folders(folder: Path) -> List[Path]:
    """Folders that look like diffusers models but are not loadable."""
    made = []
    specs = {
        "folder_bad_model_index": {"model_index.json": b"{not json"},
        "folder_model_index_list": {"model_index.json": b"[1, 2, 3]"},
        "folder_component_bad_config": {"config.json": b"\xff\xfe\x00"},
        "folder_component_no_weights": {"config.json": json.dumps({"_class_name": "AutoencoderKL"}).encode()},
        "folder_pipeline_missing_unet": {
            "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                            "unet": ["diffusers", "UNet2DConditionModel"]}).encode()},
        "folder_empty": {},
        "folder_class_name_not_string": {"config.json": json.dumps({"_class_name": ["AutoencoderKL"]}).encode()},
        "folder_architectures_not_list": {"config.json": json.dumps({"architectures": True}).encode()},
        "folder_config_nested_deep": {"config.json": b"[" * 100000 + b"]" * 100000},
        "folder_vae_zero_channels": {
            "config.json": json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [0]}).encode(),
            "diffusion_pytorch_model.safetensors": _safetensors_bytes({"conv_in.weight": torch.zeros(1)}, folder)},
        "folder_model_index_class_not_string": {
            "model_index.json": json.dumps({"unet": ["diffusers", ["UNet2DConditionModel"]]}).encode()},
    }
    for name, files in specs.items():
        path = folder / name
        path.mkdir()
        for file_name, data in files.items():
            (path / file_name).write_bytes(data)
        made.append(path)
    return made


CHECKPOINT_BASES = ("safetensors", "pth", "ckpt")


def mutated_checkpoints(folder: Path, count: int, seed: int) -> Dict[str, bytes]:
    rng = random.Random(seed)
    weights = srvgg_state_dict()
    scratch = folder / ".scratch_mutation.pth"
    _save_torch(weights, scratch)
    zipped = scratch.read_bytes()
    _save_torch(weights, scratch, legacy=True)
    legacy = scratch.read_bytes()
    scratch.unlink()
    bases = {"safetensors": _safetensors_bytes(weights, folder), "pth": zipped, "ckpt": legacy}
    return {f"mutated_{i:04d}.{ext}": mutate(bases[ext], rng)
            for i, ext in ((i, CHECKPOINT_BASES[i % len(CHECKPOINT_BASES)]) for i in range(count))}


def valid_checkpoints(folder: Path) -> List[Case]:
    """Controls: small valid SR checkpoints that every model loader must load."""
    weights = srvgg_state_dict()
    paths = {"valid_srvgg.safetensors": lambda p: save_file(weights, str(p)),
             "valid_srvgg_params_ema.pth": lambda p: _save_torch({"params_ema": weights, "iter": 5}, p),
             "valid_srvgg_legacy.pth": lambda p: _save_torch(weights, p, legacy=True)}
    cases = []
    for name, write in paths.items():
        write(folder / name)
        cases.append(Case(folder / name, "ok", "a valid small SRVGG ×4 checkpoint"))
    return cases


def checkpoint_corpus(folder: Path, markers: Path, mutations: int = 0, seed: int = 0) -> List[Case]:
    """Write the checkpoint corpus into ``folder`` (malicious payloads would write into ``markers``)."""
    folder.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    cases = valid_checkpoints(folder) + malicious_checkpoints(folder, markers)
    empty = {f"empty.{ext}": b"" for ext in ("pth", "safetensors", "pkl", "ckpt")}
    noise = {f"random_bytes.{ext}": random.Random(ext).randbytes(512) for ext in ("pth", "safetensors", "bin")}
    noise["random_after_pickle_opcode.pkl"] = b"\x80\x02" + random.Random(1).randbytes(256)
    noise["text_notes.pth"] = b"these are not weights\n"
    groups = (empty, noise, broken_safetensors(folder), broken_torch_files(folder), wrong_weights(folder))
    for files in groups:
        for name, data in files.items():
            (folder / name).write_bytes(data)
            expect = "either" if name in EITHER_WEIGHTS else "error"
            cases.append(Case(folder / name, expect, name.rsplit(".", 1)[0].replace("_", " ")))
    cases += [Case(path, "error", "an unloadable model folder") for path in broken_folders(folder)]
    for name, data in mutated_checkpoints(folder, mutations, seed).items():
        (folder / name).write_bytes(data)
        cases.append(Case(folder / name, "either", "a random mutation of a valid checkpoint"))
    return cases
