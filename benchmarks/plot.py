"""Latency and memory against image size, for flashstep and each peer, as PNG files in benchmarks/.

    python benchmarks/plot.py [--pipeline osediff] [--sizes 128 256 384] [--threads 2] [--repeats 3]
    python benchmarks/plot.py --from benchmarks/plot_osediff_cpu.json        # redraw from saved results

Each size runs in a fresh process (``flashstep bench --pipeline P --size N --json ...``, no torch.compile
peers), so that one size's memory does not carry into the next. The results are saved beside the plots
(``plot_<pipeline>_<device>.json``); the plots are ``plot_<pipeline>_<device>_latency.png`` (median seconds
per image) and ``..._memory.png`` (the memory a call adds at its peak, MB), both on log-log axes against the
output side. Drawn with Pillow.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT = 900, 560
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 90, 30, 50, 150


def run_sizes(pipeline: str, sizes: Sequence[int], config: str, threads: Optional[int], repeats: int,
              device: Optional[str]) -> dict:
    """``flashstep bench`` once per size, each in a new process; {"runs": [result, ...]} with the sizes."""
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            target = Path(scratch) / f"{size}.json"
            command = [sys.executable, "-m", "flashstep", "bench", "--pipeline", pipeline, "--size", str(size),
                       "--config", config, "--repeats", str(repeats), "--no-compile", "--json", str(target)]
            if threads:
                command += ["--threads", str(threads)]
            if device:
                command += ["--device", device]
            print("$ " + " ".join(command[1:]), flush=True)
            done = subprocess.run(command, text=True)
            if done.returncode != 0 or not target.exists():
                print(f"  size {size} failed (exit {done.returncode}); left out of the plot", flush=True)
                continue
            result = json.loads(target.read_text())
            result["size"] = size
            runs.append(result)
    return {"pipeline": pipeline, "config": config, "runs": runs}


def series(results: dict, field: str, scale: float) -> Dict[str, List[Tuple[float, float]]]:
    """variant -> [(size, value)] for one field of the rows."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    for run in results["runs"]:
        for row in run["rows"]:
            value = row[field] * scale
            if value > 0:
                out.setdefault(row["name"], []).append((run["size"], value))
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _ticks(low: float, high: float) -> List[float]:
    """1-2-5 ticks per decade covering [low, high]."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks or [low, high]


def _label(value: float) -> str:
    return f"{value:g}" if value >= 1 else f"{value:.2g}"


def line_chart(path: Path, title: str, x_label: str, data: Dict[str, List[Tuple[float, float]]],
               subtitle: str = "") -> None:
    """A log-log line chart with markers and a legend, written as PNG (the title names the y axis)."""
    from PIL import Image, ImageDraw

    points = [p for values in data.values() for p in values]
    if not points:
        raise ValueError(f"{path.name}: nothing to draw")
    xs = sorted({x for x, _ in points})
    y_low, y_high = min(y for _, y in points), max(y for _, y in points)
    y_low, y_high = y_low / 1.3, y_high * 1.3
    x_low, x_high = xs[0] / 1.15, xs[-1] * 1.15
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def to_px(x: float, y: float) -> Tuple[float, float]:
        fx = (math.log(x) - math.log(x_low)) / (math.log(x_high) - math.log(x_low))
        fy = (math.log(y) - math.log(y_low)) / (math.log(y_high) - math.log(y_low))
        return MARGIN_LEFT + fx * plot_w, MARGIN_TOP + (1 - fy) * plot_h

    small, normal = _font(13), _font(16)
    draw.text((MARGIN_LEFT, 12), title, fill="black", font=normal)
    if subtitle:
        draw.text((MARGIN_LEFT, 32), subtitle, fill=(90, 90, 90), font=small)
    draw.rectangle([MARGIN_LEFT, MARGIN_TOP, MARGIN_LEFT + plot_w, MARGIN_TOP + plot_h], outline="black")
    for y in _ticks(y_low, y_high):
        _, py = to_px(xs[0], y)
        draw.line([MARGIN_LEFT, py, MARGIN_LEFT + plot_w, py], fill=(225, 225, 225))
        draw.text((MARGIN_LEFT - 8, py), _label(y), fill="black", font=small, anchor="rm")
    for x in xs:
        px, _ = to_px(x, y_low)
        draw.line([px, MARGIN_TOP, px, MARGIN_TOP + plot_h], fill=(225, 225, 225))
        draw.text((px, MARGIN_TOP + plot_h + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    draw.text((MARGIN_LEFT + plot_w / 2, MARGIN_TOP + plot_h + 30), x_label, fill="black", font=small, anchor="mt")
    for index, (name, values) in enumerate(data.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3)
        for px, py in pixels:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        legend_y = MARGIN_TOP + plot_h + 55 + 20 * index
        draw.line([MARGIN_LEFT, legend_y, MARGIN_LEFT + 30, legend_y], fill=colour, width=3)
        draw.text((MARGIN_LEFT + 40, legend_y), name, fill="black", font=small, anchor="lm")
    image.save(path)


def draw(results: dict, device_tag: str, folder: Path) -> List[Path]:
    pipeline = results["pipeline"]
    first = results["runs"][0]["header"] if results["runs"] else {}
    subtitle = (f"{first.get('machine', '?')}; commit {first.get('commit', '?')}; {results['config']} config; "
                "median of the timed calls")
    written = []
    for field, scale, unit, name in (("median_s", 1.0, "seconds per image", "latency"),
                                     ("peak_bytes", 2.0**-20, "peak MB a call adds", "memory")):
        path = folder / f"plot_{pipeline}_{device_tag}_{name}.png"
        line_chart(path, f"{pipeline}: {unit} against the output size", "output side in pixels (the image is side x side)",
                   series(results, field, scale), subtitle)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="osediff", choices=("osediff", "s3diff", "sd-turbo", "rrdbnet"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--config", default="full", choices=("full", "reduced"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--from", dest="source", help="redraw from this saved JSON instead of running")
    args = parser.parse_args(argv)
    if args.source:
        results = json.loads(Path(args.source).read_text())
        device_tag = Path(args.source).stem.rsplit("_", 1)[-1]
    else:
        import torch

        device_tag = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        results = run_sizes(args.pipeline, args.sizes, args.config, args.threads, args.repeats, args.device)
        if not results["runs"]:
            print("no size finished; nothing to plot", file=sys.stderr)
            return 1
        saved = HERE / f"plot_{args.pipeline}_{device_tag}.json"
        saved.write_text(json.dumps(results, indent=1))
        print(f"results: {saved}")
    for path in draw(results, device_tag, HERE):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
