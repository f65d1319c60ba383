"""One pipeline called from several threads at once gives what sequential calls give: calls on one pipeline
run one at a time (a lock per pipeline, pipelines/base.py), so per-call state such as the tile side cannot
leak from one call into another."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from cli_runs import noise_image

import flashstep

# (image, call options): a tiled and an untiled call, other scales, grey and alpha inputs.
REQUESTS = [
    (noise_image(40, 36, seed=1), {"tile": 128}),
    (noise_image(40, 36, seed=1), {"tile": 0}),
    (noise_image(12, 9, "RGBA", seed=2), {"scale": 3}),
    (noise_image(10, 14, "L", seed=3), {"scale": 2.5, "output_type": "numpy"}),
]


def as_tensor(result) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(result, dtype=np.float32, copy=True))


@pytest.fixture(scope="module")
def pipeline():
    return flashstep.load("default", device="cpu")


@pytest.fixture(scope="module")
def sequential(pipeline):
    return [as_tensor(pipeline(image, **options)) for image, options in REQUESTS]


def test_two_threads_get_what_sequential_calls_get(pipeline, sequential):
    start = threading.Barrier(2)
    results = {}

    def worker(indices):
        start.wait()
        for index in indices:
            image, options = REQUESTS[index]
            results[index] = as_tensor(pipeline(image, **options))

    threads = [threading.Thread(target=worker, args=([0, 2],)), threading.Thread(target=worker, args=([1, 3],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(sequential):
        assert torch.equal(results[index], expected), f"request {index} differs from its sequential result"
    assert not torch.equal(sequential[0], sequential[1]), "the tiled and untiled calls differ, so a mix-up would show"


def test_many_threads_and_calls(pipeline, sequential):
    order = [i % len(REQUESTS) for i in range(12)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(lambda i: as_tensor(pipeline(REQUESTS[i][0], **REQUESTS[i][1])), order))
    for index, output in zip(order, outputs):
        assert torch.equal(output, sequential[index])


def test_calls_on_one_pipeline_run_one_at_a_time():
    pipeline = flashstep.load("default", device="cpu")
    forward = pipeline.model.forward
    inside, most = [0], [0]
    counting = threading.Lock()

    def slow_forward(x):
        with counting:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        try:
            return forward(x)
        finally:
            with counting:
                inside[0] -= 1

    pipeline.model.forward = slow_forward
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda seed: pipeline(noise_image(6, 6, seed=seed)), range(6)))
    assert most[0] == 1
