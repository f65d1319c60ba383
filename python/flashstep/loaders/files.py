"""Reading checkpoint files without running code from them.

* ``.safetensors``: the header is checked first (sizes and offsets of every tensor against the file's
  length), then every tensor comes from :func:`safetensors.safe_open`, memory-mapped: a tensor costs no
  memory until it is read.
* ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` / ``.pkl``: ``torch.load(weights_only=True)``, memory-mapped
  when the file is torch's zip format. The weights-only unpickler builds tensors, containers and numbers
  only; a file whose pickle asks for any other global (a ``__reduce__`` that calls ``os.system``, a
  training-script class ...) is refused before anything runs.

The format is read from the file's first bytes, not its name. Every failure is a :class:`LoaderError`
naming the file, what was expected and what was found.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# Bits per element of the safetensors dtypes torch can hold.
_SAFETENSORS_ITEM_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80


class LoaderError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message names the file and the reason."""


def describe_keys(keys: Iterable[str], count: int = 5) -> str:
    """The first ``count`` keys, sorted, and how many there are in all: ``['a', 'b', ...] (12 keys)``."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:count])
    more = ", ..." if len(keys) > count else ""
    return f"[{shown}{more}] ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def sniff_format(path: str) -> str:
    """``"safetensors"``, ``"torch_zip"`` or ``"torch_pickle"`` (torch's pre-1.6 format), from the first bytes."""
    if not os.path.exists(path):
        raise LoaderError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        raise LoaderError(f"{path}: is a folder; expected a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    size = os.path.getsize(path)
    if size == 0:
        raise LoaderError(f"{path}: the file is empty (0 bytes); expected a checkpoint "
                          f"({', '.join(CHECKPOINT_SUFFIXES)})")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "torch_zip"
    if head[8:9] == b"{":
        return "safetensors"
    if head[0] == _PICKLE_PROTOCOL_OPCODE and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch_pickle"
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    raise LoaderError(
        f"{path}: not a checkpoint: expected a safetensors header, a torch zip archive or a pickle, "
        f"found the bytes {head[:8]!r} at the start ({size} bytes in all)"
    )


def _check_safetensors_header(path: str) -> Dict[str, Any]:
    """Parse and check the header against the file; returns it (tensor name -> dtype, shape, offsets)."""
    fmt = sniff_format(path)
    if fmt != "safetensors":
        raise LoaderError(f"{path}: is a {fmt.replace('_', ' ')} file, not safetensors")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoaderError(f"{path}: truncated safetensors file: {size} bytes, less than the 8-byte header length")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise LoaderError(
                f"{path}: the safetensors header length field says {header_len} bytes, but the file has "
                f"{size} bytes: the file is truncated or not safetensors"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoaderError(f"{path}: the safetensors header is not valid JSON ({error}); the file is corrupt") from None
    except RecursionError:
        raise LoaderError(f"{path}: the safetensors header nests JSON too deeply to be a header; "
                          "the file is corrupt") from None
    if not isinstance(header, dict):
        raise LoaderError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise LoaderError(f"{path}: safetensors header entry {name!r} lacks dtype/shape/data_offsets: {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_ITEM_BITS:
            raise LoaderError(f"{path}: tensor {name!r} has dtype {dtype!r}, which torch cannot hold")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise LoaderError(f"{path}: tensor {name!r} has a malformed shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        expected_bytes = math.prod(shape) * _SAFETENSORS_ITEM_BITS[dtype] // 8
        if end - begin != expected_bytes:
            raise LoaderError(
                f"{path}: the header says tensor {name!r} is {dtype} {tuple(shape)} ({expected_bytes} bytes) "
                f"but gives it the bytes [{begin}, {end}) ({end - begin} bytes): the header is wrong"
            )
        if end > data_len:
            raise LoaderError(
                f"{path}: the header puts tensor {name!r} at bytes [{begin}, {end}) of the data, but the file "
                f"holds only {data_len} bytes of data: the file is truncated or its header is wrong"
            )
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise LoaderError(f"{path}: the header puts tensor {name!r} at byte {begin}, which {what}: "
                              f"the header is wrong")
        position = end
    if position != data_len:
        raise LoaderError(
            f"{path}: the header describes {position} bytes of tensor data but the file holds {data_len}: "
            f"the file is corrupt or its header is wrong"
        )
    return header


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (nothing is read until a tensor is used)."""
    from safetensors import SafetensorError, safe_open

    _check_safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise LoaderError(f"{path}: safetensors cannot read the file: {error}") from None


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header ({} when there are none)."""
    header = _check_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


_GLOBAL_PATTERN = re.compile(r"GLOBAL ([\w.]+)")


def read_pickle(path: str, fmt: Optional[str] = None) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped for torch's zip format."""
    fmt = fmt or sniff_format(path)
    if fmt == "safetensors":
        raise LoaderError(f"{path}: is a safetensors file, not a pickle")
    try:
        with warnings.catch_warnings():
            # NOTE: torch warns that protocol-4/5 pickles may use opcodes it does not support; such a file
            # then fails below with its own message, so the warning would only add noise.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch_zip")
    except pickle.UnpicklingError as error:
        message = str(error)
        found = _GLOBAL_PATTERN.search(message)
        if found:
            raise LoaderError(
                f"{path}: torch.load(weights_only=True) refuses to unpickle {found.group(1)} (nothing was run): "
                f"the file holds code, not just weights"
            ) from None
        detail = [line for line in message.strip().splitlines() if line.strip()]
        fallback = detail[-1] if detail else ""
        reason = next((line for line in detail if "Unsupported" in line or "error" in line.lower()), fallback)
        raise LoaderError(f"{path}: not a weights-only torch checkpoint: {reason.strip()}") from None
    except Exception as error:
        # NOTE: torch.load parses untrusted bytes, and a damaged file can make it fail with almost any type
        # (RuntimeError, EOFError, KeyError, AssertionError, OverflowError ... seen in fuzzing): every one of
        # them means the same to the caller, a file that cannot be read.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LoaderError(f"{path}: torch.load cannot read the file ({type(error).__name__}: {first_line}); "
                          f"the file is truncated, corrupt or not a torch checkpoint") from None


def read_file(path: str) -> Any:
    """The object a checkpoint file holds: a ``{name: tensor}`` dict for safetensors, whatever
    ``torch.save`` stored (weights-only) otherwise."""
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        raise LoaderError(f"{path}: the name says safetensors but the file is a torch pickle ({fmt})")
    return read_pickle(path, fmt)


# Wrappers around the state dict in training checkpoints, in the order they are preferred.
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "params_ema", "params-ema", "params", "model", "net",
                       "module", "ema")


def tensors_of(obj: Any, path: str, wrappers: Sequence[str] = STATE_DICT_WRAPPERS) -> Dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict inside a loaded checkpoint object.

    Unwraps the first key of ``wrappers`` present whose value is a dict (``state_dict``, ``params_ema``
    ...), then keeps the tensor values (training checkpoints also store epochs and step counts).
    """
    if not isinstance(obj, Mapping):
        raise LoaderError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    for wrapper in wrappers:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise LoaderError(f"{path}: holds no tensors; its top-level keys are {describe_keys(map(str, obj.keys()))}")
    return tensors


def read_state_dict(path: str, wrappers: Sequence[str] = STATE_DICT_WRAPPERS) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (see :func:`tensors_of` for the unwrapping)."""
    return tensors_of(read_file(path), path, wrappers)
