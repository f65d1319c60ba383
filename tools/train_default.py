"""Train the bundled default SR nets, ×4 and ×2, on the CPU: SRVGGNetCompact on scikit-image's photos.

    python tools/train_default.py      # writes python/flashstep/data/default_sr_x4.safetensors and _x2

Architecture: Real-ESRGAN's compact net (:mod:`flashstep.models.srvgg`), num_feat 32, num_conv 8
(receptive field 19 LR pixels, 90 k parameters at ×4, 350 kB in float32). Every conv runs at the LR
resolution, so a step costs about (27 + 9·F·num_conv + 27·s²)·F·6 FLOP per LR pixel (forward and
backward, F = num_feat). Measured on the two shared cores (one step of 4 × 64² LR pixels at ×4,
forward + backward + Adam, load average ~50): 24 × 6: 0.27 s, 32 × 8: 0.40 s, 40 × 8: 0.89 s,
48 × 10: 1.49 s (oneDNN loses efficiency past 32 channels here). 48 × 10 would get ~1000 steps per
scale in the budget (both scales within an hour), too few to converge. In 1200–2400-step pilots,
32 × 12 and 32 × 8 with twice the steps at half the batch gained the same over bicubic on the degraded
held-out photos as 32 × 8 (+0.56 dB), so depth was not what limited the net; the data was. Without the
motorcycle photos (5 colour photos, half of the patches), ×4 gained +0.85 dB at 4000 steps and +0.78 dB
at 12000 (more steps fitted the few training photos closer, not the held-out ones); with them at 60 % of
the patches, +0.96 dB at 6000 steps; at 75 % and 9000 steps (the bundled net, 26 min here), +1.02 dB.

Data: the photos that ship with scikit-image (no download), greyscale ones repeated to 3 channels,
minus the held-out evaluation photos (astronaut, coffee, chelsea = cat). 75 % of the patches come from
the 7 colour photos (the two views of the stereo motorcycle among them; channels randomly permuted), 25 %
from the 10 greyscale ones. Each HR patch is a
random crop, in half of the samples of a region up to 1/0.7 ≈ 1.4× larger shrunk to the patch size
(antialiased bicubic: more scale variety), redrawn when nearly flat, then one of the 8
flips/rotations. The LR input comes from :mod:`degradations` (blur, random-kernel downscale, noise,
JPEG; 40 % clean bicubic). LR patches are 64 pixels wide: with a 19-pixel receptive field, half of
the pixels of a 64² patch see no zero padding, against a fifth of a 32² one.

Loss: L1 on the HR patch. Adam (β = 0.9, 0.99), a linear warm-up over WARMUP steps then cosine decay
from LEARNING_RATE to 1 % of it. The net starts as bilinear upsampling (:func:`start_from_bilinear`)
rather than as its nearest-upsampling residual plus noise.

Reproducible: one seed for the weights and one ``torch.Generator`` for every data draw (a single
process, a fixed order), two threads. The seed and the training set-up are written into the files'
safetensors metadata, with the training time and the CPU.
"""
from __future__ import annotations

import os

# NOTE: libgomp reads this when torch loads it. With its default (spinning) wait policy, two threads on
# two cores shared with other jobs ran a training step 5× slower than one thread (1.9 s against 0.35 s,
# load average ~80); passive waiting brings two threads back to 0.3 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import pathlib
import platform
import sys
import time
from datetime import date
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from degradations import TRAINING, degrade

from flashstep.models.srvgg import SRVGGConfig, SRVGGNetCompact

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT_DIR = REPO_ROOT / "python" / "flashstep" / "data"

HELD_OUT_PHOTOS = ("astronaut", "coffee", "chelsea")
TRAIN_PHOTOS = (
    "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel",
    "camera", "moon", "coins", "page", "text", "brick", "grass", "gravel", "cell", "clock",
    "motorcycle_left", "motorcycle_right",
)

