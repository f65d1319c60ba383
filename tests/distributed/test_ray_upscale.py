"""flashstep.distributed on a local Ray cluster (CPU workers, the bundled model): the same outputs as the
single-process run, nothing lost or duplicated when a worker dies mid-run, failed files reported, resume."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashstep.cli import main
from flashstep.imageio import read_image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray Data is not installed: pip install 'flashstep[ray]'")

# A marked image (this width) makes the worker that sees it end its own process, once.
KILL_WIDTH = 20
# A poisoned image (this top-left pixel) makes the pipeline raise, every time.
POISON_PIXEL = (1, 2, 3)


def _rgb(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _image_folder(folder: Path) -> Path:
    """Images of two sizes and every mode the CLI keeps (RGB, L, RGBA, 16-bit, palette, JPEG), and one
    file that is not an image."""
    folder.mkdir()
    Image.fromarray(_rgb(12, 16, 0)).save(folder / "rgb.png")
    Image.fromarray(_rgb(12, 20, 1)).save(folder / "wide.png")
    Image.fromarray(_rgb(12, 16, 2)[..., 0]).save(folder / "grey.png")
    rgba = np.dstack([_rgb(12, 16, 3), np.full((12, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(folder / "alpha.png")
    Image.fromarray((np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)).save(folder / "deep.png")
    palette = Image.fromarray(_rgb(12, 16, 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png")
    Image.fromarray(_rgb(12, 16, 5)).save(folder / "photo.jpg", quality=90)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def _files(folder: Path):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cli_on_ray_writes_the_same_files_as_one_process(ray_cluster, tmp_path, capsys):
    inputs = _image_folder(tmp_path / "in")
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "one"), "-q"]) == 1
    capsys.readouterr()

    assert main(["upscale", str(inputs), "-o", str(tmp_path / "ray"), "-q", "--ray"]) == 1

    report = capsys.readouterr().err
    assert "upscaled 7, skipped 0 (output exists; --overwrite to redo), failed 1" in report
    assert f"failed: {inputs / 'broken.png'}: not an image file" in report
    one, ray = _files(tmp_path / "one"), _files(tmp_path / "ray")
    assert sorted(ray) == sorted(one) == ["alpha.png", "deep.png", "grey.png", "palette.png", "photo.jpg",
                                          "rgb.png", "wide.png"]
    for name in one:
        assert ray[name] == one[name], f"{name}: the Ray run wrote other bytes than the single-process run"
    assert read_image(tmp_path / "ray" / "deep.png").mode == "I;16"
    assert read_image(tmp_path / "ray" / "wide.png").size == (80, 48)


def test_rerun_on_ray_does_only_what_is_missing(ray_cluster, tmp_path, capsys):
    inputs = _image_folder(tmp_path / "in")
    (inputs / "broken.png").unlink()
    output = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(output), "-q"]) == 0
    expected = _files(output)
    (output / "rgb.png").unlink()
    (output / "palette.png").unlink()
    kept = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in output.iterdir()}
    capsys.readouterr()

    assert main(["upscale", str(inputs), "-o", str(output), "--ray"]) == 0

    assert "upscaled 2, skipped 5 (output exists; --overwrite to redo), failed 0" in capsys.readouterr().err
    for name, stamp in kept.items():
        path = output / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    assert _files(output) == expected
    assert main(["upscale", str(inputs), "-o", str(output), "--ray"]) == 0
    assert "upscaled 0, skipped 7" in capsys.readouterr().err


def _width(image) -> int:
    return image.size[0] if hasattr(image, "getpixel") else np.shape(image)[1]


def _poisoned(image) -> bool:
    return hasattr(image, "getpixel") and image.getpixel((0, 0))[:3] == POISON_PIXEL


def killing_pipeline(flag: str):
    """The bundled model behind a call that ends the worker's process the first time a marked image comes
    (leaving ``flag`` so that the retry goes through) and raises for a poisoned image."""
    import flashstep

    pipe = flashstep.load("default", scale=4, device="cpu", progress=False)

    def call(images, **options):
        if any(_width(image) == KILL_WIDTH for image in images) and not os.path.exists(flag):
            Path(flag).touch()
            os._exit(1)
        if any(_poisoned(image) for image in images):
            raise ValueError("poisoned image")
        return pipe(images, **options)

    return call


def test_killed_worker_loses_no_image_and_duplicates_none(ray_cluster, tmp_path, reference_pipeline):
    from ray import cloudpickle

    from flashstep.distributed import iter_results, upscale_files

    # NOTE: the workers cannot import this test module, so the model function travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    folder = tmp_path / "in"
    folder.mkdir()
    sources = []
    for index in range(10):
        pixels = _rgb(12, KILL_WIDTH if index == 5 else 16, 10 + index)
        if index == 2:
            pixels[0, 0] = POISON_PIXEL
        sources.append(folder / f"{index}.png")
        Image.fromarray(pixels).save(sources[-1])
    targets = [tmp_path / "out" / source.name for source in sources]
    flag = tmp_path / "killed"

    rows = list(iter_results(upscale_files(sources, targets, functools.partial(killing_pipeline, str(flag)),
                                           workers=2, batch_size=3)))

    assert flag.exists(), "the marked image never reached a worker"
    assert sorted(row["source"] for row in rows) == sorted(map(str, sources)), "a row was lost or duplicated"
    errors = {Path(row["source"]).name: row["error"] for row in rows if row["error"]}
    assert errors == {"2.png": f"{sources[2]}: ValueError: poisoned image"}
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == sorted(source.name for source in sources if source.name != "2.png"), "partial or extra files"
    for source, target in zip(sources, targets):
        if source.name != "2.png":
            expected = np.asarray(reference_pipeline(read_image(source)))
            np.testing.assert_array_equal(np.asarray(read_image(target)), expected, err_msg=source.name)


def test_upscale_dataset_through_ray_image_io(ray_cluster, tmp_path, reference_pipeline):
    from flashstep.distributed import upscale_dataset

    folder = tmp_path / "in"
    folder.mkdir()
    expected = {}
    for index, (height, width) in enumerate([(12, 16), (12, 16), (8, 12), (12, 16)]):
        pixels = _rgb(height, width, 30 + index)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        expected[f"{index}.png"] = reference_pipeline(pixels)

    ds = ray_cluster.data.read_images(str(folder), include_paths=True)
    rows = upscale_dataset(ds, "default", scale=4, workers=1, batch_size=4).take_all()

    assert sorted(Path(row["path"]).name for row in rows) == sorted(expected)
    for row in rows:
        name = Path(row["path"]).name
        assert row["image"].dtype == np.uint8
        np.testing.assert_array_equal(row["image"], expected[name], err_msg=name)


def test_worker_plan_refuses_what_the_cluster_cannot_hold(ray_cluster):
    from flashstep.distributed import WorkerPlan

    plan = WorkerPlan.for_cluster()
    assert (plan.workers, plan.device, plan.num_cpus, plan.num_gpus, plan.threads) == (2, "cpu", 1, 0, 1)
    assert WorkerPlan.for_cluster(workers=1, cpus_per_worker=2).threads == 2
    with pytest.raises(ValueError, match="holds 1..2 workers"):
        WorkerPlan.for_cluster(workers=3)
    with pytest.raises(ValueError, match="has no GPU"):
        WorkerPlan.for_cluster(device="cuda")


def test_failed_call_of_a_size_group_is_traced_to_its_image():
    from flashstep.distributed import PipelineSpec, UpscaleActor

    def pipeline():
        def call(images, **options):
            if any(_poisoned(image) for image in images):
                raise ValueError("poisoned image")
            return [image.resize((image.width * 2, image.height * 2)) for image in images]

        return call

    threads = torch.get_num_threads()
    actor = UpscaleActor(PipelineSpec(pipeline), device="cpu")
    torch.set_num_threads(threads)
    actor.images_per_call = None  # as on a GPU: one call per size group
    images = [Image.fromarray(_rgb(12, 16, seed)) for seed in range(4)]
    images[1].putpixel((0, 0), POISON_PIXEL)
    failures = {}

    outputs = actor.upscale(images, failures)

    assert failures == {1: "ValueError: poisoned image"}
    assert outputs[1] is None
    assert [output.size for i, output in enumerate(outputs) if i != 1] == [(32, 24)] * 3
    with pytest.raises(ValueError, match="poisoned"):
        actor.upscale(images)
