"""Peak resident memory per pipeline stage on the CPU: where a budgeted run spends its memory.

    python benchmarks/stage_memory.py osediff 2048 --config reduced --max-memory 1GB

Builds the case as ``flashstep bench`` does (random weights), runs flashstep's pipeline once, sampling the
process's RSS every 50 ms, and prints, per stage, the most it stood above the RSS before the call
(``-``: between stages), the seconds, and the pipeline's graph (shapes, tiling, backends).
"""
from __future__ import annotations

import argparse
import threading
import time

from flashstep.bench import CONFIGS, PIPELINES, build_case, release_free_memory, resident_bytes

SAMPLE_SECONDS = 0.05


def stage_peaks(pipeline, call) -> dict:
    """Run ``call()`` and return {stage name: peak RSS above the start, bytes}."""
    current = {"stage": "-"}
    peaks: dict = {}
    for stage in pipeline.graph.stages:
        def traced(*args, _fn=stage.fn, _name=stage.name, **kwargs):
            current["stage"] = _name
            try:
                return _fn(*args, **kwargs)
            finally:
                current["stage"] = "-"
        stage.fn = traced
    release_free_memory()
    start = resident_bytes()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            name = current["stage"]
            peaks[name] = max(peaks.get(name, 0), resident_bytes() - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        stop.set()
        sampler.join()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", choices=PIPELINES)
    parser.add_argument("size", type=int, help="output side in pixels")
    parser.add_argument("--config", choices=CONFIGS, default="full")
    parser.add_argument("--max-memory", help="the pipeline's memory budget, e.g. 1GB")
    args = parser.parse_args()
    case = build_case(args.pipeline, args.size, config=args.config, max_memory=args.max_memory)
    pipeline = case.ours
    started = time.perf_counter()
    peaks = stage_peaks(pipeline, case.run_ours)
    seconds = time.perf_counter() - started
    print(f"{args.pipeline} {args.size}² ({args.config}, budget {args.max_memory or 'default'}): {seconds:.1f} s")
    for name, peak in peaks.items():
        print(f"  {name:<12} {peak / 2**20:8.0f} MB")
    print(pipeline.graph)


if __name__ == "__main__":
    main()
