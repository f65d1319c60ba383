"""Pipeline benchmarks on random weights: ``flashstep bench --pipeline NAME --size N``.

A *case* is one pipeline at one output size: the models in their full configuration (or ``reduced``,
a fifth of the width) with seeded random weights, the input (a random low-resolution image, or noise and
a prompt embedding), and flashstep's pipeline built on those models. ``--size`` is the output side in
pixels for every pipeline (OSEDiff and S3Diff ×4 from size/4, SD-Turbo size², RRDBNet ×4 from size/4).

Each *variant* (flashstep, and the peers of ``benchmarks/peers.py``: the same math in diffusers + peft
eager, and ``torch.compile`` of it) is called once to warm up, then ``repeats`` times; the table gives the
median wall time, the CPU time, and the memory each call needs at its peak:

* CPU: the resident set size (RSS of this process, sampled every ms) during the call minus the RSS just
  before it, after freed heap pages were handed back (``malloc_trim``);
* GPU: ``torch.cuda.max_memory_allocated`` during the call minus the allocation before it.

Weights are built once per case and shared by the variants (except OSEDiff's merged copy, see
:func:`build_case`), so the memory column is what a call adds on top of its resident weights; what a
variant keeps between calls (caches, its own weight copies) is the ``held`` column: RSS (or CUDA
allocation) after its warm-up minus before it was built. Each variant's output is compared with the
first peer's (diffusers + peft as the papers' code runs it): ``rel. error`` = ‖out − ref‖ / ‖ref‖.

The peers come from the source checkout's ``benchmarks/peers.py`` and need diffusers and peft; without
them the table has flashstep's row only and says why.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .runner.memory import release_heap
from .testing import OSEDIFF_UNET_PATTERNS, OSEDIFF_VAE_PATTERNS, randomize_

PIPELINES = ("osediff", "s3diff", "sd-turbo", "rrdbnet")
CONFIGS = ("full", "reduced")
SCALE = 4  # the SR pipelines' upscale factor
LATENT_FACTOR = 8
PROMPT_TOKENS = 77

# peft's default lora_alpha is 8 and neither paper sets it: scale = 8 / r.
LORA_ALPHA = 8.0
OSEDIFF_RANK = 4
S3DIFF_UNET_RANK, S3DIFF_VAE_RANK = 32, 16
# S3Diff's peft target list (suffix match) and VAE regex (pipelines.md §2.3); OSEDiff's patterns are in
# flashstep.testing.
S3DIFF_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                       "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")
S3DIFF_VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"

MEMORY_SAMPLE_SECONDS = 0.001


# -- models with random weights ------------------------------------------------------------------------
def unet_config(config: str):
    from .models.configs import UNetConfig

    if config == "full":
        return UNetConfig.sd21()
    return UNetConfig(block_out_channels=(64, 128, 256, 256), attention_head_dim=(1, 2, 4, 4), cross_attention_dim=1024,
                      use_linear_projection=True, sample_size=64)


def vae_config(config: str):
    from .models.configs import VAEConfig

    full = VAEConfig.sd()
    if config == "full":
        return full
    return VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2, down_block_types=full.down_block_types,
                     up_block_types=full.up_block_types, scaling_factor=full.scaling_factor, force_upcast=False)


def rrdb_config(config: str):
    from .models.rrdbnet import PRESETS

    return PRESETS["RealESRGAN_x4plus" if config == "full" else "RealESRGAN_x4plus_anime_6B"]



def random_model(factory: Callable[[], torch.nn.Module], device: torch.device, seed: int) -> torch.nn.Module:
    """``factory()`` built on the meta device, materialised on ``device`` and randomized (no init pass)."""
    with torch.device("meta"):
        model = factory()
    return randomize_(model.to_empty(device=device), seed).eval().requires_grad_(False)


def random_lora(model: torch.nn.Module, paths: List[str], rank: int, seed: int):
    """A :class:`~flashstep.models.layers.LoRASpec` over ``paths``: A ~ N(0, 1/fan_in), B ~ N(0, 0.01²), scale
    8/r, so that scale·B·A is a few percent of W."""
    from .models.layers import LoRASpec, LoRAWeights

    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    spec = {}
    for path in paths:
        weight = modules[path].weight
        fan_in = weight[0].numel()
        down = torch.randn((rank,) + tuple(weight.shape[1:]), generator=generator) * fan_in**-0.5
        up = torch.randn(weight.shape[0], rank, generator=generator) * 0.01
        spec[path] = LoRAWeights(down.to(weight.device), up.to(weight.device), LORA_ALPHA / rank)
    return LoRASpec(spec)


def osediff_lora_paths(unet: torch.nn.Module, vae: torch.nn.Module) -> Tuple[List[str], List[str]]:
    """The module paths OSEDiff's training code wraps in LoRA (258 in the SD 2.1 UNet, 32 in the VAE)."""
    def select(model, keep):
        paths = []
        for name, _ in model.named_parameters():
            if "bias" in name or "norm" in name or not name.endswith(".weight"):
                continue
            path = name[: -len(".weight")]
            if keep(name) and path not in paths:
                paths.append(path)
        return paths

    unet_paths = select(unet, lambda name: any(p in name for p in OSEDIFF_UNET_PATTERNS))
    vae_paths = select(vae, lambda name: (("encoder" in name and any(p in name for p in OSEDIFF_VAE_PATTERNS))
                                          or ("quant_conv" in name and "post_quant_conv" not in name)))
    return unet_paths, vae_paths


