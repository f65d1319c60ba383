"""Safe reading: safetensors headers checked against the file, weights-only unpickling, clear errors."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from flashstep.loaders.files import LoaderError, read_file, read_state_dict, sniff_format
from flashstep.loaders.load_model import load_lora, load_model


def _tensors():
    return {"a.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
            "b.bias": torch.arange(5, dtype=torch.float32)}


def _rewrite_header(path, edit):
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data bytes."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_reading_is_memory_mapped(tmp_path, fmt):
    """Reading a 64 MiB file costs (almost) no resident memory: the tensors map the file."""
    path = str(tmp_path / f"big.{fmt}")
    big = {f"t{i}": torch.ones(1024, 1024) for i in range(16)}
    save_file(big, path) if fmt == "safetensors" else torch.save(big, path)
    del big
    before = _resident_mib()
    loaded = read_file(path)
    assert _resident_mib() - before < 16
    assert len(loaded) == 16 and float(loaded["t3"][5, 7]) == 1.0


def test_safetensors_round_trip(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file(_tensors(), path)
    loaded = read_file(path)
    assert sniff_format(path) == "safetensors"
    for key, value in _tensors().items():
        assert torch.equal(loaded[key], value)


def test_torch_zip_and_legacy_pickles_load_weights_only(tmp_path):
    zipped, legacy = str(tmp_path / "w.pth"), str(tmp_path / "old.ckpt")
    torch.save({"state_dict": _tensors(), "global_step": 7}, zipped)
    torch.save(_tensors(), legacy, _use_new_zipfile_serialization=False)
    assert sniff_format(zipped) == "torch_zip" and sniff_format(legacy) == "torch_pickle"
    state = read_state_dict(zipped)
    assert set(state) == set(_tensors()) and torch.equal(state["b.bias"], _tensors()["b.bias"])
    assert torch.equal(read_state_dict(legacy)["a.weight"], _tensors()["a.weight"])


class _Payload:
    """Pickles as a call to os.system that would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".pkl", ".bin"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, suffix):
    marker = tmp_path / "marker_created_by_payload"
    path = str(tmp_path / f"evil{suffix}")
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    for loader in (read_file, load_model, load_lora):
        with pytest.raises(LoaderError) as error:
            loader(path)
        message = str(error.value)
        assert path in message and "refuses to unpickle" in message and "system" in message
        assert "holds code, not just weights" in message
    assert not marker.exists()


def test_legacy_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker_legacy"
    path = str(tmp_path / "evil_legacy.pth")
    torch.save({"payload": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(LoaderError, match="refuses to unpickle"):
        read_file(path)
    assert not marker.exists()


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoaderError, match=r"empty.safetensors: the file is empty \(0 bytes\)"):
        load_model(str(path))


def test_truncated_safetensors(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    save_file(_tensors(), path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(LoaderError) as error:
        load_model(path)
    assert "cut.safetensors" in str(error.value) and "truncated" in str(error.value)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(LoaderError, match="less than the 8-byte header length"):
        read_file(path)


def test_header_length_beyond_the_file(tmp_path):
    path = str(tmp_path / "long.safetensors")
    save_file(_tensors(), path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 6))
    with pytest.raises(LoaderError, match="header length field says 1000000 bytes"):
        read_file(path)


@pytest.mark.parametrize("lie, expected", [
    ("size", "is F32 \\(4, 3\\) \\(48 bytes\\) but gives it the bytes"),
    ("offset", "holds only 68 bytes of data"),
    ("overlap", "overlaps the tensor before it"),
    ("dtype", "which torch cannot hold"),
    ("json", "not valid JSON"),
])
def test_lying_safetensors_header(tmp_path, lie, expected):
    path = str(tmp_path / f"lie_{lie}.safetensors")
    save_file(_tensors(), path)

    def edit(header):
        if lie == "size":
            header["a.weight"]["shape"] = [4, 3]
            header["a.weight"]["data_offsets"][1] += 4
        elif lie == "offset":
            begin, end = header["b.bias"]["data_offsets"]
            header["b.bias"]["data_offsets"] = [begin + 1000, end + 1000]
        elif lie == "overlap":
            first = min(header[k]["data_offsets"][0] for k in ("a.weight", "b.bias"))
            second = [k for k in ("a.weight", "b.bias") if header[k]["data_offsets"][0] != first][0]
            begin, end = header[second]["data_offsets"]
            header[second]["data_offsets"] = [begin - 4, end - 4]
        elif lie == "dtype":
            header["a.weight"]["dtype"] = "F128"

    if lie == "json":
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"[")
    else:
        _rewrite_header(path, edit)
    with pytest.raises(LoaderError, match=expected) as error:
        read_file(path)
    assert path in str(error.value)


def test_truncated_torch_zip(tmp_path):
    path = str(tmp_path / "cut.pth")
    torch.save(_tensors(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(LoaderError) as error:
        read_file(path)
    assert "cut.pth" in str(error.value) and "truncated" in str(error.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(LoaderError, match="notes.pth: not a checkpoint"):
        read_file(str(path))


def test_misnamed_pickle(tmp_path):
    path = str(tmp_path / "really_a_pickle.safetensors")
    torch.save(_tensors(), path)
    with pytest.raises(LoaderError, match="the name says safetensors but the file is a torch pickle"):
        read_file(path)


def test_missing_path_and_no_tensors(tmp_path):
    with pytest.raises(LoaderError, match="no such file or folder"):
        load_model(str(tmp_path / "absent.safetensors"))
    path = str(tmp_path / "meta.pth")
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(LoaderError, match=r"meta.pth: holds no tensors; its top-level keys are \['epoch', 'lr'\]"):
        load_model(path)


def test_unknown_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(LoaderError) as error:
        load_model(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "model_index.json" in message and "readme.txt" in message


def test_unknown_keys(tmp_path):
    path = str(tmp_path / "other.safetensors")
    save_file({"backbone.layer1.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LoaderError) as error:
        load_model(path)
    assert "other.safetensors: no known layout" in str(error.value) and "backbone.layer1.weight" in str(error.value)
