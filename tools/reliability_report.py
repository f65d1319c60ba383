"""The figures of the reliability note: the whole malformed corpus through the CLI and every loader, each
kind of attempt in its own subprocess, and runs killed in the middle of a write.

    python tools/reliability_report.py [--image-mutations N] [--checkpoint-mutations N] [--kills N] [--keep DIR]

The corpus is tests/reliability/corpus.py (broken, hostile and unusual images and checkpoints, plus seeded
random mutations of valid files), generated in a temporary folder. The attempts:

* images: one ``flashstep upscale`` batch over all of them; then each alone through the CLI and through
  ``read_image`` (tests/reliability/trials.py as the worker);
* checkpoints: each through every loader (read_file ... flashstep.load) and through ``flashstep upscale
  --model``;
* interrupted runs: ``flashstep upscale`` killed (SIGKILL) at random moments of a real batch, and killed or
  interrupted (SIGINT) in the middle of writing an image, on the O_TMPFILE path and the named-temporary path.

Printed: how many inputs were tried; how many ended in a traceback instead of a clear error (must be 0); how
many left a partial or changed file (must be 0); how many malicious checkpoints ran code (must be 0). The exit
code is 1 when any of these is not 0.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

RELIABILITY_TESTS = Path(__file__).resolve().parents[1] / "tests" / "reliability"
sys.path.insert(0, str(RELIABILITY_TESTS))

from cli_runs import child_env, cli_command, digest  # noqa: E402
from corpus import LOADER_GAPS, Case, checkpoint_corpus, encode, image_corpus, photo  # noqa: E402
from PIL import Image  # noqa: E402

# The attempts whose outcome a case's expectation fixes: images through the reader and the CLI, checkpoints
# through the model loaders and the CLI (reading a file whose weights fit no model is fine, loading it is not).
DECIDING = {"image": ("cli batch", "read_image", "cli"), "checkpoint": ("load_model", "flashstep.load", "cli --model")}


def run_worker(mode: str, cases: List[Case], work: Path, tiny: Path) -> Dict[str, list]:
    """tests/reliability/trials.py MODE over ``cases`` in a subprocess; a crashed worker counts every case."""
    listing = work / f"{mode}.json"
    listing.write_text(json.dumps([str(c.path) for c in cases]))
    done = subprocess.run([sys.executable, str(RELIABILITY_TESTS / "trials.py"), mode, str(listing),
                           str(work / f"out_{mode}"), str(tiny)], capture_output=True, text=True, env=child_env())
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {str(c.path): [[mode, "traceback", f"the worker crashed: {tail[0]}"]] for c in cases}


def batch_attempts(cases: List[Case], work: Path) -> Dict[str, list]:
    """All images as one ``flashstep upscale`` run: each must end as an output or a listed one-line failure."""
    output = work / "out_batch"
    done = subprocess.run(cli_command("upscale", *[c.path for c in cases], "-o", output, "-q"),
                          capture_output=True, text=True, env=child_env())
    failed = {line[len("  failed: "):].split(": ", 1)[0] for line in done.stderr.splitlines()
              if line.startswith("  failed: ")}
    crashed = "Traceback" in done.stderr or done.returncode not in (0, 1)
    written = {p.stem for p in output.iterdir()} if output.exists() else set()
    attempts = {}
    for case in cases:
        listed, made = str(case.path) in failed, case.path.stem in written
        result = "traceback" if crashed or listed == made else ("error" if listed else "ok")
        attempts[str(case.path)] = [["cli batch", result, "" if result != "traceback" else done.stderr[-500:]]]
    return attempts


def judge(case: Case, kind: str, attempts: List[list]) -> str:
    """"traceback", "wrong" (an outcome the case forbids; a malicious file must be refused by every loader)
    or "clean"."""
    if any(result == "traceback" for _, result, _ in attempts):
        return "traceback"
    if case.marker is not None and any(result != "error" for _, result, _ in attempts):
        return "wrong"
    deciding = [result for through, result, _ in attempts if through in DECIDING[kind]]
    if case.expect != "either" and any(result != case.expect for result in deciding):
        return "wrong"
    return "clean"


def hidden_or_broken(folder: Path) -> List[Path]:
    """Files under ``folder`` that are temporary (hidden) or not complete images."""
    bad = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith("."):
            bad.append(path)
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 - any file that does not decode is a partial output
            bad.append(path)
    return bad


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def interrupted_runs(work: Path, kills: int) -> Dict[str, int]:
    """Runs killed mid-write; returns {description: partial or broken files left (after the next run)}."""
    source = work / "interrupt_in"
    source.mkdir()
    for index in range(8):
        (source / f"image_{index}.png").write_bytes(encode(photo(48, 40, seed=index), "PNG"))
    left: Dict[str, int] = {}
    rng = random.Random(0)
    for run in range(kills):
        out = work / f"interrupt_random_{run}"
        process = subprocess.Popen(cli_command("upscale", source, "-o", out, "-q"), stderr=subprocess.DEVNULL,
                                   env=child_env())
        wait_until(lambda: out.exists() and any(out.iterdir()), process)
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()
        process.wait()
        left[f"SIGKILL at a random moment of a batch ({run + 1})"] = len(hidden_or_broken(out))
    for named in ("0", "1"):
        for sig in (signal.SIGKILL, signal.SIGINT):
            out, status = work / f"interrupt_{named}_{sig.name}", work / f"status_{named}_{sig.name}"
            process = subprocess.Popen([sys.executable, str(RELIABILITY_TESTS / "interrupted_cli.py"), str(status),
                                        "2", named, "upscale", str(source), "-o", str(out), "-q"],
                                       stderr=subprocess.DEVNULL, env=child_env())
            if not wait_until(status.exists, process):
                process.kill()
            process.send_signal(sig)
            process.wait()
            path = "named temporary file" if named == "1" else "O_TMPFILE"
            if named == "1" and sig == signal.SIGKILL:
                subprocess.run(cli_command("upscale", source, "-o", out, "-q"), capture_output=True, env=child_env())
                path += ", then the next run"
            left[f"{sig.name} in the middle of a write ({path})"] = len(hidden_or_broken(out))
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-mutations", type=int, default=200, help="random mutations of valid images")
    parser.add_argument("--checkpoint-mutations", type=int, default=200, help="random mutations of valid checkpoints")
    parser.add_argument("--kills", type=int, default=3, help="runs killed at random moments")
    parser.add_argument("--keep", help="generate the corpus and outputs in this folder and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reliability_") as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        return report(work, args)


def report(work: Path, args: argparse.Namespace) -> int:
    started = time.monotonic()
    images = image_corpus(work / "images", mutations=args.image_mutations, seed=1)
    checkpoints = checkpoint_corpus(work / "checkpoints", work / "markers", mutations=args.checkpoint_mutations,
                                    seed=1)
    tiny = work / "tiny.png"
    tiny.write_bytes(encode(photo(5, 6), "PNG"))
    before = {folder: digest(work / folder) for folder in ("images", "checkpoints")}

    attempts: Dict[str, list] = {str(c.path): [] for c in images + checkpoints}
    for source in (batch_attempts(images, work), run_worker("images", images, work, tiny),
                   run_worker("cli-images", images, work, tiny), run_worker("checkpoints", checkpoints, work, tiny),
                   run_worker("cli-models", checkpoints, work, tiny)):
        for path, found in source.items():
            attempts[path] += found
    kinds = {str(c.path): "image" for c in images} | {str(c.path): "checkpoint" for c in checkpoints}
    verdicts = {path: (c, judge(c, kinds[path], attempts[path])) for c in images + checkpoints
                for path in [str(c.path)]}
    counts = Counter(verdict for _, verdict in verdicts.values())

    changed = sum(digest(work / folder) != before[folder] for folder in before)
    changed_files = sum(1 for folder in before for key, value in digest(work / folder).items()
                        if before[folder].get(key) != value)
    partial_outputs = sum(len(hidden_or_broken(folder)) for folder in work.glob("out_*"))
    interrupted = interrupted_runs(work, args.kills)
    ran_code = [c for c in checkpoints if c.marker is not None and c.marker.exists()]
    malicious = [c for c in checkpoints if c.marker is not None]

    malformed = sum(case.expect != "ok" for case, _ in verdicts.values())
    tried_attempts = sum(len(a) for a in attempts.values())
    left_partial = changed_files + partial_outputs + sum(interrupted.values())

    print("Reliability report (tests/reliability/corpus.py; tools/reliability_report.py)")
    print(f"  inputs tried                         {len(verdicts)}: {malformed} malformed or random mutations, "
          f"{len(verdicts) - malformed} valid but unusual (every PIL mode, 16-bit, float, 1x1, EXIF, animation, "
          f"controls)")
    print(f"    images {len(images)}, checkpoints and folders {len(checkpoints)}; {tried_attempts} attempts "
          f"through the CLI batch, the CLI per file, read_image, 8 loaders and the CLI --model")
    print(f"  ended in a traceback                 {counts['traceback']}")
    print(f"  ended in a forbidden outcome         {counts['wrong']} (a valid input refused, a broken one accepted)")
    print(f"  left a partial or changed file       {left_partial} (inputs changed: {changed_files} in {changed} "
          f"folders; partial outputs: {partial_outputs}; after interrupted runs: {sum(interrupted.values())})")
    print(f"  malicious checkpoints that ran code  {len(ran_code)} of {len(malicious)}")
    for description, count in interrupted.items():
        print(f"    {description}: {count} partial file(s) left")
    for path, (case, verdict) in sorted(verdicts.items()):
        if verdict != "clean":
            gap = f" [{LOADER_GAPS[case.name]}]" if case.name in LOADER_GAPS else ""
            detail = next((m for _, r, m in attempts[path] if r == "traceback"), "") if verdict == "traceback" else \
                ", ".join(f"{t}={r}" for t, r, _ in attempts[path])
            print(f"  {verdict}: {case.name} ({case.cause}){gap}: {detail.strip().splitlines()[-1] if detail else ''}")
    print(f"  ({time.monotonic() - started:.0f} s)")
    failed = counts["traceback"] or counts["wrong"] or left_partial or ran_code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
