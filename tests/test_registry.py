"""The op registry: selection order, explicit backends, the environment variable, availability."""
import pytest
import torch

from flashstep import ops, registry
from flashstep.registry import BackendUnavailableError, Op


def make_op():
    op = Op("toy")
    op.register("torch", lambda x: ("torch", x))
    op.register("aten", lambda x: ("aten", x), why_not=lambda x: None if x >= 0 else "negative input")
    op.register("cuda", lambda x: ("cuda", x), available=lambda: False)
    return op


def test_auto_takes_the_first_available_backend_that_supports_the_inputs():
    op = make_op()
    assert op(1) == ("aten", 1)
    assert op(-1) == ("torch", -1)


def test_backends_lists_what_runs_here_in_priority_order():
    op = make_op()
    assert op.registered() == ["cuda", "aten", "torch"]
    assert op.backends() == ["aten", "torch"]


def test_explicit_backend_that_cannot_run_raises_with_the_reason():
    op = make_op()
    with pytest.raises(BackendUnavailableError, match="'cuda' for flashstep.ops.toy cannot run here"):
        op(1, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="negative input"):
        op(-1, backend="aten")
    with pytest.raises(BackendUnavailableError, match="has no 'triton' backend"):
        op(1, backend="triton")
    assert op(-1, backend="torch") == ("torch", -1)


def test_environment_variable_names_a_backend(monkeypatch):
    op = make_op()
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert op(1) == ("torch", 1)
    monkeypatch.setenv(registry.ENV_VAR, "toy=torch,*=aten")
    assert op(1) == ("torch", 1)
    monkeypatch.setenv(registry.ENV_VAR, "other=torch,*=aten")
    assert op(1) == ("aten", 1)
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError):
        op(1)
    assert op(1, backend="auto") == ("aten", 1), "the argument wins over the environment"


def test_environment_variable_with_an_unknown_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'; valid: auto, cuda"):
        make_op()(1)


def test_every_public_op_is_registered_with_a_reference():
    for name in ops.OP_NAMES:
        op = registry.get(name)
        assert "torch" in op.backends()
        assert set(op.registered()) >= {"torch", "aten", "triton", "cuda"}


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 4, 8)
    assert registry.get("attention").select(q, q, q, None).backend in ("aten", "cuda")


def test_unknown_op_lists_the_known_ones():
    with pytest.raises(KeyError, match="attention"):
        registry.get("nope")
