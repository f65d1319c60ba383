"""Video files: decode, upscale in batches, re-encode at the source frame rate with its audio, on this
machine and on a local Ray cluster (the bundled model)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from flashstep.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV is not installed: pip install av")

SCALE = 4


def _streams(path):
    """(frames (N, H, W, 3) uint8, frame rate, video codec, audio codec or None, audio samples)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        rate, codec = video.average_rate, video.codec_context.name
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video)])
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, rate, codec, None, 0
        audio = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(audio))
        return frames, rate, codec, audio.codec_context.name, samples


def _nearest(frames):
    return [np.repeat(np.repeat(frame, SCALE, axis=0), SCALE, axis=1) for frame in frames]


def test_time_spans_give_every_frame_once(tiny_video):
    from flashstep.distributed.video import probe, read_frames, time_segments

    info = probe(tiny_video)
    whole = list(read_frames(tiny_video))
    spans = time_segments(info, 3)

    pieces = [frame for start, end in spans for frame in read_frames(tiny_video, start, end)]

    assert (info.width, info.height, info.frame_rate, info.frames, info.audio_codec) == (16, 12, 10, 10, "aac")
    assert len(spans) == 4 and spans[0][0] == -math.inf and spans[-1][1] == math.inf
    assert len(whole) == len(pieces) == 10
    for index, (a, b) in enumerate(zip(whole, pieces)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {index}")


def test_cli_upscales_a_video_with_its_rate_and_audio(tiny_video, tmp_path, capsys, reference_pipeline):
    target = tmp_path / "out.mp4"

    assert main(["upscale", str(tiny_video), "-o", str(target)]) == 0

    assert "upscaled 1 video(s), 10 frames, skipped 0" in capsys.readouterr().err
    source_frames, source_rate, _, _, source_samples = _streams(tiny_video)
    frames, rate, codec, audio, samples = _streams(target)
    assert frames.shape == (10, 12 * SCALE, 16 * SCALE, 3)
    assert rate == source_rate == 10
    assert codec == "h264"
    assert audio == "aac" and samples == source_samples > 0
    expected = np.stack(reference_pipeline(list(source_frames)))
    # NOTE: H.264 at CRF 18 in yuv420p: 1.8 levels per pixel on average here; frames one place out of order
    # would be 16 levels off.
    assert np.abs(frames.astype(int) - expected).mean() < 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "a temporary file was left"

    assert main(["upscale", str(tiny_video), "-o", str(target)]) == 0
    assert "upscaled 0 video(s), 0 frames, skipped 1" in capsys.readouterr().err


def test_cli_reports_a_broken_video_and_does_the_rest(tiny_video, tmp_path, capsys):
    broken = tmp_path / "broken.mov"
    broken.write_bytes(b"this is no video")

    assert main(["upscale", str(tiny_video), str(broken), "-o", str(tmp_path / "out"), "-q"]) == 1

    report = capsys.readouterr().err
    assert "upscaled 1 video(s), 10 frames, skipped 0 (output exists; --overwrite to redo), failed 1" in report
    assert f"failed: {broken}: cannot open as a video" in report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.mp4"]
    assert main(["upscale", str(tiny_video), str(tmp_path / "photo.png"), "-o", str(tmp_path / "out")]) == 2
    assert "give video files and images in separate runs" in capsys.readouterr().err


def test_audio_the_container_cannot_hold_is_reencoded(tmp_path, video_maker):
    from flashstep.distributed.video import upscale_video

    source = tmp_path / "pcm.mkv"
    video_maker(source, audio_codec="pcm_s16le")

    count = upscale_video(source, tmp_path / "out.mp4", _nearest, batch_size=4, codec="mpeg4")

    frames, rate, codec, audio, samples = _streams(tmp_path / "out.mp4")
    assert count == len(frames) == 10
    assert (codec, audio, rate) == ("mpeg4", "aac", 10)
    assert samples >= 16000  # one second of audio, plus the encoder's padding


def test_odd_output_loses_a_row_and_a_video_without_audio_stays_silent(tmp_path, video_maker):
    from flashstep.distributed.video import upscale_video

    source = tmp_path / "silent.mp4"
    video_maker(source, audio_codec=None)

    upscale_video(source, tmp_path / "out.mkv", lambda frames: [f[:-1, :-1] for f in _nearest(frames)])

    frames, _, _, audio, _ = _streams(tmp_path / "out.mkv")
    assert frames.shape == (10, 46, 62, 3)
    assert audio is None


def test_a_failed_run_leaves_no_file(tiny_video, tmp_path):
    from flashstep.distributed.video import VideoError, upscale_video

    calls = []

    def fail_on_second_batch(frames):
        calls.append(len(frames))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return _nearest(frames)

    with pytest.raises(RuntimeError, match="out of memory"):
        upscale_video(tiny_video, tmp_path / "out.mp4", fail_on_second_batch, batch_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    with pytest.raises(VideoError, match="is the input"):
        upscale_video(tiny_video, tiny_video, _nearest, overwrite=True)


def test_video_on_ray_matches_this_machine(ray_cluster, tiny_video, tmp_path, capsys):
    from flashstep.distributed.ray_upscale import upscale_video_on_ray

    assert main(["upscale", str(tiny_video), "-o", str(tmp_path / "local.mp4"), "-q"]) == 0

    assert main(["upscale", str(tiny_video), "-o", str(tmp_path / "cli.mp4"), "-q", "--ray"]) == 0
    count = upscale_video_on_ray(tiny_video, tmp_path / "spans.mp4", "default", scale=SCALE, batch_size=4,
                                 frames_per_span=3)

    assert count == 10
    local = _streams(tmp_path / "local.mp4")
    for name in ("cli.mp4", "spans.mp4"):
        frames, *rest = _streams(tmp_path / name)
        assert rest == list(local[1:]), f"{name}: rate, codecs, audio samples {rest} != {list(local[1:])}"
        assert frames.shape == local[0].shape, name
        # NOTE: the same frames in the same order give the same stream (x264 is deterministic); the bound
        # leaves room for a rounding of the upscaler, while a frame out of place is 16 levels off on average.
        difference = np.abs(frames.astype(int) - local[0]).mean(axis=(1, 2, 3))
        assert difference.max() < 1, f"{name}: mean difference per frame {difference.round(2).tolist()}"
