"""Fixtures of the scale-out tests: one local Ray cluster for the session (2 CPUs, CPU workers), tiny
videos made with PyAV, and the single-machine reference pipeline (the bundled default model)."""
from __future__ import annotations

import importlib.util
import logging
import math
from fractions import Fraction

import numpy as np
import pytest

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_AV = importlib.util.find_spec("av") is not None

# Object store of the test cluster: the tests move a few hundred kilobytes; Ray's default would reserve
# 30 % of the machine's memory.
OBJECT_STORE_BYTES = 256 << 20


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs, shut down at the end of the session."""
    if not HAS_RAY:
        pytest.skip("Ray Data is not installed: pip install 'flashstep[ray]'")
    import ray
    import ray.data

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_pipeline():
    """The bundled ×4 model on the CPU, as ``flashstep upscale`` without ``--ray`` loads it."""
    import flashstep

    return flashstep.load("default", scale=4, device="cpu", progress=False)


def make_video(path, *, frames: int = 10, width: int = 16, height: int = 12, rate: int = 10,
               audio_codec: str = "aac", sample_rate: int = 16000) -> None:
    """A video of ``frames`` distinct frames (frame i: red = 25·i, a horizontal green ramp) at ``rate``
    fps, H.264 when PyAV has libx264 (else MPEG-4), with a 440 Hz mono sine as long as the video in
    ``audio_codec`` (aac: float planar samples; pcm_s16le: 16-bit), or no audio for None."""
    import av

    with av.open(str(path), mode="w") as output:
        video = output.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = None
        if audio_codec is not None:
            audio = output.add_stream(audio_codec, rate=sample_rate)
            audio.layout = "mono"
        for index in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[..., 0] = 25 * index
            image[..., 1] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, rate)
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if audio is None:
            return
        count = sample_rate * frames // rate
        wave = 0.3 * np.sin(2 * math.pi * 440 * np.arange(count) / sample_rate)
        if audio_codec == "aac":
            samples, fmt = wave.astype(np.float32), "fltp"
        else:
            samples, fmt = (wave * 32767).astype(np.int16), "s16"
        for start in range(0, count, 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, start:start + 1024]), format=fmt,
                                               layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = sample_rate, start, Fraction(1, sample_rate)
            output.mux(audio.encode(chunk))
        output.mux(audio.encode(None))


@pytest.fixture
def video_maker():
    """:func:`make_video`, for tests that need another kind of video."""
    if not HAS_AV:
        pytest.skip("PyAV is not installed: pip install av")
    return make_video


@pytest.fixture
def tiny_video(tmp_path, video_maker):
    """A 16×12, 10-frame, 10 fps MP4 with an AAC sine track."""
    path = tmp_path / "clip.mp4"
    video_maker(path)
    return path