SEED = 20251126
NUM_FEAT = 32
NUM_CONV = 8
SCALES = (4, 2)
ITERATIONS = {4: 9000, 2: 3000}
BATCH_SIZE = 4
LR_PATCH = 64  # LR side of a training patch; the HR patch is LR_PATCH·s
LEARNING_RATE = 2e-3
WARMUP = 50
LOG_EVERY = 100
COLOUR_PROB = 0.75  # fraction of patches from the colour photos (7 of the 17)
ZOOM_PROB = 0.5  # fraction of HR patches cut from a larger region and shrunk
MIN_PATCH_STD = 0.03  # a crop flatter than this (std of [0, 1] values) is redrawn, up to 8 times


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image photo as (3, H, W) float32 in [0, 1] (greyscale repeated to 3 channels, alpha dropped)."""
    import skimage.data

    if name.startswith("motorcycle_"):  # the two views of skimage.data.stereo_motorcycle()
        array = skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1]
    else:
        array = np.asarray(getattr(skimage.data, name)())
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255


class PatchSampler:
    """Deterministic stream of (LR, HR) batches: LR (B, 3, p, p), HR (B, 3, p·s, p·s)."""

    def __init__(self, photos: Sequence[torch.Tensor], scale: int, generator: torch.Generator):
        self.colour = [photo for photo in photos if not torch.equal(photo[0], photo[1]) or not torch.equal(photo[0], photo[2])]
        self.grey = [photo for photo in photos if all(photo is not other for other in self.colour)]
        self.scale = scale
        self.hr_patch = LR_PATCH * scale
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _crop(self) -> torch.Tensor:
        group = self.colour if self._uniform(0, 1) < COLOUR_PROB else self.grey
        photo = group[self._randint(len(group))]
        zoom = self._uniform(0.7, 1.0) if self._uniform(0, 1) < ZOOM_PROB else 1.0
        height, width = photo.shape[-2:]
        side = min(round(self.hr_patch / zoom), height, width)
        top, left = self._randint(height - side + 1), self._randint(width - side + 1)
        crop = photo[:, top : top + side, left : left + side]  # (3, side, side)
        if side == self.hr_patch:
            return crop
        size = (self.hr_patch, self.hr_patch)
        return F.interpolate(crop[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)

    def hr_sample(self) -> torch.Tensor:
        """One HR patch (3, P, P): a crop that is not flat, under a random flip/rotation."""
        for _ in range(8):
            crop = self._crop()
            if float(crop.std()) >= MIN_PATCH_STD:
                break
        crop = torch.rot90(crop, self._randint(4), dims=(1, 2))
        if self._randint(2):
            crop = crop.flip(-1)
        return crop[torch.randperm(3, generator=self.generator)].contiguous()

    def batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        hr = torch.stack([self.hr_sample() for _ in range(BATCH_SIZE)])  # (B, 3, P, P)
        lr = torch.stack([degrade(patch, self.scale, self.generator, TRAINING) for patch in hr])  # (B, 3, p, p)
        return lr, hr


def learning_rate(step: int, iterations: int) -> float:
    """Linear warm-up to LEARNING_RATE, then cosine decay to LEARNING_RATE / 100 at the last step."""
    if step < WARMUP:
        return LEARNING_RATE * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, iterations - WARMUP - 1)
    floor = LEARNING_RATE / 100
    return floor + 0.5 * (LEARNING_RATE - floor) * (1 + math.cos(math.pi * progress))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def linear_taps(offset: float) -> torch.Tensor:
    """Weights on LR pixels (-1, 0, +1) that linearly interpolate at ``offset`` ∈ (-½, ½) from pixel 0."""
    if offset < 0:
        return torch.tensor([-offset, 1 + offset, 0.0])
    return torch.tensor([0.0, 1 - offset, offset])


@torch.no_grad()
def start_from_bilinear(model: SRVGGNetCompact) -> None:
    """Make the freshly initialised net compute bilinear upsampling (up to the zero-padded border).

    Channels 0…C-1 of every body conv copy the input (centre tap 1, PReLU slope 1); the last conv reads
    them with the taps of bilinear interpolation minus the nearest pixel that the residual adds back:
    HR pixel (h·s + i) lies at LR offset (2i + 1 - s) / 2s from pixel h. Its weights from the other
    channels start at a tenth of their random values.
    """
    channels, scale = model.config.in_channels, model.config.scale
    convs, prelus, last = model.body[0:-1:2], model.body[1:-1:2], model.body[-1]
    for conv, prelu in zip(convs, prelus):
        conv.weight[:channels] = 0
        conv.bias[:channels] = 0
        conv.weight[range(channels), range(channels), 1, 1] = 1
        prelu.weight[:channels] = 1
    last.weight.mul_(0.1)
    last.bias.zero_()
    # last.weight: (C·s², F, 3, 3); output channel c·s² + i·s + j is sub-pixel (i, j) of colour c
    taps = [linear_taps((2 * i + 1 - scale) / (2 * scale)) for i in range(scale)]
    for c in range(channels):
        last.weight[c * scale**2 : (c + 1) * scale**2, :channels] = 0
        for i in range(scale):
            for j in range(scale):
                kernel = torch.outer(taps[i], taps[j])
                kernel[1, 1] -= 1
                last.weight[c * scale**2 + i * scale + j, c] = kernel


def train(scale: int, iterations: int, photos: List[torch.Tensor]) -> Tuple[SRVGGNetCompact, float]:
    """Train one net; returns it and the wall time in seconds."""
    torch.manual_seed(SEED + scale)
    model = SRVGGNetCompact(SRVGGConfig(in_channels=3, num_feat=NUM_FEAT, num_conv=NUM_CONV, scale=scale))
    start_from_bilinear(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.99))
    sampler = PatchSampler(photos, scale, torch.Generator().manual_seed(SEED + scale))
    start = time.perf_counter()
    running = 0.0
    for step in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, iterations)
        lr_batch, hr_batch = sampler.batch()
        loss = F.l1_loss(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == iterations:
            count = (step % LOG_EVERY) + 1
            elapsed = time.perf_counter() - start
            print(f"x{scale} step {step + 1:5d}/{iterations}  L1 {running / count:.5f}  "
                  f"lr {learning_rate(step, iterations):.2e}  {elapsed:7.1f} s  ({elapsed / (step + 1):.2f} s/step)",
                  flush=True)
            running = 0.0
    return model.eval(), time.perf_counter() - start


def save(model: SRVGGNetCompact, iterations: int, seconds: float, path: pathlib.Path) -> None:
    config = model.config
    metadata: Dict[str, str] = {
        "arch": "srvgg",
        "in_channels": str(config.in_channels),
        "num_feat": str(config.num_feat),
        "num_conv": str(config.num_conv),
        "scale": str(config.scale),
        "trained_by": "tools/train_default.py",
        "seed": str(SEED + config.scale),
        "iterations": str(iterations),
        "batch_size": str(BATCH_SIZE),
        "lr_patch": str(LR_PATCH),
        "train_seconds": f"{seconds:.0f}",
        "train_cpu": f"{cpu_name()} ({torch.get_num_threads()} threads)",
        "train_date": date.today().isoformat(),
    }
    tensors = {key: value.detach().float().contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES), choices=SCALES)
    parser.add_argument("--iterations", type=int, help="steps per scale (default: the bundled nets' count)")
    parser.add_argument("--output-dir", type=pathlib.Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    photos = [load_photo(name) for name in TRAIN_PHOTOS]
    for scale in args.scales:
        iterations = args.iterations or ITERATIONS[scale]
        model, seconds = train(scale, iterations, photos)
        print(f"x{scale}: {iterations} steps in {seconds / 60:.1f} min", flush=True)
        save(model, iterations, seconds, args.output_dir / f"default_sr_x{scale}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
