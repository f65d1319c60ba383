"""A run killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) in the middle of writing an image leaves only
complete outputs: on Linux the image is written into an unnamed O_TMPFILE file that gets its name only when
complete; on the named-temporary-file fallback a killed run leaves a hidden ``.partial`` file that the next
run removes."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import assert_complete_images, child_env, cli_command, digest, noise_image, run_cli, save_image

HERE = Path(__file__).resolve().parent
LINUX = sys.platform.startswith("linux")
INTERRUPTED = "flashstep upscale: interrupted; finished outputs are complete, no partial file was left"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    for index in range(3):
        save_image(folder / f"photo_{index}.png", noise_image(12, 10, seed=index))
    return folder


def start_slowed(photos: Path, out: Path, status: Path, named: bool) -> subprocess.Popen:
    """The CLI on ``photos`` with its second image save stalled halfway (see interrupted_cli.py)."""
    command = [sys.executable, str(HERE / "interrupted_cli.py"), str(status), "1", "1" if named else "0",
               "upscale", str(photos), "-o", str(out), "-q"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}): {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never reached the write")
        time.sleep(0.02)


def unnamed_files(pid: int, folder: Path):
    """The files process ``pid`` holds open in ``folder`` that have no name (O_TMPFILE)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder.resolve()}/#") and target.endswith("(deleted)"):
            found.append(target)
    return found


@pytest.mark.skipif(not LINUX, reason="O_TMPFILE and /proc are Linux's")
def test_sigkill_in_the_middle_of_a_write_leaves_only_complete_outputs(photos, tmp_path):
    out, status = tmp_path / "out", tmp_path / "status"
    inputs = digest(photos)
    process = start_slowed(photos, out, status, named=False)
    wait_for(status.exists, process)
    assert len(unnamed_files(process.pid, out)) == 1, "half an image is in an unnamed file in the output folder"
    assert [p.name for p in os.scandir(out)] == ["photo_0.png"], "nothing of the second image is visible"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert [p.name for p in assert_complete_images(out)] == ["photo_0.png"]
    assert digest(photos) == inputs
    result = run_cli("upscale", photos, "-o", out, "-q")
    assert result.code == 0 and result.lines == [], "the next run finishes the rest and has nothing to clean"
    assert [p.name for p in assert_complete_images(out)] == ["photo_0.png", "photo_1.png", "photo_2.png"]


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_sigint_in_the_middle_of_a_write_exits_130_and_leaves_no_partial_file(photos, tmp_path, named):
    out, status = tmp_path / "out", tmp_path / "status"
    process = start_slowed(photos, out, status, named=named)
    wait_for(status.exists, process)
    if named:
        assert len([p for p in os.scandir(out) if p.name.endswith(".partial")]) == 1
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in stderr
    assert [p.name for p in assert_complete_images(out)] == ["photo_0.png"]


def test_sigkill_on_the_named_fallback_leaves_a_partial_file_that_the_next_run_removes(photos, tmp_path):
    out, status = tmp_path / "out", tmp_path / "status"
    process = start_slowed(photos, out, status, named=True)
    wait_for(status.exists, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    stale = [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(stale) == 1 and stale[0].name.startswith(f".photo_1.png.{process.pid}.")
    result = run_cli("upscale", photos, "-o", out, "-q")
    assert result.code == 0 and result.lines == [f"removed {stale[0]}, left by an interrupted run"]
    assert [p.name for p in assert_complete_images(out)] == ["photo_0.png", "photo_1.png", "photo_2.png"]


@pytest.mark.skipif(not LINUX, reason="on other systems a killed writer leaves a .partial file for the next run")
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_of_a_real_batch(tmp_path, seed):
    """No patched save: kill the real command at a random moment once it has started writing outputs."""
    folder, out = tmp_path / "in", tmp_path / "out"
    for index in range(8):
        save_image(folder / f"image_{index}.png", noise_image(48, 40, seed=index))
    process = subprocess.Popen(cli_command("upscale", folder, "-o", out, "-q"), stderr=subprocess.PIPE,
                               env=child_env())
    wait_for(lambda: out.exists() and any(out.iterdir()), process)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    finished = assert_complete_images(out)
    assert 1 <= len(finished) <= 8
    for path in finished:
        assert path.stat().st_size > 0
