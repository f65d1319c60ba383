"""Turn pytest-benchmark JSON from ``pytest benchmarks --benchmark-json FILE`` into a text summary.

    python benchmarks/summarize.py FILE [FILE ...] [--merged OUT.json]

Prints, per op, one block per case with every backend's median time per launch, achieved TFLOP/s
and GB/s, and its speed against the ``eager`` and ``compile`` peers (peer time / this time: 2.00x is
twice as fast as the peer), then the performance targets checked against the measured cases.
Several files (one per bench file) are read as one run; ``--merged`` also writes them as one JSON.
Uses only the standard library.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional

PEERS = ("eager", "compile")
# flashstep's own kernels: the targets judge the fastest of them ("aten", flashstep's composition of
# torch's kernels, is the fallback they are meant to beat, and stays in the tables).
OUR_KERNELS = ("cuda", "triton", "cpu")
OP_ORDER = (
    "attention",
    "group_norm",
    "device_copy",
    "conv2d",
    "linear",
    "geglu",
    "pixel_shuffle",
    "pixel_unshuffle",
    "conv2d_pixel_shuffle",
)

# Targets (an op's backends against its peers). Group norm is judged on the cases that stream at least
# this many bytes: smaller ones are bound by launch latency, not bandwidth.
ATTENTION_D64_SPEEDUP_OVER_SDPA_FLASH = 1.0
ATTENTION_D512_SPEEDUP_OVER_SDPA = 2.0
GROUP_NORM_FRACTION_OF_COPY_BANDWIDTH = 0.8
GROUP_NORM_MIN_BYTES = 100e6
PER_SAMPLE_LORA_CONV_MAX_COST = 1.15
CONV_PIXEL_SHUFFLE_SPEEDUP_OVER_EAGER = 1.2


@dataclass
class Row:
    op: str
    case: str
    backend: str
    shape: dict
    median_ms: float
    tflops: Optional[float]
    gbps: Optional[float]
    bytes_moved: Optional[int]
    relative_error: Optional[float]


def load(paths: List[str]) -> dict:
    """The runs in ``paths`` as one pytest-benchmark document (benchmarks concatenated)."""
    merged: Optional[dict] = None
    for path in paths:
        with open(path) as handle:
            document = json.load(handle)
        if merged is None:
            merged = document
        else:
            merged["benchmarks"].extend(document["benchmarks"])
    if merged is None:
        raise SystemExit("no benchmark JSON given")
    return merged


def rows_of(document: dict) -> List[Row]:
    rows = []
    for bench in document["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" not in info:
            continue
        rows.append(
            Row(
                op=info["op"],
                case=info["case"],
                backend=info["backend"],
                shape=info.get("shape", {}),
                median_ms=info["median_ms"],
                tflops=info.get("tflops"),
                gbps=info.get("gbps"),
                bytes_moved=info.get("bytes"),
                relative_error=info.get("relative_error"),
            )
        )
    return rows


def by_case(rows: List[Row]) -> "OrderedDict[tuple, Dict[str, Row]]":
    cases: "OrderedDict[tuple, Dict[str, Row]]" = OrderedDict()
    for row in rows:
        cases.setdefault((row.op, row.case), {})[row.backend] = row
    return cases


def _number(value: Optional[float], width: int, significant: int) -> str:
    """``value`` right-aligned in ``width`` with ``significant`` digits, never in exponent form."""
    if value is None or value != value:
        return " " * (width - 1) + "-"
    magnitude = math.floor(math.log10(abs(value))) if value else 0
    decimals = max(0, significant - 1 - magnitude)
    return f"{value:>{width}.{decimals}f}"


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in shape.items())


COLUMNS = (("backend", 16), ("median ms", 11), ("TFLOP/s", 10), ("GB/s", 10), ("vs eager", 10),
           ("vs compile", 12), ("rel err", 10))


def _ratio(peer: Optional[Row], row: Row, width: int) -> str:
    """peer time / this time, or '-' when the peer was not measured."""
    return f"{peer.median_ms / row.median_ms:>{width - 1}.2f}x" if peer else " " * (width - 1) + "-"


def _row_line(row: Row, backends: Dict[str, Row]) -> str:
    widths = [width for _, width in COLUMNS]
    error = f"{row.relative_error:>{widths[6]}.1e}" if row.relative_error is not None else _number(None, widths[6], 1)
    return (
        f"    {row.backend:<{widths[0]}}{_number(row.median_ms, widths[1], 4)}{_number(row.tflops, widths[2], 3)}"
        f"{_number(row.gbps, widths[3], 3)}{_ratio(backends.get('eager'), row, widths[4])}"
        f"{_ratio(backends.get('compile'), row, widths[5])}{error}"
    )


def table(rows: List[Row]) -> List[str]:
    """One block per op, one paragraph per case, one line per backend."""
    lines = []
    cases = by_case(rows)
    ops = [op for op in OP_ORDER if any(key[0] == op for key in cases)]
    ops += sorted({key[0] for key in cases} - set(ops))
    first, *others = COLUMNS
    header = f"    {first[0]:<{first[1]}}" + "".join(f"{name:>{width}}" for name, width in others)
    for op in ops:
        lines += ["", f"== {op} ==", header]
        for (case_op, case), backends in cases.items():
            if case_op != op:
                continue
            lines.append(f"  {case}  ({_shape_text(next(iter(backends.values())).shape)})")
            lines += [_row_line(row, backends) for row in backends.values()]
    return lines


def _ms(row: Row) -> str:
    return f"{_number(row.median_ms, 1, 4).strip()} ms"


def fastest(backends: Dict[str, Row], names=OUR_KERNELS) -> Optional[Row]:
    candidates = [row for name, row in backends.items() if name in names]
    return min(candidates, key=lambda row: row.median_ms) if candidates else None


class Targets:
    """Each check adds lines ``[PASS]``, ``[FAIL]`` or ``[ -- ]`` (not measured in this run)."""

    def __init__(self, rows: List[Row]):
        self.cases = by_case(rows)
        self.lines: List[str] = []

    def report(self, passed: Optional[bool], text: str) -> None:
        mark = "[ -- ]" if passed is None else ("[PASS]" if passed else "[FAIL]")
        self.lines.append(f"  {mark} {text}")

    def find(self, op: str, predicate) -> List[tuple]:
        return [(case, backends) for (case_op, case), backends in self.cases.items()
                if case_op == op and predicate(next(iter(backends.values())).shape, case)]

    def speedup(self, label: str, op: str, predicate, peer: str, needed: float) -> None:
        found = self.find(op, predicate)
        if not found:
            self.report(None, f"{label}: no such case measured in this run")
        for case, backends in found:
            ours, peer_row = fastest(backends), backends.get(peer)
            if ours is None or peer_row is None:
                missing = "no flashstep kernel" if ours is None else f"no {peer}"
                self.report(None, f"{label} [{case}]: {missing} measured")
                continue
            ratio = peer_row.median_ms / ours.median_ms
            self.report(
                ratio >= needed,
                f"{label} [{case}]: {ours.backend} {_ms(ours)} vs {peer} {_ms(peer_row)} "
                f"-> {ratio:.2f}x (need >= {needed:.2f}x)",
            )

    def attention(self) -> None:
        def square(d):
            return lambda shape, case: shape.get("head_dim") == d and shape.get("queries") == shape.get("keys") == 4096

        self.speedup("attention D=64 N=M=4096 vs SDPA flash", "attention", square(64), "sdpa_flash",
                     ATTENTION_D64_SPEEDUP_OVER_SDPA_FLASH)
        self.speedup("attention D=512 N=M=4096 vs SDPA", "attention", square(512), "eager",
                     ATTENTION_D512_SPEEDUP_OVER_SDPA)

    def group_norm_bandwidth(self) -> None:
        label = f"group_norm+silu >= {GROUP_NORM_FRACTION_OF_COPY_BANDWIDTH:.0%} of the copy bandwidth"
        copies = [row for (op, _), backends in self.cases.items() if op == "device_copy" for row in backends.values()]
        if not copies:
            self.report(None, f"{label}: the device copy was not measured")
            return
        ceiling = max(row.gbps for row in copies)
        found = [(case, backends) for (op, case), backends in self.cases.items() if op == "group_norm"]
        large = [(case, backends) for case, backends in found
                 if (next(iter(backends.values())).bytes_moved or 0) >= GROUP_NORM_MIN_BYTES]
        if not large:
            self.report(None, f"{label}: no case of >= {GROUP_NORM_MIN_BYTES / 1e6:.0f} MB measured")
        for case, backends in large:
            ours = fastest(backends)
            if ours is None:
                self.report(None, f"{label} [{case}]: no flashstep kernel measured")
                continue
            fraction = ours.gbps / ceiling
            self.report(
                fraction >= GROUP_NORM_FRACTION_OF_COPY_BANDWIDTH,
                f"{label} [{case}]: {ours.backend} {ours.gbps:.0f} GB/s = {fraction:.0%} of copy {ceiling:.0f} GB/s",
            )

    def per_sample_lora_conv(self) -> None:
        label = f"conv2d per-sample r=32 LoRA <= {PER_SAMPLE_LORA_CONV_MAX_COST:.2f}x the plain conv"
        found = [(case, backends) for (op, case), backends in self.cases.items()
                 if op == "conv2d" and case.startswith("lora_r32_per_sample ")]
        if not found:
            self.report(None, f"{label}: no such case measured in this run")
        for case, backends in found:
            shape_name = case.split(" ", 1)[1]
            plain = self.cases.get(("conv2d", f"plain {shape_name}"), {})
            ours = fastest(backends)
            plain_best = fastest(plain, OUR_KERNELS + ("aten",) + PEERS)
            if ours is None or plain_best is None:
                missing = "no flashstep kernel measured" if ours is None else "the plain conv was not measured"
                self.report(None, f"{label} [{shape_name}]: {missing}")
                continue
            cost = ours.median_ms / plain_best.median_ms
            self.report(
                cost <= PER_SAMPLE_LORA_CONV_MAX_COST,
                f"{label} [{shape_name}]: {ours.backend} {_ms(ours)} vs the fastest plain conv "
                f"({plain_best.backend}) {_ms(plain_best)} -> {cost:.2f}x",
            )

    def conv_pixel_shuffle(self) -> None:
        self.speedup("conv2d_pixel_shuffle vs conv + pixel_shuffle", "conv2d_pixel_shuffle",
                     lambda shape, case: True, "eager", CONV_PIXEL_SHUFFLE_SPEEDUP_OVER_EAGER)

    def check_all(self) -> List[str]:
        self.attention()
        self.group_norm_bandwidth()
        self.per_sample_lora_conv()
        self.conv_pixel_shuffle()
        return self.lines


def header(document: dict, rows: List[Row]) -> List[str]:
    infos = [bench.get("extra_info", {}) for bench in document["benchmarks"]]
    devices = sorted({info["device"] for info in infos if "device" in info})
    commits = sorted({info["commit"] for info in infos if "commit" in info})
    dtypes = sorted({info["dtype"] for info in infos if "dtype" in info})
    timed = len(rows)
    return [
        "flashstep op benchmarks",
        f"device: {'; '.join(devices) or 'unknown'}",
        f"commit: {', '.join(commits) or 'unknown'}   dtype: {', '.join(dtypes) or 'unknown'}   "
        f"cases timed: {timed} of {len(infos)} recorded   ({document.get('datetime', '')})",
        "median ms: per launch (CUDA events, L2 flushed, on a GPU); vs <peer>: peer time / this time",
    ]


def summarize(document: dict) -> str:
    rows = rows_of(document)
    lines = header(document, rows)
    if not rows:
        lines += ["", "no timed cases (was the run made with --benchmark-disable?)"]
        return "\n".join(lines)
    lines += table(rows)
    devices = [str(bench.get("extra_info", {}).get("device", "")) for bench in document["benchmarks"]]
    on_cpu_only = all(device.startswith("cpu") for device in devices)
    title = "== targets (set for a GPU; informational only on this CPU run) ==" if on_cpu_only else "== targets =="
    lines += ["", title] + Targets(rows).check_all()
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files of one run")
    parser.add_argument("--merged", help="also write the files' benchmarks as one JSON document here")
    args = parser.parse_args(argv)
    document = load(args.files)
    if args.merged:
        with open(args.merged, "w") as handle:
            json.dump(document, handle, indent=1)
    print(summarize(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
