"""Images per second of ``flashstep.distributed.upscale_files`` (read, upscale, write on Ray Data) against
the number of workers: 1 and 2 CPU workers (one torch thread each), and 1 GPU worker where there is one.

Each case upscales the same folder of RGB PNGs with the bundled ×4 model on a local Ray cluster and
records (``benchmark.extra_info``):

* ``images_per_second``: images over the wall time of the whole run, actor start-up and model loading
  included (what a user waits for on a small folder);
* ``steady_images_per_second``: the second half of the images over the time it took to write them, from
  the output files' modification times (the rate a long run settles at, once every worker is up; the
  driver receives results in bursts, so its own clock cannot tell).

Run: ``pytest benchmarks/bench_distributed.py`` (``--benchmark-disable`` runs each case once, as CI does).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray Data is not installed: pip install 'flashstep[ray]'")

from flashstep.distributed import iter_results, upscale_files  # noqa: E402

ON_GPU = torch.cuda.is_available()
# CPU: 2 workers on the 2-core CI machine; the GPU machine gets a larger image so the GPU has work.
IMAGE_COUNT = 96
BATCH_SIZE = 8
IMAGE_SIDE = 256 if ON_GPU else 64
CASES = [pytest.param("cpu", 1, id="cpu-1"), pytest.param("cpu", 2, id="cpu-2"),
         pytest.param("cuda", 1, id="gpu-1", marks=pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device"))]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=max(2, min(os.cpu_count() or 2, 16)), num_gpus=torch.cuda.device_count(),
             include_dashboard=False, object_store_memory=512 << 20, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_in")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(IMAGE_COUNT):
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("device, workers", CASES)
def test_upscale_files_throughput(benchmark, bench_session, cluster, images, tmp_path, device, workers):
    output = tmp_path / "out"
    timings = {}

    def run():
        shutil.rmtree(output, ignore_errors=True)
        targets = [output / path.name for path in images]
        started = time.perf_counter()
        rows = list(iter_results(upscale_files(images, targets, "default", device=device, workers=workers,
                                               batch_size=BATCH_SIZE)))
        timings.update(wall=time.perf_counter() - started, rows=rows)

    benchmark.pedantic(run, rounds=1, iterations=1)

    assert len(timings["rows"]) == IMAGE_COUNT and not any(row["error"] for row in timings["rows"])
    outputs = sorted(output.iterdir())
    assert [p.name for p in outputs] == sorted(p.name for p in images)
    written = sorted(p.stat().st_mtime_ns / 1e9 for p in outputs)
    wall, half = timings["wall"], IMAGE_COUNT // 2
    steady = (IMAGE_COUNT - half) / (written[-1] - written[half - 1])
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {os.cpu_count()} cores"
    benchmark.extra_info.update(device=device_name, commit=bench_session.commit, workers=workers, images=IMAGE_COUNT,
                                image_size=f"{IMAGE_SIDE}x{IMAGE_SIDE}", scale=4,
                                images_per_second=IMAGE_COUNT / wall, steady_images_per_second=steady)
    print(f"\n{device} × {workers}: {IMAGE_COUNT} images {IMAGE_SIDE}² -> ×4 in {wall:.1f} s: "
          f"{IMAGE_COUNT / wall:.2f} images/s overall, {steady:.2f} images/s steady")
