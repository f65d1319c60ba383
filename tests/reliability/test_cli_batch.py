"""`flashstep upscale` as a batch: exit codes, the failure list, output formats, refusing to overwrite inputs
and existing outputs, write errors, file permissions and the removal of stale temporary files."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import assert_complete_images, digest, noise_image, run_cli, save_image
from PIL import Image


@pytest.fixture
def photos(tmp_path):
    """Three small valid images in tmp_path/in."""
    folder = tmp_path / "in"
    for index, (height, width) in enumerate([(9, 12), (10, 7), (5, 5)]):
        save_image(folder / f"photo_{index}.png", noise_image(height, width, seed=index))
    return folder


def test_all_good_is_exit_0_and_a_summary(photos, tmp_path):
    result = run_cli("upscale", photos, "-o", tmp_path / "out", "-q")
    assert result.code == 0 and result.lines == []
    assert [p.name for p in assert_complete_images(tmp_path / "out")] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    result = run_cli("upscale", photos, "-o", tmp_path / "out")
    assert result.code == 0, "everything skipped is not a failure"
    assert "upscaled 0, skipped 3 (output exists; --overwrite to redo), failed 0" in result.stderr


def test_bad_files_are_listed_at_the_end_and_the_rest_is_done(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (photos / "empty.jpg").write_bytes(b"")
    missing = tmp_path / "missing.png"
    result = run_cli("upscale", photos, missing, "-o", tmp_path / "out", "-q")
    assert result.code == 1
    assert result.lines[0] == "upscaled 3, skipped 0 (output exists; --overwrite to redo), failed 3"
    assert sorted(result.failures()) == sorted(str(p) for p in (photos / "broken.png", photos / "empty.jpg", missing))
    assert result.failures()[str(missing)].endswith("no such file")
    assert len(assert_complete_images(tmp_path / "out")) == 3


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"),
                                         (".tif", "TIFF"), (".tiff", "TIFF")])
def test_the_output_format_follows_the_extension(photos, tmp_path, suffix, fmt):
    target = tmp_path / f"single{suffix}"
    assert run_cli("upscale", photos / "photo_0.png", "-o", target, "-q").code == 0
    with Image.open(target) as image:
        assert image.format == fmt and image.size == (48, 36)
    folder = tmp_path / "folder"
    assert run_cli("upscale", photos, "-o", folder, "--format", suffix.lstrip("."), "-q").code == 0
    assert sorted(p.suffix for p in assert_complete_images(folder)) == [suffix] * 3


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_quality_reaches_the_encoder(photos, tmp_path, suffix):
    low, high = tmp_path / f"low{suffix}", tmp_path / f"high{suffix}"
    assert run_cli("upscale", photos / "photo_0.png", "-o", low, "--quality", 5, "-q").code == 0
    assert run_cli("upscale", photos / "photo_0.png", "-o", high, "--quality", 100, "-q").code == 0
    assert low.stat().st_size < high.stat().st_size / 2


def test_sixteen_bit_to_every_format(tmp_path):
    """16-bit greyscale stays 16-bit in PNG and TIFF; JPEG and WebP get it scaled to 8 bits, not clipped."""
    ramp = (np.linspace(0, 1, 8 * 10).reshape(8, 10) * 60000).astype(np.uint16)
    source = save_image(tmp_path / "deep.png", Image.fromarray(ramp))
    for suffix, mode in [(".png", "I;16"), (".tif", "I;16"), (".jpg", "L"), (".webp", "RGB")]:
        target = tmp_path / f"out{suffix}"
        assert run_cli("upscale", source, "-o", target, "-q").code == 0
        with Image.open(target) as image:
            assert image.mode == mode
            values = np.asarray(image.convert("L") if mode == "RGB" else image, dtype=np.float64)
        full_scale = 65535 if mode == "I;16" else 255
        assert abs(values.mean() / full_scale - ramp.mean() / 65535) < 0.03, f"{suffix}: brightness kept"


def test_an_input_is_never_overwritten(photos, tmp_path):
    before = digest(photos)
    result = run_cli("upscale", photos / "photo_0.png", "-o", photos / "photo_0.png", "--overwrite", "-q")
    assert result.code == 1 and "refusing to overwrite an input" in result.failures()[str(photos / "photo_0.png")]
    result = run_cli("upscale", photos, "-o", photos, "--overwrite", "-q")
    assert result.code == 1 and len(result.failures()) == 3
    assert all("refusing to overwrite an input" in m for m in result.failures().values())
    result = run_cli("upscale", photos, "-o", photos, "-q")
    assert result.code == 0, "without --overwrite the inputs count as finished outputs and are skipped"
    assert digest(photos) == before


def test_existing_outputs_need_overwrite(photos, tmp_path):
    out = tmp_path / "out"
    save_image(out / "photo_1.png", Image.new("RGB", (3, 3)))
    kept = (out / "photo_1.png").read_bytes()
    result = run_cli("upscale", photos, "-o", out)
    assert result.code == 0 and "upscaled 2, skipped 1" in result.stderr
    assert (out / "photo_1.png").read_bytes() == kept
    assert run_cli("upscale", photos, "-o", out, "--overwrite", "-q").code == 0
    assert Image.open(out / "photo_1.png").size == (28, 40)


def test_an_unwritable_destination_is_a_listed_failure(photos, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    result = run_cli("upscale", photos / "photo_0.png", "-o", blocker / "out.png", "-q")
    assert result.code == 1
    message = result.failures()[str(photos / "photo_0.png")]
    assert str(blocker / "out.png") in message and "cannot write the image" in message
    assert blocker.read_text() == "a file where a folder is needed"


def test_several_inputs_to_a_file_is_a_usage_error(photos, tmp_path):
    blocker = tmp_path / "blocker.png"
    blocker.write_bytes(b"x")
    result = run_cli("upscale", photos, "-o", blocker)
    assert result.code == 2 and len(result.lines) == 1 and "is a file" in result.stderr
    assert blocker.read_bytes() == b"x"


def test_outputs_get_ordinary_permissions(photos, tmp_path):
    """Outputs are created with 0o666 less the umask, like any file the user writes (not 0o600)."""
    umask = os.umask(0o022)
    try:
        assert run_cli("upscale", photos, "-o", tmp_path / "out", "-q").code == 0
    finally:
        os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {"0o644"}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_removes_stale_temporary_files_of_dead_writers_only(photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".photo_0.png.{dead_pid()}.0badc0de.partial"
    live = out / f".photo_1.png.{os.getpid()}.1badc0de.partial"
    unrelated = [out / ".notes.partial", out / "photo_2.png.partial", out / ".photo_2.png.12.partial"]
    for path in [stale, live, *unrelated]:
        path.write_bytes(b"half an image")
    result = run_cli("upscale", photos, "-o", out, "-q")
    assert result.code == 0
    assert f"removed {stale}, left by an interrupted run" in result.stderr
    assert not stale.exists() and live.exists() and all(p.exists() for p in unrelated)


def test_a_mixed_batch_of_modes_in_one_folder(tmp_path):
    folder = tmp_path / "in"
    save_image(folder / "a_rgba.png", noise_image(6, 8, "RGBA"))
    save_image(folder / "b_grey.png", noise_image(7, 5, "L"))
    save_image(folder / "c_la.png", noise_image(4, 4, "LA"))
    save_image(folder / "d_cmyk.jpg", noise_image(6, 6).convert("CMYK"))
    buffer = io.BytesIO()
    noise_image(5, 9).save(buffer, format="JPEG")
    (folder / "e_truncated.jpg").write_bytes(buffer.getvalue()[:150])
    result = run_cli("upscale", folder, "-o", tmp_path / "out", "--format", "png", "-q")
    assert result.code == 1 and list(result.failures()) == [str(folder / "e_truncated.jpg")]
    modes = {p.name: Image.open(p).mode for p in assert_complete_images(tmp_path / "out")}
    assert modes == {"a_rgba.png": "RGBA", "b_grey.png": "L", "c_la.png": "LA", "d_cmyk.png": "RGB"}