def s3diff_lora_paths(unet: torch.nn.Module, vae: torch.nn.Module) -> Tuple[List[str], List[str]]:
    """S3Diff's peft targets: suffix matches in the UNet (257 modules), the encoder regex in the VAE (31)."""
    from .models.layers import LoRAHost

    unet_paths = [name for name, module in unet.named_modules() if isinstance(module, LoRAHost)
                  and any(name == t or name.endswith("." + t) for t in S3DIFF_UNET_TARGETS)]
    vae_paths = [name for name, module in vae.named_modules() if isinstance(module, LoRAHost)
                 and re.fullmatch(S3DIFF_VAE_TARGETS, name)]
    return unet_paths, vae_paths


# -- cases ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One pipeline at one size, with what its variants share.

    ``inputs``: ``lq`` (B, 3, size/4, size/4) in [0, 1] (SR) or ``noise`` (B, 4, size/8, size/8) (SD-Turbo),
    ``context`` (B, 77, 1024) and, for S3Diff, ``negative_context``. ``models``: our models by role
    (``unet``, ``vae``, ``de_net``, ``modulation``, ``net``); ``base_state``: the weights before any LoRA
    was merged, by role, with diffusers / BasicSR key names; ``lora``: the LoRA specs by role.
    """

    pipeline: str
    size: int
    config: str
    device: torch.device
    dtype: torch.dtype
    ours: Any
    inputs: Dict[str, torch.Tensor]
    models: Dict[str, torch.nn.Module] = field(default_factory=dict)
    base_state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    lora: Dict[str, Any] = field(default_factory=dict)
    max_memory: Optional[str] = None

    @property
    def input_size(self) -> int:
        return self.size if self.pipeline == "sd-turbo" else self.size // SCALE

    def describe(self) -> str:
        shape = f"{self.size}² output" + ("" if self.pipeline == "sd-turbo" else f" (×{SCALE} from {self.input_size}²)")
        budget = f", max_memory {self.max_memory}" if self.max_memory else ""
        return f"{self.pipeline}, {shape}, {self.config} config, {str(self.dtype).replace('torch.', '')}{budget}"

    def run_ours(self) -> torch.Tensor:
        """flashstep's public call; the image (B, 3, H, W) in [0, 1] on the CPU."""
        if self.pipeline == "sd-turbo":
            images = self.ours(prompt=[""] * self.inputs["noise"].shape[0], prompt_embeds=self.inputs["context"],
                               height=self.size, width=self.size, seed=0, output_type="torch")
            return torch.stack(images).float().cpu()
        if self.pipeline == "osediff":
            return self.ours(self.inputs["lq"], prompt_embeds=self.inputs["context"], output_type="torch")
        return self.ours(self.inputs["lq"], output_type="torch")


def _check_size(pipeline: str, size: int) -> None:
    multiple = 64 if pipeline == "sd-turbo" else SCALE * 16
    if size < multiple or size % multiple:
        raise ValueError(f"--size {size}: {pipeline} takes output sides that are multiples of {multiple} (>= {multiple})")


