"""The generated malformed corpus (corpus.py) through the real CLI and every loader: a one-line error that
names the file or a correct result, never a traceback; inputs unchanged; only complete outputs; no code run
from any checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_runs import assert_complete_images, child_env, digest, marker_files, run_cli_process
from corpus import LOADER_GAPS, Case
from PIL import Image
from trials import try_checkpoint, try_image

from flashstep.imageio import read_image

HERE = Path(__file__).resolve().parent

# Input name -> the mode of its ×4 output (the output keeps the input's format where it can be written).
OUTPUT_MODES = {
    "mode_1.png": "L", "mode_L.png": "L", "mode_LA.png": "LA", "mode_P_transparency.png": "RGBA",
    "mode_P.gif": "RGB", "mode_RGB.png": "RGB", "mode_RGBA.png": "RGBA", "mode_RGBA_lossless.webp": "RGBA",
    "mode_CMYK.jpg": "RGB", "mode_CMYK_tiff.tif": "RGB", "mode_I16.png": "I;16", "mode_I16_tiff.tif": "I;16",
    "mode_I.tif": "I;16", "mode_F.tif": "L", "float_nan_inf.tif": "L", "one_pixel_alpha.png": "RGBA",
    "odd_5x3_alpha.tif": "RGBA", "greyscale.jpg": "L", "portable_grey.pgm": "L",
}


def output_of(case: Case, folder: Path) -> Path:
    suffix = case.path.suffix.lower()
    return folder / f"{case.path.stem}{suffix if suffix in ('.png', '.jpg', '.webp', '.tif') else '.png'}"


@pytest.fixture(scope="module")
def batch(image_cases, tmp_path_factory):
    """The whole image corpus as one `flashstep upscale` run (files named one by one, the link included)."""
    before = digest(image_cases[0].path.parent)
    output = tmp_path_factory.mktemp("batch_output")
    result = run_cli_process("upscale", *[case.path for case in image_cases], "-o", output, "-q")
    return result, output, before


def test_a_batch_goes_on_past_bad_files_and_lists_them_at_the_end(image_cases, batch):
    result, output, _ = batch
    assert "Traceback" not in result.stderr
    assert result.code == 1, "some inputs failed, so the exit code is 1"
    failures = result.failures()
    summary = [line for line in result.lines if line.startswith("upscaled ")]
    assert len(summary) == 1 and f"failed {len(failures)}" in summary[0]
    assert set(result.lines) == set(summary) | {f"  failed: {m}" for m in failures.values()}, "nothing else printed"
    for case in image_cases:
        written = output_of(case, output).exists()
        listed = str(case.path) in failures
        assert written != listed, f"{case.name}: exactly one of an output and a listed failure"
        if case.expect == "ok":
            assert written, f"{case.name} ({case.cause}) must work: {failures.get(str(case.path))}"
        if case.expect == "error":
            assert listed, f"{case.name} ({case.cause}) must fail"
    assert sum(case.expect == "error" for case in image_cases) >= 30


def test_the_batch_leaves_inputs_unchanged_and_only_complete_outputs(image_cases, batch):
    _, output, before = batch
    assert digest(image_cases[0].path.parent) == before
    assert_complete_images(output)


@pytest.mark.parametrize("name", sorted(OUTPUT_MODES))
def test_modes_alpha_and_depth_survive_the_cli(image_cases, batch, name):
    """Each mode comes back in the mode of its kind: alpha re-attached, 16-bit kept where the format allows."""
    _, output, _ = batch
    case = next(c for c in image_cases if c.name == name)
    source = read_image(case.path)
    with Image.open(output_of(case, output)) as result:
        result.load()
        assert result.mode == OUTPUT_MODES[name]
        assert result.size == (source.width * 4, source.height * 4)
        if "A" in result.mode and "A" in source.mode:
            alpha_in = np.asarray(source.getchannel("A"), dtype=np.float64)
            alpha_out = np.asarray(result.getchannel("A").resize(source.size, Image.BOX), dtype=np.float64)
            assert np.abs(alpha_out - alpha_in).mean() < 4, "the alpha channel is upscaled and re-attached"
        if result.mode == "I;16":
            values = np.asarray(result).astype(np.int64)
            assert len(np.unique(values % 257)) > 1, "16-bit output, not 8-bit values scaled up"


def test_exif_orientation_and_animation_at_the_cli(image_cases, batch):
    _, output, _ = batch
    sizes = {c.name: Image.open(output_of(c, output)).size for c in image_cases if c.name.startswith("exif_rotate")}
    assert sizes["exif_rotate_90.jpg"] == (24, 64) and sizes["exif_rotate_270.png"] == (24, 64)
    first_frame = Image.open(output / "animated_gif.png").convert("RGB").getpixel((18, 14))
    assert first_frame[0] > 200 and first_frame[1] < 60, "the first (red) frame"


def test_the_same_run_again_skips_finished_outputs_and_fails_the_same_files(image_cases, batch):
    first, output, _ = batch
    finished = digest(output)
    again = run_cli_process("upscale", *[case.path for case in image_cases], "-o", output, "-q")
    assert again.code == 1 and again.failures().keys() == first.failures().keys()
    assert digest(output) == finished, "existing outputs are not rewritten without --overwrite"


def test_every_image_alone_through_the_reader(image_cases):
    for case in image_cases:
        (through, result, message), = try_image(case.path)
        assert result != "traceback", f"{case.name}: {message}"
        if case.expect != "either":
            assert result == case.expect, f"{case.name} ({case.cause}): {result} {message}"


def test_every_checkpoint_through_every_loader(checkpoint_cases):
    """Each loader gives a model (or file contents) or a one-line ValueError naming the file."""
    folder = checkpoint_cases[0].path.parent
    before = digest(folder)
    model_loaders = ("load_model", "flashstep.load")
    for case in checkpoint_cases:
        for through, result, message in try_checkpoint(case.path):
            assert result != "traceback", f"{case.name} through {through}: {message}"
            if through in model_loaders and case.expect != "either":
                assert result == case.expect, f"{case.name} ({case.cause}) through {through}: {result}"
            if case.marker is not None:
                assert result == "error", f"{case.name} through {through} must be refused"
    assert marker_files(checkpoint_cases) == [], "a malicious checkpoint ran code"
    assert digest(folder) == before


@pytest.mark.parametrize("name", sorted(LOADER_GAPS))
def test_loader_gaps(checkpoint_cases, name):
    """Files a loader once accepted or crashed on; each is refused with a LoaderError naming the problem."""
    case = next(c for c in checkpoint_cases if c.name == name)
    for through, result, message in try_checkpoint(case.path):
        assert result != "traceback", f"{through}: {message}"
        if through in ("load_model", "flashstep.load"):
            assert result == "error", f"{through} loaded {name}"


def test_malicious_and_broken_checkpoints_through_the_cli_create_nothing(checkpoint_cases, tmp_path):
    """``flashstep upscale --model FILE`` for every checkpoint, in a subprocess: exit 2 with one line naming
    the file (or a result for the valid ones); no marker file, no output folder for a refused model."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (6, 5), (10, 20, 30)).save(tiny)
    cases = list(checkpoint_cases)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([str(c.path) for c in cases]))
    output = tmp_path / "outputs"
    done = subprocess.run([sys.executable, str(HERE / "trials.py"), "cli-models", str(listing), str(output), str(tiny)],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for index, case in enumerate(cases):
        (through, result, message), = results[str(case.path)]
        assert result != "traceback", f"{case.name}: {message}"
        if case.expect == "ok":
            assert result == "ok" and (output / f"{index:04d}" / "out.png").exists()
        if case.expect == "error":
            assert result == "error", f"{case.name}: {message}"
            assert not (output / f"{index:04d}").exists(), f"{case.name}: the refused run created its output folder"
    assert marker_files(checkpoint_cases) == []
