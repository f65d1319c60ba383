"""CUDA graphs per stage and input shape: capture once, then replay.

Small spatial sizes (a 64×64 latent at batch 1) are launch-bound: hundreds of kernels of a few
microseconds each. A captured graph replays them with one launch. A graph is keyed on the stage, every
tensor input's shape/dtype/device and the other inputs' values; inputs are copied into the graph's static
buffers before each replay and outputs are cloned out of it (the next replay overwrites them).

A stage whose capture fails (a host synchronisation inside, an op that cannot be captured) falls back to
eager execution for good, with a note on the stage.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch


def _key(stage_name: str, args: Dict[str, Any]) -> Tuple:
    parts = []
    for name in sorted(args):
        value = args[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, str(value.device), value.stride()))
        else:
            parts.append((name, repr(value)))
    return (stage_name, tuple(parts))


class CudaGraphCache:
    """At most ``max_graphs`` captured graphs, least recently used dropped first."""

    def __init__(self, max_graphs: int = 8, warmup_runs: int = 2):
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self._graphs: "OrderedDict[Tuple, Tuple[torch.cuda.CUDAGraph, Dict[str, Any], Any]]" = OrderedDict()
        self._failed: Dict[str, str] = {}
        self._pool = None

    def failure(self, stage_name: str) -> Optional[str]:
        """Why capture failed for this stage, or None."""
        return self._failed.get(stage_name)

    def run(self, stage_name: str, fn: Callable[..., Any], args: Dict[str, Any]) -> Any:
        if stage_name in self._failed:
            return fn(**args)
        key = _key(stage_name, args)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(fn, args)
            except Exception as error:  # capture is an optimisation: any failure means eager from now on
                self._failed[stage_name] = f"CUDA graph capture failed ({type(error).__name__}: {error}); running eagerly"
                torch.cuda.synchronize()
                return fn(**args)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_args, static_out = entry
        for name, value in args.items():
            if isinstance(value, torch.Tensor):
                static_args[name].copy_(value)
        graph.replay()
        return _clone(static_out)

    def _capture(self, fn: Callable[..., Any], args: Dict[str, Any]):
        static_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                fn(**static_args)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = fn(**static_args)
        return graph, static_args, static_out


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value
