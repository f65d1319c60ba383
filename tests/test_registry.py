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


def test_auto_passes_over_a_backend_that_says_another_is_faster_on_these_inputs():
    op = make_op()
    op.register("cpu", lambda x: ("cpu", x), auto_why_not=lambda x: "slower below 10" if x < 10 else None)
    assert op(20) == ("cpu", 20)
    assert op(5) == ("aten", 5)
    assert op(-5) == ("cpu", -5), "a slower kernel still beats the reference when nothing else takes the inputs"
    assert op(5, backend="cpu") == ("cpu", 5)


@pytest.mark.skipif(registry.get("group_norm").implementations["cpu"].available() is False,
                    reason="the native module is not built")
def test_the_cpu_group_norm_is_auto_only_where_it_measured_faster():
    op = registry.get("group_norm")

    def chosen(shape, dtype=torch.float32, stats=None):
        x = torch.zeros(shape, dtype=dtype)
        return op.select(x, 32, None, None, 1e-5, "silu", None, stats).backend

    assert chosen((2, 320, 8, 8)) == "aten"
    assert chosen((1, 256, 64, 64)) == "aten"
    assert chosen((1, 128, 128, 128)) == "cpu"
    assert chosen((2, 320, 8, 8), torch.bfloat16) == "cpu"
    assert chosen((2, 320, 8, 8), stats=(torch.zeros(2, 32), torch.ones(2, 32))) == "cpu"


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
