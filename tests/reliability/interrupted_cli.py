"""``flashstep`` for the interrupted-run tests: the same command, except that the image save after the first
SLOW_AFTER saves writes half of its bytes, writes "writing" to the file STATUS and sleeps, so that a test
can kill the process in the middle of a write. With NAMED_TEMPORARY=1 the writer takes its fallback path
(a named temporary file, as on systems without O_TMPFILE).

    python interrupted_cli.py STATUS SLOW_AFTER NAMED_TEMPORARY upscale IN... -o OUT
"""
from __future__ import annotations

import io
import signal
import sys
import time

from PIL import Image

import flashstep.imageio as imageio
from flashstep.cli import main


def slowed_save(original, status: str, slow_after: int):
    saves = []

    def save(self, fp, *args, **kwargs):
        if len(saves) < slow_after:
            saves.append(fp)
            return original(self, fp, *args, **kwargs)
        buffer = io.BytesIO()
        original(self, buffer, *args, **kwargs)
        data = buffer.getvalue()
        fp.write(data[: len(data) // 2])
        fp.flush()
        with open(status, "w") as report:
            report.write("writing\n")
        time.sleep(120)
        fp.write(data[len(data) // 2 :])

    return save


if __name__ == "__main__":
    status_, slow_after_, named_ = sys.argv[1:4]
    # A process started from a non-interactive shell's background job inherits SIGINT ignored, and Python then
    # leaves it so; the tests play a user's Ctrl-C, which reaches a foreground process with the default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    Image.Image.save = slowed_save(Image.Image.save, status_, int(slow_after_))
    if named_ == "1":
        imageio._open_unnamed = lambda folder: None
    sys.exit(main(sys.argv[4:]))
