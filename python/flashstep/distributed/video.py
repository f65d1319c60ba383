"""Video files in and out of the SR pipelines, with PyAV (``pip install av``).

Reading: frames are decoded to RGB arrays ``(H, W, 3)`` uint8 in presentation order, optionally only
those whose time ``t`` (seconds) lies in ``[start, end)``; a bounded span seeks to the key frame at or
before ``start`` first, so that a video split into consecutive spans by :func:`time_segments` gives
every frame exactly once.

Writing: :class:`VideoWriter` encodes frames as H.264 (libx264; MPEG-4 Part 2 where this PyAV has no
libx264), yuv420p, at the source's frame rate, frame ``i`` at time ``i / rate``. The source's first
audio stream is copied packet by packet when the output container can hold its codec, else re-encoded
to AAC, and interleaved with the video by time. The file is written under a temporary name in the
destination folder and renamed when complete, so an interrupted run leaves no partial video (a killed one
leaves a hidden ``.partial`` file that :func:`flashstep.imageio.remove_stale_partials` clears).

yuv420p needs even sides: an odd output side loses its last row or column.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..imageio import PARTIAL_SUFFIX

READ_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
WRITE_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv")
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Audio codecs each output container takes as they are (None: any); others are re-encoded to AAC.
AUDIO_COPY_CODECS = {
    ".mp4": {"aac", "mp3", "alac", "ac3", "eac3"},
    ".m4v": {"aac", "mp3", "alac", "ac3", "eac3"},
    ".mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le"},
    ".mkv": None,
}
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 8: "7.1"}
# NOTE: CRF 18 is x264's "visually lossless" point: the SR output is not worth degrading at the last step.
X264_OPTIONS = {"crf": "18", "preset": "medium"}
# MPEG-4 Part 2 has no CRF; 0.3 bit per pixel keeps the SR detail visible.
MPEG4_BITS_PER_PIXEL = 0.3

PathLike = Union[str, os.PathLike]


class VideoError(ValueError):
    """A video could not be read or written; the message names the file and the cause."""


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("video files need PyAV: pip install av (or pip install 'flashstep[ray]')") from None
    return av


def is_video(path: PathLike) -> bool:
    """Whether ``path`` names a video file (by extension)."""
    return Path(path).suffix.lower() in READ_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    """What the writer and the splitter need to know about a source video."""

    path: str
    width: int
    height: int
    frame_rate: Fraction  # frames per second
    frames: int  # the container's frame count, else duration × rate (0: unknown)
    start_time: float  # seconds, time of the first frame
    duration: Optional[float]  # seconds; None: unknown
    audio_codec: Optional[str]  # the first audio stream's codec; None: no audio


def _open(path: PathLike):
    av = _av()
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"{path}: cannot open as a video ({error})") from None


def probe(path: PathLike) -> VideoInfo:
    """The :class:`VideoInfo` of ``path``; VideoError when it has no video stream or no frame rate."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoError(f"{path}: the video stream declares no frame rate")
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        frames = stream.frames or (round(duration * rate) if duration else 0)
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        return VideoInfo(str(path), stream.codec_context.width, stream.codec_context.height, Fraction(rate),
                         int(frames), start, duration, audio)