def build_case(pipeline: str, size: int, *, config: str = "full", device: Any = None, dtype: Any = None,
               max_memory: Optional[str] = None, batch: int = 1, seed: int = 0) -> Case:
    """The case for ``pipeline`` at output side ``size`` (see :class:`Case`).

    OSEDiff merges its LoRA into our UNet and VAE at load, as :class:`~flashstep.loaders.OSEDiffAdapter`
    does; ``base_state`` then keeps the unmerged weights for the peers, a second copy of the LoRA'd weights.
    """
    from .pipelines.base import parse_device, parse_dtype

    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; valid: {', '.join(PIPELINES)}")
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
    _check_size(pipeline, size)
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    options = dict(device=device, dtype=dtype, max_memory=max_memory)
    generator = torch.Generator().manual_seed(seed)
    inputs: Dict[str, torch.Tensor] = {}
    if pipeline != "sd-turbo":
        side = size // SCALE
        inputs["lq"] = torch.rand(batch, 3, side, side, generator=generator)
    if pipeline == "rrdbnet":
        return _rrdbnet_case(size, config, device, dtype, options, inputs, seed)
    inputs["context"] = torch.randn(batch, PROMPT_TOKENS, 1024, generator=generator).to(device, dtype)
    if pipeline == "sd-turbo":
        inputs["noise"] = torch.zeros(batch, 4, size // LATENT_FACTOR, size // LATENT_FACTOR)
    builders = {"osediff": _osediff_case, "s3diff": _s3diff_case, "sd-turbo": _sd_turbo_case}
    case = builders[pipeline](size, config, device, dtype, options, inputs, seed)
    case.max_memory = max_memory
    return case


def _sd_models(config: str, device: torch.device, seed: int):
    from .models.unet import UNet2DCondition
    from .models.vae import AutoencoderKL

    unet = random_model(lambda: UNet2DCondition(unet_config(config)), device, seed + 1)
    vae = random_model(lambda: AutoencoderKL(vae_config(config)), device, seed + 2)
    return unet, vae


def _osediff_case(size, config, device, dtype, options, inputs, seed) -> Case:
    from .loaders.adapters_pkl import OSEDiffAdapter
    from .models.unet import UNet2DCondition
    from .models.vae import AutoencoderKL
    from .pipelines.osediff import OSEDiffPipeline

    base_unet, base_vae = _sd_models(config, device, seed)
    unet_paths, vae_paths = osediff_lora_paths(base_unet, base_vae)
    generator = torch.Generator().manual_seed(seed + 5)
    conv_in = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator).to(tensor) for name, tensor in
               (("conv_in.weight", base_unet.conv_in.weight), ("conv_in.bias", base_unet.conv_in.bias))}
    adapter = OSEDiffAdapter(unet_lora=random_lora(base_unet, unet_paths, OSEDIFF_RANK, seed + 3),
                             vae_lora=random_lora(base_vae, vae_paths, OSEDIFF_RANK, seed + 4),
                             unet_weights=conv_in, rank_unet=OSEDIFF_RANK, rank_vae=OSEDIFF_RANK)
    unet = _copy_of(base_unet, lambda: UNet2DCondition(base_unet.config))
    vae = _copy_of(base_vae, lambda: AutoencoderKL(base_vae.config))
    adapter.apply(unet=unet, vae=vae)
    pipe = OSEDiffPipeline(unet, vae, **options)
    return Case("osediff", size, config, device, dtype, pipe, inputs, models={"unet": pipe.unet, "vae": pipe.vae},
                base_state={"unet": base_unet.state_dict(), "vae": base_vae.state_dict()},
                lora={"unet": adapter.unet_lora, "vae": adapter.vae_lora, "unet_weights": conv_in})


