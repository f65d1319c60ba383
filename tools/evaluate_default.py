"""Evaluate the bundled default SR nets against bicubic upscaling on the held-out photos.

    python tools/evaluate_default.py     # prints the table and writes benchmarks/default_model.md
    python tools/evaluate_default.py --example examples/photo.png   # also writes the README's example input

For each held-out photo (never trained on) and each scale s, the HR image (cropped to multiples of s)
gives two LR inputs:

* clean: antialiased bicubic downscaling, on the 8-bit grid (:func:`degradations.bicubic_downscale`);
* degraded: the degradation model with every stage on (:data:`degradations.EVALUATION`: blur, random
  downscaling kernel, noise, JPEG), DRAWS draws per photo, draw k of photo i from a generator seeded
  with EVAL_SEED + 100·k + i (one draw says little: the gain over bicubic swings by ±0.5 dB between
  draws, with the noise strength and the JPEG quality).

Each LR image is upscaled by bicubic interpolation and by the bundled net (SRVGGNetCompact through
flashstep.ops, float32 on the CPU); both outputs are clamped and rounded to 8 bits. PSNR is on RGB in
[0, 255], 10·log10(255² / MSE), with a border of s pixels cropped; SSIM is scikit-image's
``structural_similarity(channel_axis=-1, data_range=255)`` on the same crop. Deterministic.
"""
from __future__ import annotations

import os

# NOTE: see tools/train_default.py: libgomp's spinning threads crawl on cores shared with other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import pathlib
import sys
from datetime import date
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

from degradations import EVALUATION, apply_degradation, bicubic_downscale, degrade, sample_degradation
from train_default import HELD_OUT_PHOTOS, REPO_ROOT, cpu_name, load_photo

from flashstep.data import default_model_path, load_default_model
from flashstep.loaders.files import read_safetensors_metadata

