"""Runs a :class:`~flashstep.runner.graph.Graph`: moves values between stages, frees each one after its
last use, casts to each stage's dtype, tiles the tileable stages, re-runs a stage whose output is not
finite in its safe form, captures CUDA graphs, records per-stage times and op backends, shows progress.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Optional

import torch

from .. import registry
from .cuda_graphs import CudaGraphCache
from .graph import Graph, Stage, StageRecord
from .memory import MemoryBudget, release_heap

log = logging.getLogger("flashstep")


def _shape(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return (len(value),) + tuple(value[0].shape)
    return ()


def _cast(value: Any, dtype: Optional[torch.dtype]) -> Any:
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _as_tuple(result: Any, stage: Stage) -> tuple:
    outputs = result if len(stage.outputs) > 1 else (result,)
    if len(outputs) != len(stage.outputs):
        raise RuntimeError(f"stage {stage.name!r} returned {len(outputs)} values for outputs {stage.outputs}")
    return tuple(outputs)


def _all_finite(values: Iterable[Any]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())


class Runner:
    """Executes graphs on one device under one memory budget.

    ``cuda_graphs``: capture graphable stages on CUDA devices (replayed per input shape).
    ``progress``: a tqdm bar over the tiles of tiled stages.
    """

    def __init__(self, device: Optional[torch.device] = None, *, memory: Optional[MemoryBudget] = None,
                 cuda_graphs: bool = True, progress: bool = False):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.memory = memory if memory is not None else MemoryBudget.for_device(self.device)
        self.use_cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = CudaGraphCache() if self.use_cuda_graphs else None
        self.progress = progress
        self._warned: set = set()

    def run(self, graph: Graph, values: Dict[str, Any], outputs: Iterable[str]) -> Dict[str, Any]:
        """Run every stage in order; a stage whose outputs are all given in ``values`` is skipped."""
        outputs = tuple(outputs)
        graph.validate(values.keys(), outputs)
        values = dict(values)
        freed = graph.last_uses(keep=outputs)
        for index, stage in enumerate(graph):
            if all(name in values for name in stage.outputs):
                stage.record = StageRecord(notes=["skipped: its outputs were given"])
            else:
                self._run_stage(stage, values)
            for name in freed.get(index, ()):
                values.pop(name, None)
            if self.device.type == "cpu":
                release_heap()
        return {name: values[name] for name in outputs}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_stage(self, stage: Stage, values: Dict[str, Any]) -> None:
        args = {name: _cast(values[name], stage.dtype) for name in stage.inputs}
        record = StageRecord(input_shapes={k: _shape(v) for k, v in args.items() if _shape(v)})
        self._synchronize()
        start = time.perf_counter()
        with torch.inference_mode(), registry.trace_ops() as calls:
            outputs = _as_tuple(self._call(stage, stage.fn, args, record), stage)
            if stage.safe_fn is not None and not _all_finite(outputs):
                precision = str(stage.dtype).replace("torch.", "") if stage.dtype is not None else "its input precision"
                self._say_once(stage.name, f"stage {stage.name!r} produced NaN/inf in {precision}; "
                               "re-ran it in its safe precision")
                record.notes.append("re-run in safe precision after NaN/inf")
                outputs = _as_tuple(self._call(stage, stage.safe_fn, args, record, graphable=False), stage)
        self._synchronize()
        record.seconds = time.perf_counter() - start
        for op_name, backend, _ in calls:
            record.ops[(op_name, backend)] += 1
        record.output_shapes = {k: _shape(v) for k, v in zip(stage.outputs, outputs) if _shape(v)}
        if self.graphs is not None and self.graphs.failure(stage.name):
            record.notes.append(self.graphs.failure(stage.name))
        stage.record = record
        values.update(zip(stage.outputs, outputs))

    def _call(self, stage: Stage, fn, args: Dict[str, Any], record: StageRecord, graphable: Optional[bool] = None):
        graphable = stage.graphable if graphable is None else graphable
        if graphable and stage.tiler is not None and not stage.tiler.graphable(args, self.memory):
            graphable = False
        if graphable and self.graphs is not None:
            eager = fn
            name = stage.name if fn is stage.fn else f"{stage.name}/safe"

            def fn(**kwargs):  # noqa: F811 - the graphed form of the same function
                return self.graphs.run(name, eager, kwargs)

        if stage.tiler is not None:
            return stage.tiler.run(fn, args, budget=self.memory, record=record, progress=self.progress,
                                   on_retry=lambda message: self._say_once(f"{stage.name}/oom", message))
        return fn(**args)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
