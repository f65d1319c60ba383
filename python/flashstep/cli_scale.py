"""The scale-out part of ``flashstep upscale``: ``--ray [ADDRESS]`` and video files.

* ``flashstep upscale IN... -o OUT --ray [ADDRESS]``: the images on a Ray cluster (a new local one when
  no ADDRESS is given; ``auto`` for the cluster this machine belongs to, ``ray://host:10001`` for a
  remote one). Outputs that exist are skipped, so a re-run after a failure finishes the rest; a file
  that cannot be read, upscaled or written is reported at the end and the exit code is 1.
* ``flashstep upscale video.mp4 -o out.mp4 [--ray [ADDRESS]]``: the frames upscaled in batches and
  re-encoded at the source's frame rate with its audio, on this machine or on the cluster.

The summary line is the single-machine command's: upscaled / skipped / failed.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from .cli import EXIT_FAILED_ITEMS, UsageError, load_pipeline, output_paths
from .distributed.video import READ_EXTENSIONS as VIDEO_EXTENSIONS
from .distributed.video import WRITE_EXTENSIONS as VIDEO_WRITE_EXTENSIONS
from .distributed.video import is_video

# Ray's address for a new local cluster: what ``--ray`` with no ADDRESS means.
LOCAL_CLUSTER = "local"


def handles(args: argparse.Namespace) -> bool:
    """Whether this module runs the ``upscale`` command: ``--ray`` was given or an input is a video."""
    return getattr(args, "ray", None) is not None or any(is_video(path) for path in args.inputs)


def run(args: argparse.Namespace) -> int:
    videos = [Path(path) for path in args.inputs if is_video(path)]
    if videos and len(videos) != len(args.inputs):
        raise UsageError("give video files and images in separate runs")
    try:
        with _ray_cluster(args.ray, quiet=args.quiet):
            return _upscale_videos(args, videos) if videos else _upscale_images_on_ray(args)
    except ImportError as error:
        raise UsageError(str(error)) from None


@contextlib.contextmanager
def _ray_cluster(address, quiet: bool) -> Iterator[None]:
    """Connected to Ray for the block when ``address`` is given (None: not on Ray); a cluster this process
    is already connected to is used as it is and left running."""
    if address is None:
        yield
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'flashstep[ray]'") from None
    started = not ray.is_initialized()
    if started:
        local = address == LOCAL_CLUSTER
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=not quiet,
                     **({"include_dashboard": False} if local else {}))
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UsageError(f"--ray {address}: cannot connect to a Ray cluster there ({_first_line(error)})") from None
    # NOTE: the command shows one progress bar of finished images; Ray Data's per-stage bars and logs
    # would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _remove_stale_partials(targets: List[Path]) -> None:
    from .imageio import remove_stale_partials

    for folder in sorted({target.parent for target in targets}):
        for stale in remove_stale_partials(folder):
            print(f"removed {stale}, left by an interrupted run", file=sys.stderr)


def _model(args: argparse.Namespace) -> str:
    from . import pipelines

    model = args.model or "default"
    if model not in pipelines.KINDS and not Path(model).exists():
        raise UsageError(f"--model {model!r} is neither a kind ({', '.join(pipelines.KINDS)}) nor an existing file")
    return model


def _ray_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments of the flashstep.distributed functions: where to run and the pipeline's options."""
    options = {"device": args.device, "dtype": args.dtype, "max_memory": args.max_memory, "seed": args.seed,
               "scale": args.scale, "tile": args.tile, "color_fix": args.color_fix, "prompt": args.prompt}
    for name in ("base", "lora", "de_net", "adapter"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return {k: v for k, v in options.items() if v is not None or k == "device"}


def _report(args: argparse.Namespace, what: str, done: int, skipped: int, failures: List[Tuple[Path, str]],
            unfinished: int = 0, stopped: str = "") -> int:
    if not args.quiet or failures or unfinished:
        print(f"upscaled {done}{what}, skipped {skipped} (output exists; --overwrite to redo), "
              f"failed {len(failures)}", file=sys.stderr)
    for _, message in failures:
        print(f"  failed: {message}", file=sys.stderr)
    if unfinished:
        print(f"  not finished: {unfinished}; the run stopped: {stopped}\n"
              "  finished outputs are complete; run the same command again to do the rest", file=sys.stderr)
    return EXIT_FAILED_ITEMS if failures or unfinished else 0


def _upscale_images_on_ray(args: argparse.Namespace) -> int:
    import ray
    from tqdm import tqdm

    from .distributed.ray_upscale import iter_results, pending, upscale_files
    from .imageio import list_images

    inputs = list_images(args.inputs)
    if not inputs:
        raise UsageError(f"no images found in {', '.join(args.inputs)}")
    outputs = output_paths(inputs, Path(args.output), args.format)
    _remove_stale_partials(outputs)
    todo = pending(inputs, outputs, overwrite=args.overwrite)
    skipped = len(inputs) - len(todo)
    protected = {path.resolve() for path in inputs}
    failures = [(s, f"{s}: {t}: is one of the inputs; refusing to overwrite an input (choose another output)")
                for s, t in todo if t.resolve() in protected]
    todo = [(s, t) for s, t in todo if t.resolve() not in protected]
    done, finished, stopped = 0, 0, ""
    if todo:
        results = upscale_files([s for s, _ in todo], [t for _, t in todo], _model(args), quality=args.quality,
                                **_ray_options(args))
        with tqdm(total=len(todo), desc="images", unit="image", disable=args.quiet or len(todo) < 2) as bar:
            try:
                for row in iter_results(results):
                    if row["error"]:
                        failures.append((Path(row["source"]), row["error"]))
                    else:
                        done += 1
                    finished += 1
                    bar.update()
            except ray.exceptions.RayError as error:
                stopped = _first_line(error)
    return _report(args, "", done, skipped, failures, len(todo) - finished, stopped)


def _video_targets(videos: List[Path], output: Path) -> List[Path]:
    if len(videos) == 1 and output.suffix.lower() in VIDEO_WRITE_EXTENSIONS and not output.is_dir():
        return [output]
    if output.suffix.lower() in VIDEO_EXTENSIONS and not output.is_dir():
        raise UsageError(f"-o {output}: several videos need an output folder; "
                         f"a video output is one of {', '.join(VIDEO_WRITE_EXTENSIONS)}")
    targets, seen = [], {}
    for video in videos:
        suffix = video.suffix.lower() if video.suffix.lower() in VIDEO_WRITE_EXTENSIONS else ".mp4"
        target = output / f"{video.stem}{suffix}"
        if target in seen:
            raise UsageError(f"{video} and {seen[target]} would both be written to {target}; rename one")
        seen[target] = video
        targets.append(target)
    return targets


def _upscale_videos(args: argparse.Namespace, videos: List[Path]) -> int:
    from tqdm import tqdm

    from .distributed import video

    targets = _video_targets(videos, Path(args.output))
    _remove_stale_partials(targets)
    todo = [(s, t) for s, t in zip(videos, targets) if args.overwrite or not t.exists()]
    skipped = len(videos) - len(todo)
    failures: List[Tuple[Path, str]] = []
    frames = 0
    pipe = load_pipeline(args) if todo and args.ray is None else None

    def upscale(batch):
        return pipe(batch, prompt=args.prompt, seed=args.seed, scale=args.scale, tile=args.tile,
                    color_fix=args.color_fix)

    for source, target in todo:
        try:
            total = video.probe(source).frames
            with tqdm(total=total or None, desc=source.name, unit="frame", disable=args.quiet) as bar:
                if pipe is not None:
                    frames += video.upscale_video(source, target, upscale, overwrite=args.overwrite,
                                                  progress=bar.update)
                else:
                    frames += _upscale_video_on_ray(args, source, target, bar.update)
        except video.VideoError as error:
            failures.append((source, str(error)))
        except (ValueError, RuntimeError, MemoryError) as error:
            failures.append((source, f"{source}: {type(error).__name__}: {error}"))
    done = len(todo) - len(failures)
    return _report(args, f" video(s), {frames} frames", done, skipped, failures)


def _upscale_video_on_ray(args: argparse.Namespace, source: Path, target: Path, progress) -> int:
    import ray

    from .distributed.ray_upscale import upscale_video_on_ray

    try:
        return upscale_video_on_ray(source, target, _model(args), overwrite=args.overwrite, progress=progress,
                                    **_ray_options(args))
    except ray.exceptions.RayError as error:
        raise RuntimeError(f"the run on Ray stopped: {error}") from None
