"""Running the ``flashstep`` command in this process (fast) or as a real subprocess (exit codes, signals,
crashes), and checking what it left in a folder."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
from corpus import Case
from PIL import Image

from flashstep.cli import main


@dataclass
class CliResult:
    code: int
    stderr: str

    @property
    def lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def failures(self) -> Dict[str, str]:
        """The "failed: <input>: <cause>" lines of a batch, by input path."""
        found = {}
        for line in self.lines:
            if line.startswith("  failed: "):
                message = line[len("  failed: "):]
                found[message.split(": ", 1)[0]] = message
        return found


def run_cli(*args) -> CliResult:
    """``flashstep ARGS`` in this process (fast: the imports are already done)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    return CliResult(code, stderr.getvalue())


def cli_command(*args) -> List[str]:
    return [sys.executable, "-m", "flashstep", *[str(a) for a in args]]


def child_env() -> Dict[str, str]:
    """The environment of a subprocess: this one, with one OpenMP thread (tiny images, a shared machine)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_cli_process(*args, timeout: float = 240) -> CliResult:
    """``python -m flashstep ARGS`` as a subprocess."""
    done = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=child_env())
    return CliResult(done.returncode, done.stderr)


def digest(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> sha256 of its bytes; links by their target."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link->" + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_complete_images(folder: Path) -> List[Path]:
    """Every file in ``folder`` is a visible, fully decodable image (no partial or temporary file)."""
    files = sorted(folder.iterdir()) if folder.exists() else []
    for path in files:
        assert not path.name.startswith("."), f"hidden (temporary) file left behind: {path.name}"
        with Image.open(path) as image:
            image.load()
    return files


def save_image(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def noise_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    array = (np.random.default_rng(seed).random((height, width, channels)) * 255).astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


def marker_files(cases: List[Case]) -> List[Path]:
    return [case.marker for case in cases if case.marker is not None and case.marker.exists()]