def _s3diff_case(size, config, device, dtype, options, inputs, seed) -> Case:
    from .models.de_net import DEResNet
    from .models.layers import apply_lora
    from .models.s3diff_modulation import S3DiffModulation
    from .pipelines.s3diff import S3DiffPipeline
    from .runner import Stage

    unet, vae = _sd_models(config, device, seed)
    base_state = {"unet": dict(unet.state_dict()), "vae": dict(vae.state_dict())}
    unet_paths, vae_paths = s3diff_lora_paths(unet, vae)
    unet_lora = random_lora(unet, unet_paths, S3DIFF_UNET_RANK, seed + 3)
    vae_lora = random_lora(vae, vae_paths, S3DIFF_VAE_RANK, seed + 4)
    apply_lora(unet, unet_lora, merge=False)
    apply_lora(vae, vae_lora, merge=False)
    de_net = random_model(DEResNet, device, seed + 5)
    modulation = random_model(lambda: S3DiffModulation(S3DIFF_UNET_RANK, S3DIFF_VAE_RANK), device, seed + 6)
    with torch.no_grad():
        modulation.w.normal_(0.0, 1.0, generator=torch.Generator(device=device).manual_seed(seed + 7))
    generator = torch.Generator().manual_seed(seed + 8)
    inputs["negative_context"] = torch.randn(inputs["context"].shape, generator=generator).to(device, dtype)
    pipe = S3DiffPipeline(unet, vae, None, None, de_net, modulation, **options)
    # NOTE: the pipeline takes precomputed embeddings for its positive prompt only; the graph's prompt stage
    # is replaced so that both come from the case, as prompt_embeds does for OSEDiff and SD-Turbo.
    pipe.graph.replace("prompt", Stage("prompt", lambda prompts: (inputs["context"], inputs["negative_context"]),
                                       ("prompts",), ("context", "negative_context")))
    return Case("s3diff", size, config, device, dtype, pipe, inputs,
                models={"unet": pipe.unet, "vae": pipe.vae, "de_net": pipe.de_net, "modulation": pipe.modulation},
                base_state=base_state, lora={"unet": unet_lora, "vae": vae_lora})