def time_segments(info: VideoInfo, frames_per_segment: int) -> List[Tuple[float, float]]:
    """Consecutive spans ``[start, end)`` in seconds that cover the whole time line, about
    ``frames_per_segment`` frames each; the first starts at -inf, the last ends at +inf, and the cuts
    fall half a frame before a frame's nominal time so that rounding never moves a frame across one.
    One span when the length is unknown."""
    if frames_per_segment < 1:
        raise ValueError(f"frames_per_segment={frames_per_segment} must be at least 1")
    count = max(1, math.ceil(info.frames / frames_per_segment)) if info.frames else 1
    period = 1.0 / float(info.frame_rate)
    cuts = [info.start_time + (i * frames_per_segment - 0.5) * period for i in range(1, count)]
    bounds = [-math.inf, *cuts, math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def read_frames(path: PathLike, start: float = -math.inf, end: float = math.inf) -> Iterator[np.ndarray]:
    """RGB frames ``(H, W, 3)`` uint8 of the first video stream, in presentation order, whose time is in
    ``[start, end)`` (seconds)."""
    av = _av()
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if math.isfinite(start):
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if math.isfinite(start) or math.isfinite(end):
                    if frame.time is None:
                        raise VideoError(f"{path}: a frame has no timestamp, so the video cannot be split by time")
                    if frame.time < start:
                        continue
                    if frame.time >= end:
                        break
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise VideoError(f"{path}: cannot decode the video ({error})") from None


def batched(frames: Iterable[np.ndarray], size: int) -> Iterator[List[np.ndarray]]:
    """Lists of ``size`` frames (the last may be shorter)."""
    batch: List[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def video_codec(codec: str = "auto") -> str:
    """The encoder to use: ``auto`` is libx264 when this PyAV has it, else mpeg4."""
    available = _av().codecs_available
    if codec == "auto":
        return "libx264" if "libx264" in available else "mpeg4"
    if codec not in available:
        raise VideoError(f"video codec {codec!r} is not in this PyAV build")
    return codec


class _AudioCopier:
    """The source's first audio stream into the output: packets muxed up to a time, copied or re-encoded."""

    def __init__(self, source: VideoInfo, output, suffix: str):
        self._input = _open(source.path)
        in_stream = self._input.streams.audio[0]
        allowed = AUDIO_COPY_CODECS[suffix]
        self._copy = allowed is None or source.audio_codec in allowed
        if self._copy:
            add_from_template = getattr(output, "add_stream_from_template", None)
            # NOTE: PyAV 12 spells it add_stream(template=...); 13 added add_stream_from_template.
            self._stream = add_from_template(in_stream) if add_from_template else output.add_stream(template=in_stream)
        else:
            self._stream = output.add_stream("aac", rate=in_stream.codec_context.sample_rate)
            layout = in_stream.codec_context.layout
            # NOTE: the default layout for the channel count: AAC refuses unordered ones ("2 channels").
            self._stream.layout = DEFAULT_LAYOUTS.get(len(layout.channels), layout.name)
        self._output = output
        self._packets = self._input.demux(in_stream)
        self._pending = None

    def mux_until(self, seconds: float) -> None:
        """Mux the source's audio packets up to ``seconds`` (all of them for +inf)."""
        while True:
            if self._pending is not None:
                packet, self._pending = self._pending, None
            else:
                packet = next(self._packets, None)
            if packet is None:
                return
            if packet.dts is None:
                continue
            if packet.pts is not None and float(packet.pts * packet.time_base) > seconds:
                self._pending = packet
                return
            if self._copy:
                packet.stream = self._stream
                self._output.mux(packet)
            else:
                for frame in packet.decode():
                    self._output.mux(self._stream.encode(frame))

    def finish(self) -> None:
        self.mux_until(math.inf)
        if not self._copy:
            self._output.mux(self._stream.encode(None))

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """Encode RGB frames ``(H, W, 3)`` uint8 into ``target`` with the timing and audio of ``source``.

    Use as a context manager: the file appears at ``target`` only when the block ends without an error.
    """

    def __init__(self, target: PathLike, source: VideoInfo, *, overwrite: bool = False, codec: str = "auto"):
        self.target = Path(target)
        self.source = source
        suffix = self.target.suffix.lower()
        if suffix not in WRITE_EXTENSIONS:
            raise VideoError(f"{target}: cannot write videos with the extension {suffix or '(none)'!r}; "
                             f"valid: {', '.join(WRITE_EXTENSIONS)}")
        if self.target.resolve() == Path(source.path).resolve():
            raise VideoError(f"{target}: is the input; refusing to overwrite an input (choose another output)")
        if self.target.exists() and not overwrite:
            raise VideoError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
        self.codec = video_codec(codec)
        self.frames_written = 0
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: the temporary name follows flashstep.imageio's pattern, so remove_stale_partials clears
        # the file a killed run left.
        partial_name = f".{self.target.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        self._temporary = self.target.parent / partial_name
        os.close(os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            self._output = _av().open(str(self._temporary), mode="w", format=CONTAINER_FORMATS[suffix])
        except BaseException:
            os.unlink(self._temporary)
            raise
        # Frame i is shown at the source's first frame time plus i / rate, so copied audio stays in sync.
        self._first_pts = round(source.start_time * source.frame_rate)
        self._video = None
        self._audio: Optional[_AudioCopier] = None

    def _start(self, height: int, width: int) -> None:
        rate = self.source.frame_rate
        self._video = self._output.add_stream(self.codec, rate=rate)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            self._video.options = dict(X264_OPTIONS)
        else:
            self._video.bit_rate = int(width * height * float(rate) * MPEG4_BITS_PER_PIXEL)
        if self.source.audio_codec is not None:
            self._audio = _AudioCopier(self.source, self._output, self.target.suffix.lower())

    def write(self, frames: Sequence[np.ndarray]) -> None:
        """Append frames ``(H, W, 3)`` uint8, all the size of the first frame ever written."""
        av = _av()
        time_base = 1 / Fraction(self.source.frame_rate)
        for image in frames:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise VideoError(f"{self.target}: frames must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
            height, width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            if height == 0 or width == 0:
                raise VideoError(f"{self.target}: a {image.shape[1]}×{image.shape[0]} frame is too small to encode")
            if self._video is None:
                self._start(height, width)
            if (height, width) != (self._video.height, self._video.width):
                raise VideoError(f"{self.target}: frame {self.frames_written} is {width}×{height}, the video "
                                 f"{self._video.width}×{self._video.height}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
            frame.pts, frame.time_base = self._first_pts + self.frames_written, time_base
            self._output.mux(self._video.encode(frame))
            self.frames_written += 1
            if self._audio is not None:
                self._audio.mux_until(float((self._first_pts + self.frames_written) * time_base))

    def close(self) -> Path:
        """Flush the encoders and move the finished file to ``target``."""
        if self._video is None:
            self.abort()
            raise VideoError(f"{self.source.path}: no frame was decoded, nothing to write")
        try:
            self._output.mux(self._video.encode(None))
            if self._audio is not None:
                self._audio.finish()
        finally:
            self._close_containers()
        os.replace(self._temporary, self.target)
        return self.target

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._close_containers()
        try:
            os.unlink(self._temporary)
        except FileNotFoundError:
            pass

    def _close_containers(self) -> None:
        if self._audio is not None:
            self._audio.close()
        self._output.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """``items`` produced in a background thread, at most ``depth`` ahead of the consumer. An error in the
    producer is raised in the consumer; a consumer that stops early stops the producer."""
    buffer: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            put((end, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="flashstep-video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def upscale_video(source: PathLike, target: PathLike, upscale: Callable[[List[np.ndarray]], List[np.ndarray]], *,
                  batch_size: int = 8, overwrite: bool = False, codec: str = "auto",
                  progress: Optional[Callable[[int], None]] = None) -> int:
    """Upscale every frame of ``source`` into ``target`` on this machine; returns the number of frames.

    ``upscale`` maps a list of RGB frames ``(h, w, 3)`` uint8 to a list of ``(H, W, 3)`` uint8 (a
    pipeline called with numpy frames does). Decoding runs ``2 × batch_size`` frames ahead in a thread
    and encoding one batch behind in another, so both overlap the upscaling. ``progress(n)`` is called
    after each batch with its frame count.
    """
    info = probe(source)
    batches = _prefetch(batched(read_frames(source), batch_size), depth=2)
    with contextlib.closing(batches), VideoWriter(target, info, overwrite=overwrite, codec=codec) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashstep-video-encode") as encoder:
        pending = None
        for batch in batches:
            upscaled = upscale(batch)
            if pending is not None:
                pending.result()
            pending = encoder.submit(writer.write, upscaled)
            if progress is not None:
                progress(len(batch))
        if pending is not None:
            pending.result()
    return writer.frames_written
