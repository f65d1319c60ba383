"""Trying corpus files: each image through the image reader and the CLI, each checkpoint through every loader
and the CLI's ``--model``, each attempt classified as ``ok``, ``error`` (a clear error) or ``traceback``.

A clear error is the documented exception type (ImageReadError for images, a ValueError such as LoaderError
for checkpoints, exit code 1 or 2 with one-line messages for the CLI) whose message is one line and names
the file. Anything else (another exception type, a message that spans lines or names no file, a CLI that
crashes) is counted as a traceback.

Run as a script it is the worker that tools/reliability_report.py starts in a subprocess::

    python trials.py images|cli-images|checkpoints|cli-models LIST.json OUTPUT_FOLDER TINY_IMAGE

where LIST.json holds the paths to try; it prints one JSON object {path: [[through, result, message]...]}.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Tuple

Attempt = Tuple[str, str, str]  # (through, "ok" | "error" | "traceback", message)


def _names_file(message: str, path: Path) -> bool:
    return str(path) in message or path.name in message


def _clear(message: str, path: Path) -> bool:
    return bool(message.strip()) and "\n" not in message.strip() and _names_file(message, path)


def checkpoint_loaders() -> Dict[str, Callable]:
    """Every public way of reading a checkpoint path."""
    import flashstep
    from flashstep.loaders import inspect_path, load_components, load_lora, load_model, read_file, read_state_dict
    from flashstep.loaders.files import read_safetensors_metadata

    return {"read_file": read_file, "read_state_dict": read_state_dict, "inspect_path": inspect_path,
            "load_model": load_model, "load_lora": load_lora, "load_components": load_components,
            "read_safetensors_metadata": read_safetensors_metadata, "flashstep.load": flashstep.load}


def try_call(through: str, call: Callable[[], object], path: Path, clear_types: tuple) -> Attempt:
    try:
        call()
    except clear_types as error:
        message = str(error)
        if _clear(message, path):
            return through, "error", message
        return through, "traceback", f"unclear {type(error).__name__}: {message!r}"
    except Exception:  # noqa: BLE001 - counting every other failure is the point
        return through, "traceback", traceback.format_exc()
    return through, "ok", ""


def try_checkpoint(path: Path) -> List[Attempt]:
    loaders = checkpoint_loaders()
    return [try_call(name, lambda fn=fn: fn(str(path)), path, (ValueError,)) for name, fn in loaders.items()]


def try_image(path: Path) -> List[Attempt]:
    from flashstep.imageio import ImageReadError, read_image
    from flashstep.pipelines.images import ImageBatch

    return [try_call("read_image", lambda: ImageBatch.from_user(read_image(path)), path, (ImageReadError,))]


def try_cli(args: List[str], paths: Tuple[Path, ...], through: str) -> Attempt:
    """``flashstep ARGS`` in this process: exit 0, or 1/2 with one-line messages of which one names one of
    ``paths`` (the input, or for a model that loads but fails on the image, the image)."""
    from flashstep.cli import main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = main(args)
    except Exception:  # noqa: BLE001 - a CLI that raises is what is being counted
        return through, "traceback", traceback.format_exc()
    except SystemExit as exit_:
        return through, "traceback", f"exited through SystemExit({exit_.code}): {stderr.getvalue()}"
    text = stderr.getvalue()
    if code == 0:
        return through, "ok", text
    if "Traceback" in text:
        return through, "traceback", text
    failed = [line.strip() for line in text.splitlines() if any(_names_file(line, path) for path in paths)]
    if code in (1, 2) and failed:
        return through, "error", failed[0]
    return through, "traceback", f"exit code {code} without a message naming the file: {text!r}"


def try_cli_image(path: Path, output: Path) -> List[Attempt]:
    return [try_cli(["upscale", str(path), "-o", str(output), "-q"], (path,), "cli")]


def try_cli_model(path: Path, output: Path, tiny_image: Path) -> List[Attempt]:
    return [try_cli(["upscale", str(tiny_image), "-o", str(output / "out.png"), "-q", "--model", str(path)],
                    (path, tiny_image), "cli --model")]


def worker(mode: str, listing: Path, output: Path, tiny_image: Path) -> Dict[str, List[Attempt]]:
    paths = [Path(p) for p in json.loads(listing.read_text())]
    results = {}
    for index, path in enumerate(paths):
        folder = output / f"{index:04d}"
        if mode == "images":
            results[str(path)] = try_image(path)
        elif mode == "cli-images":
            results[str(path)] = try_cli_image(path, folder)
        elif mode == "checkpoints":
            results[str(path)] = try_checkpoint(path)
        elif mode == "cli-models":
            results[str(path)] = try_cli_model(path, folder, tiny_image)
        else:
            raise SystemExit(f"unknown mode {mode!r}; valid: images, cli-images, checkpoints, cli-models")
    return results


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    mode_, listing_, output_, tiny_ = sys.argv[1:5]
    print(json.dumps(worker(mode_, Path(listing_), Path(output_), Path(tiny_))))
