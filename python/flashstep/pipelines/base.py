"""What every pipeline shares: the graph and its runner, options, image conversion, one call at a time.

A pipeline holds the math of its paper as a :class:`~flashstep.runner.Graph` of stages and nothing about
memory or devices; the :class:`~flashstep.runner.Runner` does tiling, precision, CUDA graphs and timing.

Thread safety: a pipeline object may be called from several threads; calls run one after another (a lock
per pipeline), since the models' weights, per-call LoRA mixing state and tile settings are shared. Option
checks and image conversion run outside the lock.

Faults: a stage whose fp16/bf16 output is not finite re-runs in float32 (the runner); an output still not
finite raises :class:`NonFiniteOutputError`; a GPU out-of-memory error re-runs a tiled stage with
smaller tiles (the tiler says so once).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from ..runner import Graph, MemoryBudget, Runner
from .images import ImageBatch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """A dtype from a name or torch.dtype; None picks fp16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; valid: fp32, fp16, bf16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: fp32, fp16, bf16") from None


def parse_device(device: Any) -> torch.device:
    """A device that exists here, or a ValueError that says which ones do."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA device is visible here; valid here: cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} does not exist; valid here: cpu, cuda, cuda:0..cuda:{count - 1}")
    elif parsed.type != "cpu":
        raise ValueError(f"device type {parsed.type!r} is not supported; valid: cpu, cuda, cuda:N")
    return parsed


class NonFiniteOutputError(RuntimeError):
    """A pipeline's output holds NaN/inf after the safe-precision re-run (broken weights)."""


@dataclass
class RunOptions:
    """Options of one call, validated."""

    seed: int = 0
    scale: Optional[float] = None
    tile: Optional[int] = None  # output-pixel tile side; None: from the memory budget; 0: never tile
    color_fix: Optional[str] = None


class Pipeline:
    """Base of all pipelines. Subclasses build ``self.graph`` and implement :meth:`_inputs`."""

    kind: str = "pipeline"
    output_name: str = "image"

    def __init__(self, device: Any = None, dtype: Any = None, max_memory: Any = None, progress: bool = False,
                 cuda_graphs: bool = True):
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.runner = Runner(self.device, memory=MemoryBudget.for_device(self.device, max_memory),
                             cuda_graphs=cuda_graphs, progress=progress)
        self.graph = Graph()
        self._lock = threading.Lock()

    def _run(self, values: Dict[str, Any]) -> torch.Tensor:
        return self.runner.run(self.graph, values, outputs=(self.output_name,))[self.output_name]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, device={self.device}, dtype={self.dtype})\n{self.graph}"


def group_by_size(images: Sequence[torch.Tensor]) -> List[List[int]]:
    """Indices of the images grouped by (H, W), so each group runs as one batch."""
    groups: Dict[tuple, List[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return list(groups.values())


class ImagePipeline(Pipeline):
    """A pipeline from images to images (SR): batches same-size images, returns what it was given."""

    def __call__(self, images: Any, prompt: Optional[Any] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 seed: int = 0, scale: Optional[float] = None, tile: Optional[int] = None,
                 output_type: Optional[str] = None, color_fix: Optional[str] = None) -> Any:
        options = RunOptions(seed=int(seed), scale=check_scale(scale), tile=check_tile(tile), color_fix=color_fix)
        batch = ImageBatch.from_user(images)
        outputs: List[Optional[torch.Tensor]] = [None] * len(batch.images)
        with self._lock:
            for indices in group_by_size(batch.images):
                lq = torch.stack([batch.images[i] for i in indices]).to(self.device)
                prompts = _select_prompts(prompt, indices, len(batch.images))
                embeds = None if prompt_embeds is None else _select_embeds(prompt_embeds, indices, len(batch.images))
                result = self.upscale_tensor(lq, prompts, embeds, options)
                if not bool(torch.isfinite(result).all()):
                    raise NonFiniteOutputError(
                        f"the {self.kind} pipeline's output holds NaN/inf values even in float32 (its safe "
                        "precision): the model's weights are likely not finite")
                for position, index in enumerate(indices):
                    outputs[index] = result[position].float().cpu()
        return batch.to_user(outputs, output_type)

    def upscale_tensor(self, lq: torch.Tensor, prompts: Optional[List[str]], prompt_embeds: Optional[torch.Tensor],
                       options: RunOptions) -> torch.Tensor:
        """lq (B, 3, h, w) in [0, 1] on the pipeline's device -> (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError


MAX_SCALE = 16.0
MIN_TILE = 64


def check_scale(scale: Any) -> Optional[float]:
    """The output scale as a float in (0, MAX_SCALE], None for the model's own; ValueError naming the valid values."""
    if scale is None:
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= MAX_SCALE:
        raise ValueError(f"scale={scale!r}: valid values are numbers in (0, {MAX_SCALE:g}], e.g. 2, 4 or 1.5")
    return value


def check_tile(tile: Any) -> Optional[int]:
    """The tile side in output pixels: 0 (never tile) or an integer of at least MIN_TILE; None picks it from
    the memory budget. ValueError naming the valid values."""
    if tile is None:
        return None
    try:
        value = int(tile)
        whole = isinstance(tile, str) or value == tile
    except (TypeError, ValueError, OverflowError):
        value, whole = -1, False
    if not whole or value < 0 or 0 < value < MIN_TILE:
        raise ValueError(f"tile={tile!r}: valid values are 0 (never tile) or a whole number of pixels >= {MIN_TILE}")
    return value


def _select_prompts(prompt: Optional[Any], indices: Iterable[int], count: int) -> Optional[List[str]]:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt for _ in indices]
    prompts = list(prompt)
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images; give one prompt or one per image")
    return [prompts[i] for i in indices]


def _select_embeds(embeds: torch.Tensor, indices: Iterable[int], count: int) -> torch.Tensor:
    if embeds.dim() == 2:
        embeds = embeds[None]
    if embeds.shape[0] == 1:
        return embeds.expand(len(list(indices)), -1, -1)
    if embeds.shape[0] != count:
        raise ValueError(f"prompt_embeds has batch {embeds.shape[0]} for {count} images; give 1 or {count}")
    return embeds[list(indices)]