EVAL_SEED = 1234
DRAWS = 4
SCALES = (4, 2)
REPORT = REPO_ROOT / "benchmarks" / "default_model.md"
COMMAND = "python tools/evaluate_default.py"


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    mse = np.mean((output.astype(np.float64) - target.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def metrics(output: np.ndarray, target: np.ndarray, border: int) -> Tuple[float, float]:
    """(PSNR, SSIM) of (H, W, 3) uint8 images with ``border`` pixels cropped on each side."""
    output = output[border:-border, border:-border]
    target = target[border:-border, border:-border]
    return psnr(output, target), float(structural_similarity(output, target, channel_axis=-1, data_range=255))


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """(3, h, w) -> (3, h·s, w·s), bicubic (a = -0.75, as torch and OpenCV), not clamped."""
    return F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0]


def evaluate(scale: int) -> Tuple[List[Dict], Dict[str, str]]:
    """Rows {photo, setting, input, bicubic (psnr, ssim), model (psnr, ssim)} for one scale, and the file's metadata."""
    model = load_default_model(scale, device="cpu", dtype=torch.float32)
    rows = []
    for index, name in enumerate(HELD_OUT_PHOTOS):
        photo = load_photo(name)
        height, width = (side - side % scale for side in photo.shape[-2:])
        hr = photo[:, :height, :width]  # (3, H, W), multiples of s
        target = to_uint8(hr)
        inputs = [("clean", "bicubic downscale", bicubic_downscale(hr, scale))]
        for draw in range(DRAWS):
            generator = torch.Generator().manual_seed(EVAL_SEED + 100 * draw + index)
            degradation = sample_degradation(generator, scale, EVALUATION)
            inputs.append(("degraded", degradation.describe(), apply_degradation(hr, scale, degradation, generator)))
        for setting, description, lr in inputs:
            with torch.no_grad():
                sr = model(lr[None])[0]
            rows.append({
                "photo": f"{name} ({width}×{height})",
                "setting": setting,
                "input": description,
                "bicubic": metrics(to_uint8(bicubic_upscale(lr, scale)), target, scale),
                "model": metrics(to_uint8(sr), target, scale),
            })
    return rows, read_safetensors_metadata(str(default_model_path(scale)))


def mean_of(rows: List[Dict], key: str, index: int) -> float:
    return float(np.mean([row[key][index] for row in rows]))


def gain(rows: List[Dict]) -> float:
    """Mean PSNR of the model minus mean PSNR of bicubic over ``rows``, in dB."""
    return mean_of(rows, "model", 0) - mean_of(rows, "bicubic", 0)


def table(scale: int, rows: List[Dict], metadata: Dict[str, str]) -> List[str]:
    lines = [
        f"### ×{scale} (num_feat {metadata['num_feat']}, num_conv {metadata['num_conv']}, "
        f"{metadata.get('iterations', '?')} steps, trained in {int(metadata.get('train_seconds', 0)) / 60:.1f} min)",
        "",
        "| setting | photo | LR input | bicubic PSNR / SSIM | model PSNR / SSIM | Δ PSNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for setting in ("clean", "degraded"):
        selected = [row for row in rows if row["setting"] == setting]
        for row in selected:
            (bicubic_psnr, bicubic_ssim), (model_psnr, model_ssim) = row["bicubic"], row["model"]
            lines.append(f"| {setting} | {row['photo']} | {row['input']} | {bicubic_psnr:.2f} / {bicubic_ssim:.4f} "
                         f"| {model_psnr:.2f} / {model_ssim:.4f} | {model_psnr - bicubic_psnr:+.2f} |")
        lines.append(f"| {setting} | **mean** | | {mean_of(selected, 'bicubic', 0):.2f} / {mean_of(selected, 'bicubic', 1):.4f} "
                     f"| {mean_of(selected, 'model', 0):.2f} / {mean_of(selected, 'model', 1):.4f} "
                     f"| **{gain(selected):+.2f}** |")
    return lines + [""]


def report(results: Dict[int, Tuple[List[Dict], Dict[str, str]]]) -> str:
    any_metadata = next(iter(results.values()))[1]
    training = ", ".join(
        f"×{scale} {int(meta.get('train_seconds', 0)) / 60:.1f} min ({meta.get('iterations', '?')} steps)"
        for scale, (_, meta) in results.items()
    )
    lines = [
        "# The bundled default SR nets against bicubic",
        "",
        f"Produced by `{COMMAND}` on {date.today().isoformat()}: held-out photos {', '.join(HELD_OUT_PHOTOS)} "
        "(scikit-image; never trained on), PSNR on RGB [0, 255] with a border of s pixels cropped, SSIM from "
        "`skimage.metrics.structural_similarity(channel_axis=-1, data_range=255)`. Clean LR: antialiased "
        "bicubic downscaling; degraded LR: `tools/degradations.py` with every stage on, "
        f"{DRAWS} seeded draws per photo. Outputs "
        "rounded to 8 bits; the net runs in float32 on the CPU through `flashstep.ops`.",
        "",
        f"- Evaluation machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs)",
        f"- Training (`python tools/train_default.py`, {any_metadata.get('train_date', '?')}): {training}, "
        f"on {any_metadata.get('train_cpu', '?')}",
        "",
    ]
    lines += [summary(results[4][0]), ""] if 4 in results else []
    for scale, (rows, metadata) in results.items():
        lines += table(scale, rows, metadata)
    return "\n".join(lines)


def summary(rows_x4: List[Dict]) -> str:
    """The ×4 gains over bicubic, clean and degraded, against the +1 dB requirement on degraded inputs."""
    degraded = [row for row in rows_x4 if row["setting"] == "degraded"]
    clean = [row for row in rows_x4 if row["setting"] == "clean"]
    per_photo = ", ".join(
        f"{name} {gain([row for row in degraded if row['photo'].startswith(name + ' ')]):+.2f}"
        for name in HELD_OUT_PHOTOS
    )
    verdict = "met" if gain(degraded) >= 1.0 else "NOT met"
    return (f"**×4, degraded: {gain(degraded):+.2f} dB over bicubic** (per photo: {per_photo}); requirement "
            f"≥ +1 dB: {verdict}. ×4, clean: {gain(clean):+.2f} dB.")


def write_example(path: pathlib.Path) -> None:
    """The README's example input: astronaut (held out), 512² -> 128² by the evaluation degradation at ×4."""
    lr = degrade(load_photo("astronaut"), 4, torch.Generator().manual_seed(EVAL_SEED), EVALUATION)  # (3, 128, 128)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(lr)).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=pathlib.Path, default=REPORT, help="where the markdown report goes")
    parser.add_argument("--example", type=pathlib.Path, help="also write the README's example input photo here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.example is not None:
        write_example(args.example)
    results = {scale: evaluate(scale) for scale in SCALES}
    text = report(results)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(summary(results[4][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
