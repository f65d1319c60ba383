"""Upscaling on a Ray cluster, built on Ray Data (``pip install 'flashstep[ray]'``).

Every worker is a Ray actor that loads the pipeline once (one per GPU, or one per ``cpus_per_worker``
CPUs with that many torch threads) and takes batches of ``batch_size`` rows from ``map_batches``; on a
GPU, the same-size images of a batch run as one pipeline call. Reading and writing run as separate Ray
Data stages (tasks beside the actors), so decoding and encoding overlap the upscaling.

* :func:`upscale_dataset`: a dataset whose ``image`` column holds arrays ``(H, W[, C])`` (as
  ``ray.data.read_images`` gives) -> the same dataset with the images upscaled (same dtype and
  channels); write it with ``Dataset.write_images``.
* :func:`upscale_files`: source and target paths -> a dataset of ``source``, ``target``, ``error`` rows,
  the outputs written atomically by :func:`flashstep.imageio.write_image`. A file that cannot be read,
  upscaled or written gets its message in ``error`` and the run goes on.
* :func:`upscale_video_on_ray`: a video file split by time into spans decoded in parallel, upscaled by
  the same actors, and encoded here in order (:mod:`flashstep.distributed.video`).

A worker that dies (killed, out of memory) is restarted by Ray Data and its batch retried (Ray Data's
fault tolerance: actors are restarted and their tasks retried). A batch is never half-applied: outputs
are written whole by the write stage, and a retried write replaces its own earlier file with the same
bytes, so a retry loses and duplicates nothing.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Options of a pipeline call; every other option goes to flashstep.load.
CALL_OPTIONS = ("seed", "scale", "tile", "color_fix", "prompt")
# The errors a pipeline call raises for one bad input (as the single-machine CLI counts them).
IMAGE_FAILURES = (ValueError, RuntimeError, MemoryError)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("flashstep.distributed needs Ray Data: pip install 'flashstep[ray]' "
                          "(or pip install 'ray[data]')") from None
    return ray


@dataclass
class PipelineSpec:
    """What each worker builds once: ``model`` is a kind (``default``, ``pixel-sr``, ...), a checkpoint
    path, or a function of no argument that returns a pipeline (called in the worker)."""

    model: Any = "default"
    load_options: Dict[str, Any] = field(default_factory=dict)
    call_options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, model: Any, options: Dict[str, Any]) -> "PipelineSpec":
        call = {k: v for k, v in options.items() if k in CALL_OPTIONS and v is not None}
        load = {k: v for k, v in options.items() if k not in CALL_OPTIONS}
        if model == "default" and options.get("scale") is not None:
            load["scale"] = options["scale"]
        return cls(model, load, call)

    def build(self, device: str):
        if callable(self.model):
            return self.model()
        from .. import pipelines

        options = {"progress": False, **self.load_options, "device": device}
        return pipelines.load(self.model, **options)


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors and what each one holds."""

    workers: int
    device: str  # "cuda" (Ray gives each actor its own GPU as cuda:0) or "cpu"
    num_cpus: float
    num_gpus: float
    threads: int  # torch threads of a CPU worker

    @classmethod
    def for_cluster(cls, device: Optional[str] = None, workers: Optional[int] = None,
                    cpus_per_worker: int = 1) -> "WorkerPlan":
        """One worker per GPU of the cluster (``device`` None or ``cuda``), else one per ``cpus_per_worker``
        CPUs; ``workers`` may ask for fewer."""
        resources = _ray().cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
        kind = str(device).split(":")[0] if device is not None else ("cuda" if gpus else "cpu")
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device {device!r} is not supported on Ray; valid: cpu, cuda")
        if cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker={cpus_per_worker} must be at least 1")
        if kind == "cuda":
            if not gpus:
                raise ValueError("device cuda was asked for but the Ray cluster has no GPU; use device='cpu'")
            capacity, per_worker = min(gpus, int(cpus)), "1 GPU and 1 CPU"
        else:
            capacity, per_worker = int(cpus // cpus_per_worker), f"{cpus_per_worker} CPU"
        if capacity < 1:
            raise ValueError(f"the Ray cluster ({resources}) cannot hold one worker of {per_worker}")
        count = capacity if workers is None else int(workers)
        if not 1 <= count <= capacity:
            raise ValueError(f"workers={workers}: the Ray cluster holds 1..{capacity} workers of {per_worker} each")
        if kind == "cuda":
            return cls(count, "cuda", 1, 1, 1)
        return cls(count, "cpu", cpus_per_worker, 0, cpus_per_worker)


def _size(image: Any) -> Tuple[int, int]:
    """(H, W) of an array (H, W[, C]) or a PIL image."""
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    width, height = image.size
    return height, width


def _size_groups(images: Sequence[Any]) -> List[List[int]]:
    groups: Dict[Tuple[int, int], List[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(_size(image), []).append(index)
    return list(groups.values())


class UpscaleActor:
    """A ``map_batches`` class: builds the pipeline once, then upscales the ``column`` of each batch.

    ``batch[column]``: images ``(H, W[, C])`` uint8, uint16 or float arrays -> upscaled arrays of the same
    dtype and channels; the other columns pass through. On a GPU the same-size images of a batch run as
    one pipeline call; on the CPU each image runs alone.
    """

    def __init__(self, spec: PipelineSpec, device: str = "cpu", threads: int = 1, column: str = "image"):
        import torch

        if device == "cpu":
            # NOTE: one torch thread per CPU the actor holds; more only contend with the other actors.
            torch.set_num_threads(threads)
        # NOTE: on the CPU a batch is no faster than one image at a time (bundled ×4 net, one thread:
        # 37.8 vs 31.9 ms per 64² image, 96 vs 84 ms per 128²), and one at a time gives exactly the
        # bytes of the single-process command (a batched convolution rounds differently).
        self.images_per_call = None if device == "cuda" else 1
        self.spec = spec
        self.column = column
        self.pipe = spec.build(device)

    def _calls(self, images: Sequence[Any]) -> Iterator[List[int]]:
        """Indices of the images of each pipeline call: same size, at most ``images_per_call``."""
        for indices in _size_groups(images):
            step = self.images_per_call or len(indices)
            for start in range(0, len(indices), step):
                yield indices[start:start + step]

    def upscale(self, images: Sequence[Any], failures: Optional[Dict[int, str]] = None) -> List[Any]:
        """The pipeline's outputs for ``images`` (PIL images or arrays). With ``failures`` given, an image
        whose call fails gets None and its message in ``failures[index]`` instead of raising."""
        results: List[Any] = [None] * len(images)
        for indices in self._calls(images):
            group = [images[i] for i in indices]
            try:
                outputs = self.pipe(group, **self.spec.call_options)
            except IMAGE_FAILURES as error:
                if failures is None:
                    raise
                if len(group) == 1:
                    failures[indices[0]] = f"{type(error).__name__}: {error}"
                    outputs = [None]
                else:
                    outputs = [self._one(image, index, failures) for image, index in zip(group, indices)]
            for index, output in zip(indices, outputs):
                results[index] = output
        return results

    def _one(self, image: Any, index: int, failures: Dict[int, str]) -> Any:
        """One image of a size group whose batched call failed, alone, to find which image it was."""
        try:
            return self.pipe([image], **self.spec.call_options)[0]
        except IMAGE_FAILURES as error:
            failures[index] = f"{type(error).__name__}: {error}"
            return None

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        images = [np.asarray(image) for image in batch[self.column]]
        return {**batch, self.column: self.upscale(images)}


class FileUpscaleActor(UpscaleActor):
    """:class:`UpscaleActor` for :func:`upscale_files`: ``image`` holds pickled PIL images (every mode and
    bit depth kept, as the single-machine CLI reads them), ``error`` the message of a failed row, which
    passes through untouched."""

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        errors = [str(e) for e in batch["error"]]
        todo = [i for i, error in enumerate(errors) if not error]
        images = [pickle.loads(batch["image"][i]) for i in todo]
        failures: Dict[int, str] = {}
        outputs = self.upscale(images, failures)
        encoded = [b""] * len(errors)
        for position, index in enumerate(todo):
            if position in failures:
                errors[index] = f"{batch['source'][index]}: {failures[position]}"
            else:
                encoded[index] = pickle.dumps(outputs[position], protocol=pickle.HIGHEST_PROTOCOL)
        return {"source": batch["source"], "target": batch["target"], "image": encoded, "error": errors}


def _read_files(batch: Dict[str, Any]) -> Dict[str, Any]:
    """source, target -> + image (pickled PIL image, b"" on failure), error ("" when read)."""
    from ..imageio import ImageReadError, read_image

    images, errors = [], []
    for source in batch["source"]:
        try:
            images.append(pickle.dumps(read_image(str(source)), protocol=pickle.HIGHEST_PROTOCOL))
            errors.append("")
        except ImageReadError as error:
            images.append(b"")
            errors.append(str(error))
    return {"source": batch["source"], "target": batch["target"], "image": images, "error": errors}


def _write_files(batch: Dict[str, Any], quality: int) -> Dict[str, Any]:
    """Write each upscaled image to its target atomically; -> source, target, error."""
    from ..imageio import ImageWriteError, write_image

    errors = [str(e) for e in batch["error"]]
    for index, (source, target) in enumerate(zip(batch["source"], batch["target"])):
        if errors[index]:
            continue
        try:
            # NOTE: overwrite=True: the caller left out the targets that existed before the run, so an
            # existing target is this run's own output from a retried batch, rewritten with the same bytes.
            write_image(pickle.loads(batch["image"][index]), str(target), quality=quality, overwrite=True,
                        protected={Path(str(source))})
        except ImageWriteError as error:
            errors[index] = f"{source}: {error}"
    return {"source": batch["source"], "target": batch["target"], "error": errors}


def _task_pool(size: int) -> Dict[str, Any]:
    """map_batches arguments for at most ``size`` concurrent tasks."""
    data = _ray().data
    if hasattr(data, "TaskPoolStrategy"):
        return {"compute": data.TaskPoolStrategy(size=size)}
    return {"concurrency": size}


def _io_stage_args(plan: WorkerPlan, blocks: int) -> Dict[str, Any]:
    """map_batches arguments of a read or write stage over ``blocks`` input blocks."""
    # NOTE: reading and writing ask for no CPU of Ray: otherwise a pool of CPU workers that holds every
    # CPU of the cluster leaves none for them and the pipeline stalls. Two tasks per worker keep the
    # workers fed; the OS shares the cores.
    return {"num_cpus": 0, **_task_pool(max(1, min(2 * plan.workers, blocks)))}


def _upscale_stage(ds, actor: type, spec: PipelineSpec, plan: WorkerPlan, *, batch_size: int,
                   column: str = "image"):
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={"spec": spec, "device": plan.device, "threads": plan.threads, "column": column},
        batch_size=batch_size,
        batch_format="numpy",
        compute=_ray().data.ActorPoolStrategy(size=plan.workers),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )


def upscale_dataset(ds, model: Any = "default", *, column: str = "image", batch_size: int = 8,
                    workers: Optional[int] = None, device: Optional[str] = None, cpus_per_worker: int = 1,
                    **options: Any):
    """``ds`` with its ``column`` of images ``(H, W[, C])`` upscaled by ``model`` on the Ray cluster.

    ``options``: the pipeline's load options (``dtype``, ``max_memory``, ``base``, ``lora``, ...) and call
    options (``seed``, ``scale``, ``tile``, ``color_fix``, ``prompt``). Lazy, like any Ray Data dataset::

        ds = ray.data.read_images("in/", include_paths=True)
        upscale_dataset(ds, "default", scale=4).write_images("out/", column="image")

    An image the pipeline cannot upscale fails the run, as in any Ray Data transform; use
    :func:`upscale_files` to keep going past bad files.
    """
    plan = WorkerPlan.for_cluster(device, workers, cpus_per_worker)
    spec = PipelineSpec.from_options(model, options)
    return _upscale_stage(ds, UpscaleActor, spec, plan, batch_size=batch_size, column=column)


def upscale_files(sources: Sequence[PathLike], targets: Sequence[PathLike], model: Any = "default", *,
                  batch_size: int = 8, workers: Optional[int] = None, device: Optional[str] = None,
                  cpus_per_worker: int = 1, quality: int = 95, **options: Any):
    """A dataset of rows ``source``, ``target``, ``error`` (empty when the output was written) that,
    when iterated, reads each source, upscales it with ``model`` and writes it to its target.

    Every path must be reachable under the same name from every node (a shared filesystem). Targets are
    written whatever exists there (leave out the ones to keep before calling: :func:`pending`). Options
    as for :func:`upscale_dataset`.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources for {len(targets)} targets")
    if not sources:
        raise ValueError("no files to upscale")
    ray = _ray()
    plan = WorkerPlan.for_cluster(device, workers, cpus_per_worker)
    spec = PipelineSpec.from_options(model, options)
    rows = [{"source": str(s), "target": str(t)} for s, t in zip(sources, targets)]
    blocks = -(-len(rows) // batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    io_args = _io_stage_args(plan, blocks)
    ds = ds.map_batches(_read_files, batch_size=batch_size, batch_format="numpy", **io_args)
    ds = _upscale_stage(ds, FileUpscaleActor, spec, plan, batch_size=batch_size)
    return ds.map_batches(_write_files, fn_kwargs={"quality": quality}, batch_size=batch_size,
                          batch_format="numpy", **io_args)


def pending(sources: Sequence[PathLike], targets: Sequence[PathLike], overwrite: bool = False
            ) -> List[Tuple[Path, Path]]:
    """The (source, target) pairs still to do: all with ``overwrite``, else those whose target does not
    exist yet (a re-run after a failure finishes the rest)."""
    return [(Path(s), Path(t)) for s, t in zip(sources, targets) if overwrite or not Path(t).exists()]


def _decode_spans(batch: Dict[str, Any], path: str, frames_per_block: int) -> Iterator[Dict[str, Any]]:
    """span rows (start, end) -> one row per frame, ``image`` (H, W, 3) uint8, in blocks of
    ``frames_per_block`` frames (a span of a long video would not fit in memory as one block)."""
    from .video import batched, read_frames

    for start, end in zip(batch["start"], batch["end"]):
        for frames in batched(read_frames(path, float(start), float(end)), frames_per_block):
            yield {"image": frames}


@contextlib.contextmanager
def _ordered():
    """Ray Data keeps the dataset's order (``preserve_order``) for the datasets made and run inside."""
    context = _ray().data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = before


def upscale_video_on_ray(source: PathLike, target: PathLike, model: Any = "default", *, batch_size: int = 8,
                         frames_per_span: Optional[int] = None, workers: Optional[int] = None,
                         device: Optional[str] = None, cpus_per_worker: int = 1, overwrite: bool = False,
                         codec: str = "auto", progress: Optional[Callable[[int], None]] = None,
                         **options: Any) -> int:
    """Upscale the video ``source`` into ``target`` on the Ray cluster; returns the number of frames.

    The time line is cut into spans of about ``frames_per_span`` frames (default: 4 spans per worker, at
    least ``8 × batch_size`` frames each); tasks decode the spans, the workers upscale the frames in
    batches, and the frames come back here in order to be encoded with the source's frame rate and audio
    (:class:`~.video.VideoWriter`).
    ``progress(n)`` is called with the frame count of each batch encoded.
    """
    from .video import VideoWriter, probe, time_segments

    ray = _ray()
    info = probe(source)
    plan = WorkerPlan.for_cluster(device, workers, cpus_per_worker)
    spec = PipelineSpec.from_options(model, options)
    # NOTE: a span decodes from the key frame before it, up to a GOP (often 250 frames) of extra work:
    # spans of at least 8 batches, and 4 per worker for balance, keep that small.
    span = frames_per_span or max(8 * batch_size, math.ceil(info.frames / (4 * plan.workers)))
    spans = time_segments(info, span)
    with _ordered(), VideoWriter(target, info, overwrite=overwrite, codec=codec) as writer:
        rows = [{"start": start, "end": end} for start, end in spans]
        ds = ray.data.from_items(rows, override_num_blocks=len(spans))
        ds = ds.map_batches(_decode_spans, fn_kwargs={"path": str(source), "frames_per_block": batch_size},
                            batch_size=1, batch_format="numpy", **_io_stage_args(plan, len(spans)))
        ds = _upscale_stage(ds, UpscaleActor, spec, plan, batch_size=batch_size)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            frames = list(batch["image"])
            writer.write(frames)
            if progress is not None:
                progress(len(frames))
    return writer.frames_written


def iter_results(ds) -> Iterator[Dict[str, str]]:
    """The rows of an :func:`upscale_files` dataset as they finish: ``{"source", "target", "error"}``."""
    for row in ds.iter_rows():
        yield {"source": str(row["source"]), "target": str(row["target"]), "error": str(row["error"])}
