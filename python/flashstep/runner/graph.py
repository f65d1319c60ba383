"""A pipeline's graph: named stages with declared inputs and outputs, run in order.

A stage reads named values and writes named values::

    Stage("encode", encode_fn, inputs=("image",), outputs=("latent",))

``fn(**inputs)`` returns the single output, or a tuple in the order of ``outputs``. Another program can
insert, replace or drop stages (``graph.insert_before("denoise", my_stage)``, ``graph.replace(...)``,
``graph.drop(...)``); :meth:`Graph.validate` checks that every input is produced before it is read.
After a run, ``str(graph)`` shows each stage with the shapes it saw, its time and the backend every op
took.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch


@dataclass
class StageRecord:
    """What the last run of a stage saw: shapes in and out, seconds, and op backends."""

    input_shapes: Dict[str, tuple] = field(default_factory=dict)
    output_shapes: Dict[str, tuple] = field(default_factory=dict)
    seconds: float = 0.0
    tiles: int = 0
    ops: Counter = field(default_factory=Counter)  # (op, backend) -> calls
    notes: List[str] = field(default_factory=list)


@dataclass
class Stage:
    """One step of a pipeline.

    ``dtype``: floating-point tensor inputs are cast to it before ``fn`` runs (None: left as they are).
    ``tiler``: when set, runs ``fn`` tile by tile (see :mod:`flashstep.runner.tiling`).
    ``safe_fn``: when set, the stage's outputs are checked for NaN/inf and, if any, the stage is re-run with
    ``safe_fn`` (e.g. the VAE decoder in float32); said once in the log.
    ``graphable``: ``fn`` is shape-static and side-effect free, so the runner may capture it in a CUDA graph.
    """

    name: str
    fn: Callable[..., Any]
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    dtype: Optional[torch.dtype] = None
    tiler: Any = None
    safe_fn: Optional[Callable[..., Any]] = None
    graphable: bool = False
    record: StageRecord = field(default_factory=StageRecord)

    def __post_init__(self):
        self.inputs = tuple(self.inputs)
        self.outputs = tuple(self.outputs)
        if not self.outputs:
            raise ValueError(f"stage {self.name!r} declares no outputs")


class Graph:
    """An ordered list of stages (see the module docstring)."""

    def __init__(self, stages: Iterable[Stage] = (), inputs: Sequence[str] = ()):
        self.stages: List[Stage] = []
        self.inputs: Tuple[str, ...] = tuple(inputs)
        for stage in stages:
            self.append(stage)

    # -- editing -------------------------------------------------------------------------------------
    def _index(self, name: str) -> int:
        for index, stage in enumerate(self.stages):
            if stage.name == name:
                return index
        raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def _check_new(self, stage: Stage) -> None:
        if any(s.name == stage.name for s in self.stages):
            raise ValueError(f"a stage named {stage.name!r} already exists")

    def append(self, stage: Stage) -> None:
        self._check_new(stage)
        self.stages.append(stage)

    def insert_before(self, name: str, stage: Stage) -> None:
        self._check_new(stage)
        self.stages.insert(self._index(name), stage)

    def insert_after(self, name: str, stage: Stage) -> None:
        self._check_new(stage)
        self.stages.insert(self._index(name) + 1, stage)

    def replace(self, name: str, stage: Stage) -> None:
        index = self._index(name)
        if stage.name != name and any(s.name == stage.name for s in self.stages):
            raise ValueError(f"a stage named {stage.name!r} already exists")
        self.stages[index] = stage

    def drop(self, name: str) -> Stage:
        return self.stages.pop(self._index(name))

    def __getitem__(self, name: str) -> Stage:
        return self.stages[self._index(name)]

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    # -- analysis ------------------------------------------------------------------------------------
    def validate(self, provided: Iterable[str], wanted: Iterable[str]) -> None:
        """Raise ValueError unless every stage input exists when the stage runs and ``wanted`` is produced."""
        available = set(provided)
        for stage in self.stages:
            missing = [name for name in stage.inputs if name not in available]
            if missing:
                raise ValueError(
                    f"stage {stage.name!r} reads {missing} but nothing provides it before; "
                    f"available then: {sorted(available)}"
                )
            available.update(stage.outputs)
        absent = [name for name in wanted if name not in available]
        if absent:
            raise ValueError(f"the graph never produces {absent}; it produces {sorted(available)}")

    def last_uses(self, keep: Iterable[str]) -> Dict[int, List[str]]:
        """stage index -> the values no later stage reads (freed after that stage), except ``keep``."""
        keep = set(keep)
        last: Dict[str, int] = {}
        for index, stage in enumerate(self.stages):
            for name in stage.inputs + stage.outputs:
                last[name] = index
        freed: Dict[int, List[str]] = {}
        for name, index in last.items():
            if name not in keep:
                freed.setdefault(index, []).append(name)
        return freed

    def __str__(self) -> str:
        lines = [f"Graph with {len(self.stages)} stages (inputs: {', '.join(self.inputs) or '-'})"]
        for stage in self.stages:
            record = stage.record
            dtype = str(stage.dtype).replace("torch.", "") if stage.dtype is not None else "as given"
            extras = []
            if stage.tiler is not None:
                extras.append(f"tiled: {stage.tiler}")
            if stage.safe_fn is not None:
                extras.append("NaN-checked")
            lines.append(f"  {stage.name}: ({', '.join(stage.inputs)}) -> ({', '.join(stage.outputs)})  [{dtype}]"
                         + (f"  {'; '.join(extras)}" if extras else ""))
            if record.input_shapes or record.output_shapes:
                shapes_in = ", ".join(f"{k}{list(v)}" for k, v in record.input_shapes.items())
                shapes_out = ", ".join(f"{k}{list(v)}" for k, v in record.output_shapes.items())
                tiles = f", {record.tiles} tiles" if record.tiles else ""
                lines.append(f"      last run: {shapes_in or '-'} -> {shapes_out or '-'} in {record.seconds * 1e3:.1f} ms{tiles}")
            if record.ops:
                by_op: Dict[str, List[str]] = {}
                for (op, backend), count in sorted(record.ops.items()):
                    by_op.setdefault(op, []).append(f"{backend}×{count}")
                lines.append("      ops: " + "; ".join(f"{op} {', '.join(v)}" for op, v in by_op.items()))
            for note in record.notes:
                lines.append(f"      note: {note}")
        return "\n".join(lines)
