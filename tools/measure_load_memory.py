"""Peak memory and time of loading the full SD 2.1 UNet (865.9 M parameters) with flashstep.

    python tools/measure_load_memory.py [--folder DIR]

Builds the UNet once with diffusers (random weights, fp32) and saves it in the diffusers layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``, 3.46 GB), unless ``--folder`` already holds
it. Then, for each target dtype, a fresh process imports flashstep, runs ``flashstep.load_model`` and
reports the time and the peak resident memory (``ru_maxrss``): right after the load, and after reading
every weight once (memory-mapped pages count as resident once read).

NOTE: Linux carries ``ru_maxrss`` over ``fork`` + ``exec`` from the parent, so this parent process stays
small (it never imports torch) and the build runs in a process of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SD21_UNET = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, sample_size=64)
GIB = 2 ** 30


def build(folder: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    started = time.perf_counter()
    UNet2DConditionModel(**SD21_UNET).save_pretrained(folder)
    print(f"built and saved the diffusers UNet in {time.perf_counter() - started:.1f} s", flush=True)


def child(folder: str, dtype_name: str) -> None:
    """Runs in a fresh process: load, then read every weight; prints one JSON line."""
    import resource

    import torch

    import flashstep

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB

    baseline = peak()
    started = time.perf_counter()
    model = flashstep.load_model(folder, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - started
    after_load = peak()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())
    print(json.dumps({"dtype": dtype_name, "seconds": seconds, "baseline_gib": baseline, "after_load_gib": after_load,
                      "after_read_gib": peak(), "parameters": sum(p.numel() for p in model.parameters()),
                      "finite": checksum == checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="where the diffusers UNet folder is (or is written)")
    parser.add_argument("--build", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build)
        return
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or os.path.join(scratch, "unet")
        if not os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors")):
            subprocess.run([sys.executable, __file__, "--build", folder], check=True)
        size = os.path.getsize(os.path.join(folder, "diffusion_pytorch_model.safetensors")) / GIB
        print(f"file: {size:.2f} GiB (fp32 safetensors, diffusers layout)")
        for dtype_name in ("float32", "float16"):
            output = subprocess.run([sys.executable, __file__, "--child", folder, dtype_name], check=True,
                                    capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(f"load_model(dtype={dtype_name}): {result['seconds']:.2f} s; peak RSS {result['baseline_gib']:.2f} "
                  f"GiB before (torch + flashstep imported), {result['after_load_gib']:.2f} GiB after the load, "
                  f"{result['after_read_gib']:.2f} GiB after reading every weight "
                  f"({result['parameters']:,} parameters)")


if __name__ == "__main__":
    main()
