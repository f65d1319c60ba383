"""Full feature maps of a streamed (layer-by-layer, tile-by-tile) run: on the compute device, in host RAM or
on disk.

A map is (B, C, H, W) in one dtype. The executor writes it and reads it back in rectangles
(``map.write(rows, cols, tile)``, ``map.read(rows, cols, device)``), so only a tile at a time ever sits on the
compute device. Three kinds of storage, fastest first:

* ``"device"``: a tensor on the compute device;
* ``"host"``: a tensor in host RAM;
* ``"disk"``: a ``numpy.memmap`` file in a temporary directory that :meth:`FeatureStore.close` deletes.
  Every access maps the file, copies the rectangle and unmaps it again, so the pages of a disk map never
  stay in the process's resident memory (the kernel's page cache keeps or evicts them).

:class:`FeatureStore` places each new map in the fastest kind whose capacity still holds it beside the maps
already live there (or in the kind it is told to use) and frees it when the executor says it is no longer
read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

STORE_KINDS = ("device", "host", "disk")

# numpy has no bfloat16: a disk map of bf16 stores its bits as int16.
_DISK_DTYPES = {
    torch.float32: (np.float32, torch.float32),
    torch.float16: (np.float16, torch.float16),
    torch.bfloat16: (np.int16, torch.int16),
    torch.float64: (np.float64, torch.float64),
}


def map_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a map of ``shape`` in ``dtype``."""
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


class FeatureMap:
    """One (B, C, H, W) map held by a :class:`FeatureStore` (or wrapping a caller's tensor).

    ``moments``: the (count, mean, m2) per (B, G) of the whole map in fp64, gathered tile by tile while the
    map is written, when a GroupNorm will read it (None otherwise).
    """

    def __init__(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, kind: str,
                 tensor: Optional[torch.Tensor] = None, path: Optional[str] = None):
        self.name, self.shape, self.dtype, self.kind = name, tuple(shape), dtype, kind
        self.tensor, self.path = tensor, path
        self.moments: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def nbytes(self) -> int:
        return map_bytes(self.shape, self.dtype)

    def _memmap(self) -> np.memmap:
        storage, _ = _DISK_DTYPES[self.dtype]
        return np.memmap(self.path, dtype=storage, mode="r+", shape=self.shape)

    def read(self, rows: slice, cols: slice, device: torch.device) -> torch.Tensor:
        """The rectangle [rows, cols] of every (b, c), (B, C, r, c), as a new tensor on ``device``."""
        if self.tensor is not None:
            return self.tensor[:, :, rows, cols].to(device, copy=True)
        pages = self._memmap()
        try:
            block = torch.from_numpy(np.ascontiguousarray(pages[:, :, rows, cols]))
        finally:
            del pages
        return block.view(self.dtype).to(device)

    def write(self, rows: slice, cols: slice, value: torch.Tensor) -> None:
        """Store ``value`` (B, C, r, c) at the rectangle [rows, cols]."""
        if self.tensor is not None:
            self.tensor[:, :, rows, cols].copy_(value)
            return
        _, bits = _DISK_DTYPES[self.dtype]
        pages = self._memmap()
        try:
            pages[:, :, rows, cols] = value.detach().to("cpu", self.dtype).contiguous().view(bits).numpy()
        finally:
            del pages

    def whole(self, device: torch.device) -> torch.Tensor:
        """The full map as one tensor on ``device`` (a view, not a copy, when it is already there)."""
        if self.tensor is not None:
            return self.tensor.to(device)
        return self.read(slice(None), slice(None), device)


@dataclass
class StoreTier:
    """One kind of storage: its capacity in bytes and what is live there now and at most."""

    kind: str
    capacity: float
    used: int = 0
    peak: int = 0


class FeatureStore:
    """Places, holds and frees the maps of one run (see the module docstring).

    ``capacities``: bytes each kind may hold at once (a kind left out holds nothing; disk is unbounded).
    ``force``: put every map the store allocates in this kind, whatever the capacities.
    Use as a context manager so the temporary directory is removed even when the run fails.
    """

    def __init__(self, device: torch.device, capacities: Dict[str, float], force: Optional[str] = None):
        if force is not None and force not in STORE_KINDS:
            raise ValueError(f"unknown store kind {force!r}; valid: {', '.join(STORE_KINDS)}")
        self.device = torch.device(device)
        self.force = force
        self.tiers = {kind: StoreTier(kind, float(capacities.get(kind, 0))) for kind in STORE_KINDS}
        self.tiers["disk"].capacity = float("inf")
        self.placements: Dict[str, str] = {}
        self._directory: Optional[str] = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _choose(self, nbytes: int) -> str:
        if self.force is not None:
            return self.force
        for kind in STORE_KINDS:
            tier = self.tiers[kind]
            if tier.used + nbytes <= tier.capacity:
                return kind
        return "disk"

    def _account(self, kind: str, nbytes: int) -> None:
        tier = self.tiers[kind]
        tier.used += nbytes
        tier.peak = max(tier.peak, tier.used)

    def allocate(self, name: str, shape: Sequence[int], dtype: torch.dtype, kind: Optional[str] = None) -> FeatureMap:
        """A new map of ``shape`` (contents undefined until written) in ``kind`` or where it fits."""
        nbytes = map_bytes(shape, dtype)
        kind = kind if kind is not None else self._choose(nbytes)
        if kind == "disk":
            if self._directory is None:
                self._directory = tempfile.mkdtemp(prefix="flashstep-maps-")
            path = os.path.join(self._directory, f"{len(self.placements)}-{name}.bin")
            if dtype not in _DISK_DTYPES:
                raise ValueError(f"a disk map holds {', '.join(map(str, _DISK_DTYPES))}, not {dtype}")
            # NOTE: the file is sparse: it takes disk space only where tiles are written.
            with open(path, "wb") as handle:
                handle.truncate(nbytes)
            feature_map = FeatureMap(name, shape, dtype, kind, path=path)
        else:
            device = self.device if kind == "device" else torch.device("cpu")
            tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
            feature_map = FeatureMap(name, shape, dtype, kind, tensor=tensor)
        self._account(kind, nbytes)
        self.placements[name] = kind
        return feature_map

    def wrap(self, name: str, tensor: torch.Tensor) -> FeatureMap:
        """A caller's tensor (B, C, H, W) as a map, without a copy; it counts towards the memory it is in."""
        kind = "host" if tensor.device.type == "cpu" else "device"
        self._account(kind, tensor.numel() * tensor.element_size())
        self.placements[name] = kind
        return FeatureMap(name, tuple(tensor.shape), tensor.dtype, kind, tensor=tensor)

    def free(self, feature_map: FeatureMap) -> None:
        """Drop the map's storage (a disk map's file is deleted)."""
        self.tiers[feature_map.kind].used -= feature_map.nbytes
        if feature_map.path is not None:
            os.remove(feature_map.path)
        feature_map.tensor = feature_map.path = None

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