def _sd_turbo_case(size, config, device, dtype, options, inputs, seed) -> Case:
    from .pipelines.turbo import SDTurboPipeline

    unet, vae = _sd_models(config, device, seed)
    pipe = SDTurboPipeline(unet, vae, None, None, **options)
    inputs["noise"] = pipe.noise(inputs["noise"].shape[0], size, size, seed=0)
    return Case("sd-turbo", size, config, device, dtype, pipe, inputs, models={"unet": pipe.unet, "vae": pipe.vae},
                base_state={"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()})


def _rrdbnet_case(size, config, device, dtype, options, inputs, seed) -> Case:
    from .models.rrdbnet import RRDBNet
    from .pipelines.pixel_sr import PixelSRPipeline

    net = random_model(lambda: RRDBNet(rrdb_config(config)), device, seed + 1)
    # NOTE: U(±√(3/fan_in)) keeps each conv's output variance, but 23 RRDBs of residual sums would still grow the
    # features; the released nets' outputs stay near [0, 1], and so do these with the convs scaled by 0.2.
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith("body.") and param.dim() == 4:
                param.mul_(0.2)
    pipe = PixelSRPipeline(net, **options)
    case = Case("rrdbnet", size, config, device, dtype, pipe, inputs, models={"net": pipe.model},
                base_state={"net": pipe.model.state_dict()})
    case.max_memory = options.get("max_memory")
    return case


def _copy_of(model: torch.nn.Module, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        copy = factory()
    copy.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return copy.eval().requires_grad_(False)


# -- measuring -----------------------------------------------------------------------------------------
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where that does not exist)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that RSS tracks live memory."""
    gc.collect()
    release_heap()


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` is the most the block added on top of
    what was allocated (GPU) or resident (CPU) when it began."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = resident_bytes()
        self.highest = self.start
        self.stop = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(MEMORY_SAMPLE_SECONDS):
            self.highest = max(self.highest, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self.stop.set()
        self.sampler.join()
        self.highest = max(self.highest, resident_bytes())
        self.bytes = self.highest - self.start


def held_bytes(device: torch.device) -> int:
    """What is resident (CPU) or allocated (GPU) now, after freeing what can be freed."""
    release_free_memory()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return resident_bytes()


@dataclass
class Measurement:
    """One variant's numbers: seconds per call (median and every run), CPU seconds per call (median, all
    threads), peak memory of a call and memory held between calls (bytes), the warm-up call's seconds."""

    name: str
    median_s: float
    runs_s: List[float]
    cpu_s: float
    peak_bytes: int
    held_bytes: int
    first_call_s: float
    relative_error: Optional[float] = None
    note: str = ""


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64."""
    out, reference = out.detach().cpu().double(), reference.detach().cpu().double()
    if out.shape != reference.shape:
        raise AssertionError(f"output shape {tuple(out.shape)} != reference {tuple(reference.shape)}")
    return ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _run_timed(call: Callable[[], Any], device: torch.device, record: Dict[str, Any]) -> None:
    """One timed call: appends its wall and CPU seconds and peak bytes to ``record`` and keeps its output."""
    record["out"] = None
    with PeakMemory(device) as memory:
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        record["out"] = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["wall"].append(time.perf_counter() - wall_start)
        record["cpu"].append(time.process_time() - cpu_start)
    record["peak"] = max(record["peak"], memory.bytes)


def simple_loop(fn: Callable[[], None], rounds: int) -> None:
    for _ in range(rounds):
        fn()


def measure(name: str, call: Callable[[], torch.Tensor], repeats: int, device: torch.device, held_before: int,
            reference: Optional[torch.Tensor] = None, note: str = "",
            loop: Callable[[Callable[[], None], int], None] = simple_loop) -> Tuple[Measurement, torch.Tensor]:
    """One warm-up call, then ``repeats`` timed calls driven by ``loop(fn, rounds)`` (pytest-benchmark's
    ``pedantic`` in the benchmark files); returns the measurement and the last call's output."""
    device = torch.device(device)
    record: Dict[str, Any] = {"wall": [], "cpu": [], "peak": 0, "out": None}
    with torch.inference_mode():
        started = time.perf_counter()
        call()
        first = time.perf_counter() - started
        loop(lambda: _run_timed(call, device, record), repeats)
    out = record.pop("out")
    held = held_bytes(device) - held_before
    error = None if reference is None else relative_error(out, reference)
    return Measurement(name, statistics.median(record["wall"]), record["wall"], statistics.median(record["cpu"]),
                       record["peak"], held, first, error, note), out


# -- the table -----------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


def checkout_commit() -> str:
    """The source checkout's commit (+dirty), or "unknown" outside one."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def format_table(case: Case, rows: List[Measurement], header: Dict[str, str]) -> str:
    ours = next((row for row in rows if row.name == "flashstep"), None)
    lines = [f"flashstep bench: {case.describe()}"]
    lines += [f"  {key}: {value}" for key, value in header.items()]
    lines.append("  time: median of the timed calls after one warm-up; × = the variant's time / flashstep's "
                 "(above 1: flashstep is faster); peak: memory a call adds at its peak; held: kept between calls")
    columns = f"  {'variant':<38}{'median s':>10}{'cpu s':>9}{'×':>8}{'peak MB':>10}{'×':>8}{'held MB':>10}{'rel. error':>12}{'warm-up s':>11}"
    lines += ["", columns]
    for row in rows:
        speed = f"{row.median_s / ours.median_s:.2f}" if ours and ours.median_s > 0 else "-"
        memory = f"{row.peak_bytes / ours.peak_bytes:.2f}" if ours and ours.peak_bytes > 0 else "-"
        error = f"{row.relative_error:.1e}" if row.relative_error is not None else "-"
        lines.append(f"  {row.name:<38}{row.median_s:>10.3f}{row.cpu_s:>9.2f}{speed:>8}{_mb(row.peak_bytes):>10}"
                     f"{memory:>8}{_mb(row.held_bytes):>10}{error:>12}{row.first_call_s:>11.2f}")
        if row.note:
            lines.append(f"      {row.note}")
    return "\n".join(lines)


# -- peers ---------------------------------------------------------------------------------------------
def load_peers():
    """``benchmarks/peers.py`` of the source checkout, or None and the reason."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "peers.py").exists():
        return None, "no benchmarks/peers.py beside this installation (peers run from a source checkout)"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("peers"), ""
    except ImportError as error:
        return None, f"the peers need diffusers and peft: {error}"


# -- running -------------------------------------------------------------------------------------------
OURS = "flashstep"


class CaseRunner:
    """The variants of one case: flashstep's pipeline and the peers, measured one at a time.

    The first peer measured (the paper's form) gives the reference output the later ones are compared with.
    A peer's models are built just before it runs and freed after, so that only one peer is resident at a time.
    """

    def __init__(self, case: Case, peers: bool = True, compile_peers: bool = True):
        self.case = case
        self.variants: Dict[str, Any] = {}
        self.skipped: Dict[str, str] = {}
        self.peers_missing = ""
        if peers:
            module, reason = load_peers()
            if module is None:
                self.peers_missing = reason
            else:
                for variant in module.variants(case, compile_peers=compile_peers):
                    if variant.skip:
                        self.skipped[variant.name] = variant.skip
                    else:
                        self.variants[variant.name] = variant
        self.reference: Optional[torch.Tensor] = None

    @property
    def names(self) -> List[str]:
        return list(self.variants) + [OURS]

    def skip_reason(self, name: str) -> Optional[str]:
        if name == OURS or name in self.variants:
            return None
        return self.skipped.get(name) or self.peers_missing or f"no variant {name!r} for {self.case.pipeline}"

    def _call(self, name: str) -> Tuple[Callable[[], torch.Tensor], Callable[[], None], str]:
        if name == OURS:
            return self.case.run_ours, lambda: None, ""
        variant = self.variants[name]
        variant.build()
        return variant.call, variant.release, variant.note

    def _keep_reference(self, name: str, out: torch.Tensor) -> None:
        if self.reference is None and name != OURS:
            self.reference = out

    def measure(self, name: str, repeats: int, loop=simple_loop) -> Measurement:
        held_before = held_bytes(self.case.device)
        call, release, note = self._call(name)
        try:
            row, out = measure(name, call, repeats, self.case.device, held_before, self.reference, note, loop)
        finally:
            release()
        self._keep_reference(name, out)
        return row

    def run_once(self, name: str) -> Optional[float]:
        """One call (no timing); its relative error against the reference, or None when it is the reference."""
        call, release, _ = self._call(name)
        try:
            with torch.inference_mode():
                out = call()
        finally:
            release()
        error = None if self.reference is None else relative_error(out, self.reference)
        self._keep_reference(name, out)
        return error


@dataclass
class Result:
    case: str
    header: Dict[str, str]
    rows: List[Measurement]
    skipped: List[str]

    def as_dict(self) -> Dict[str, Any]:
        return {"case": self.case, "header": self.header, "rows": [asdict(row) for row in self.rows],
                "skipped": self.skipped}


def run(pipeline: str, size: int, *, config: str = "full", device: Any = None, dtype: Any = None,
        max_memory: Optional[str] = None, repeats: int = 3, peers: bool = True, compile_peers: bool = True,
        stream=None) -> Result:
    """Build the case, measure the peers and flashstep, print the table (flashstep first); returns the result."""
    from .pipelines.base import parse_device

    before_case = held_bytes(parse_device(device))
    case = build_case(pipeline, size, config=config, device=device, dtype=dtype, max_memory=max_memory)
    header = {"machine": machine_description(case.device), "commit": checkout_commit(), "torch": torch.__version__,
              "load average before": load_average(),
              "weights": f"{_mb(held_bytes(case.device) - before_case)} MB resident after building the case"}
    runner = CaseRunner(case, peers=peers, compile_peers=compile_peers)
    rows = [runner.measure(name, repeats) for name in runner.names]
    rows.insert(0, rows.pop())
    header["load average after"] = load_average()
    skipped = [f"{name}: {reason}" for name, reason in runner.skipped.items()]
    if runner.peers_missing:
        skipped.append(f"peers: {runner.peers_missing}")
    result = Result(case.describe(), header, rows, skipped)
    stream = stream if stream is not None else sys.stdout
    print(format_table(case, rows, header), file=stream)
    for line in skipped:
        print(f"  skipped {line}", file=stream)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, choices=PIPELINES)
    parser.add_argument("--size", type=int, required=True, help="output side in pixels (SR: ×4 from size/4)")
    parser.add_argument("--config", choices=CONFIGS, default="full",
                        help="full: the released architectures; reduced: a fifth of the width (default full)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--max-memory", dest="max_memory", help="flashstep's memory budget, e.g. 2GB (default: from free memory)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="flashstep's row only")
    parser.add_argument("--no-compile", dest="compile_peers", action="store_false",
                        help="leave out the torch.compile peers (their compilation takes minutes on a CPU)")
    parser.add_argument("--json", help="also write the table as JSON to this file")


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: give at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args.pipeline, args.size, config=args.config, device=args.device, dtype=args.dtype,
                 max_memory=args.max_memory, repeats=args.repeats, peers=args.peers, compile_peers=args.compile_peers)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.as_dict(), handle, indent=1)
    return 0
