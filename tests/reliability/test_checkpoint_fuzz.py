"""Fuzzing every checkpoint loader with hypothesis: random bytes; mutations of valid safetensors files, torch
zip archives, legacy pickles and malicious pickles; safetensors headers with drawn sizes, offsets, dtypes and
shapes; state dicts of drawn keys and shapes; diffusers folders with a drawn config.json. Every outcome is a
loaded object or a one-line ValueError (LoaderError) naming the file, never another exception, never code
run from the file."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from corpus import Payload, srvgg_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from trials import try_checkpoint

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin", ".pkl", ".pt")
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F128", "C64", "", 7)


def assert_clean(path) -> None:
    for through, result, message in try_checkpoint(path):
        assert result != "traceback", f"{path.name} through {through}: {message}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid files to mutate: {kind: bytes}, and the folder of the marker a mutated payload would create."""
    folder = tmp_path_factory.mktemp("fuzz_bases")
    weights = srvgg_state_dict()
    files = {"safetensors": folder / "w.safetensors", "zip": folder / "w.pth", "legacy": folder / "w.ckpt",
             "payload": folder / "evil.pth"}
    save_file(weights, str(files["safetensors"]))
    torch.save({"params_ema": weights}, str(files["zip"]))
    torch.save(weights, str(files["legacy"]), _use_new_zipfile_serialization=False)
    marker = folder / "payload_ran"
    torch.save({"weight": torch.zeros(3), "x": Payload(marker, "system")}, str(files["payload"]))
    return {kind: path.read_bytes() for kind, path in files.items()}, marker


EDITS = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["flip", "cut", "overwrite", "insert", "delete"]),
                           st.binary(min_size=1, max_size=24)), min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for where, kind, value in edits:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= value[0] or 1
        elif kind == "cut":
            del data[at:]
        elif kind == "overwrite":
            data[at : at + len(value)] = value
        elif kind == "insert":
            data[at:at] = value
        else:
            del data[at : at + len(value)]
    return bytes(data)


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES),
       prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", struct.pack("<Q", 2) + b"{}"]))
def test_random_bytes(tmp_path, data, suffix, prefix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(prefix + data)
    assert_clean(path)


@SETTINGS
@given(kind=st.sampled_from(["safetensors", "zip", "legacy"]), edits=EDITS,
       suffix=st.sampled_from([".safetensors", ".pth", ".ckpt"]))
def test_mutated_valid_checkpoints(tmp_path, bases, kind, edits, suffix):
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(apply_edits(bases[0][kind], edits))
    assert_clean(path)


@SETTINGS
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["flip", "overwrite", "insert"]),
                                st.binary(min_size=1, max_size=8)), max_size=3),
       suffix=st.sampled_from([".pth", ".pkl", ".ckpt"]))
def test_mutated_malicious_pickles_never_run(tmp_path, bases, edits, suffix):
    (files, marker) = bases
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(apply_edits(files["payload"], edits))
    for through, result, message in try_checkpoint(path):
        assert result != "traceback", f"{through}: {message}"
        assert result == "error" or not edits, f"{through} loaded a file that still holds the payload"
    assert not marker.exists(), "the payload ran"


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.lists(st.integers(0, 2**62), max_size=3),
                       st.just("4x3")),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 200), min_size=0, max_size=3), st.just([0.0, 4.0])),
})


@SETTINGS
@given(entries=st.dictionaries(st.text(min_size=1, max_size=12), ENTRY, max_size=4),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers()),
                                                      max_size=3)),
       data=st.binary(max_size=256), length_lie=st.integers(-4, 4))
def test_drawn_safetensors_headers(tmp_path, entries, metadata, data, length_lie):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path = tmp_path / "drawn.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_lie)) + raw + data)
    assert_clean(path)


KEY_PARTS = st.sampled_from([
    "body.0", "body.1", "body.2", "conv_first", "conv_last", "conv_body", "model.diffusion_model.input_blocks.0.0",
    "first_stage_model.encoder.conv_in", "cond_stage_model.transformer.text_model.embeddings.token_embedding",
    "encoder.conv_in", "decoder.conv_in", "conv_in", "time_embedding.linear_1", "lora_unet_down_blocks_0_proj_in",
    "text_model.embeddings.token_embedding", "unet.down_blocks.0.attentions.0.proj_in", "layers.0.residual_group",
])
KEY_ENDS = st.sampled_from([".weight", ".bias", ".lora_A.weight", ".lora_B.weight", ".lora_down.weight",
                            ".lora_up.weight", ".alpha", ""])
SHAPES = st.lists(st.integers(0, 5), max_size=4)


@SETTINGS
@given(tensors=st.dictionaries(st.builds(lambda a, b: a + b, KEY_PARTS, KEY_ENDS),
                               st.tuples(SHAPES, st.sampled_from([torch.float32, torch.float16, torch.int64])),
                               min_size=1, max_size=6),
       wrapper=st.sampled_from([None, "state_dict", "params_ema"]), safetensors=st.booleans())
def test_drawn_state_dicts(tmp_path, tensors, wrapper, safetensors):
    """State dicts of real key fragments in drawn shapes: what the architecture detection reads."""
    state = {key: torch.zeros(shape, dtype=dtype) for key, (shape, dtype) in tensors.items()}
    if safetensors:
        path = tmp_path / "drawn.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "drawn.pth"
        torch.save(state if wrapper is None else {wrapper: state}, str(path))
    assert_clean(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=12),
                    lambda inner: (st.lists(inner, max_size=3)
                                   | st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                    max_leaves=12)
CONFIG_KEYS = st.sampled_from(["_class_name", "architectures", "in_channels", "out_channels", "block_out_channels",
                               "layers_per_block", "cross_attention_dim", "hidden_size", "sample_size", "unet", "vae"])


@SETTINGS
@given(config=st.dictionaries(CONFIG_KEYS, JSON, max_size=5), name=st.sampled_from(["config.json", "model_index.json"]),
       class_name=st.sampled_from([None, "AutoencoderKL", "UNet2DConditionModel", "CLIPTextModel"]),
       with_weights=st.booleans())
def test_drawn_model_folders(tmp_path, config, name, class_name, with_weights):
    folder = tmp_path / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if class_name is not None:
        config["_class_name"] = class_name
    (folder / name).write_text(json.dumps(config))
    if with_weights:
        save_file({"conv_in.weight": torch.zeros(2, 2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    assert_clean(folder)
