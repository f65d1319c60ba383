"""The graph runner: stages, execution, tiling, precision, CUDA graphs, memory budgets."""
from .executor import Runner
from .graph import Graph, Stage, StageRecord
from .memory import MemoryBudget, parse_memory

__all__ = ["Runner", "Graph", "Stage", "StageRecord", "MemoryBudget", "parse_memory"]
