"""The stage graph and its runner: ordering, editing, freeing, skipping, dtype casts, NaN fallback, records."""
import logging

import pytest
import torch

from flashstep import ops
from flashstep.runner import Graph, Runner, Stage


def make_graph():
    return Graph(
        [
            Stage("double", lambda x: x * 2, ("x",), ("y",)),
            Stage("split", lambda y: (y + 1, y - 1), ("y",), ("p", "q")),
            Stage("sum", lambda p, q: p + q, ("p", "q"), ("out",)),
        ],
        inputs=("x",),
    )


def test_stages_run_in_order_and_return_the_outputs_asked_for():
    result = Runner().run(make_graph(), {"x": torch.ones(3)}, outputs=["out"])
    assert torch.equal(result["out"], torch.full((3,), 4.0))


def test_intermediates_are_freed_after_their_last_use():
    seen = {}

    def spy(p, q, **_):
        return p + q

    graph = make_graph()
    graph.replace("sum", Stage("sum", spy, ("p", "q"), ("out",)))
    graph.append(Stage("peek", lambda out: seen.setdefault("out", out), ("out",), ("final",)))
    result = Runner().run(graph, {"x": torch.ones(1)}, outputs=["final"])
    assert set(result) == {"final"}
    assert graph.last_uses(keep=["final"])[1] == ["y"]


def test_editing_insert_replace_drop_and_validation():
    graph = make_graph()
    graph.insert_before("sum", Stage("negate_q", lambda q: -q, ("q",), ("q_neg",)))
    graph.replace("sum", Stage("sum", lambda p, q_neg: p + q_neg, ("p", "q_neg"), ("out",)))
    assert [s.name for s in graph] == ["double", "split", "negate_q", "sum"]
    assert torch.equal(Runner().run(graph, {"x": torch.ones(1)}, ["out"])["out"], torch.full((1,), 2.0))
    graph.drop("negate_q")
    with pytest.raises(ValueError, match="reads \\['q_neg'\\] but nothing provides it"):
        Runner().run(graph, {"x": torch.ones(1)}, ["out"])
    with pytest.raises(ValueError, match="already exists"):
        graph.append(Stage("double", lambda x: x, ("x",), ("z",)))
    with pytest.raises(KeyError, match="no stage named 'nope'"):
        graph.drop("nope")


def test_a_stage_whose_outputs_are_given_is_skipped():
    calls = []
    graph = Graph([Stage("prompt", lambda text: calls.append(text) or torch.zeros(1), ("text",), ("context",)),
                   Stage("use", lambda context: context + 1, ("context",), ("out",))])
    Runner().run(graph, {"text": "a", "context": torch.ones(1)}, ["out"])
    assert calls == []
    assert "skipped" in graph["prompt"].record.notes[0]


def test_floating_inputs_are_cast_to_the_stage_dtype():
    graph = Graph([Stage("half", lambda x: x, ("x",), ("y",), dtype=torch.float16)])
    result = Runner().run(graph, {"x": torch.ones(2)}, ["y"])
    assert result["y"].dtype == torch.float16


def test_non_finite_output_reruns_the_safe_form_and_says_so_once(caplog):
    graph = Graph([Stage("decode", lambda z: z / 0, ("z",), ("image",), safe_fn=lambda z: z * 0 + 1)])
    runner = Runner()
    with caplog.at_level(logging.WARNING, logger="flashstep"):
        for _ in range(2):
            result = runner.run(graph, {"z": torch.ones(2)}, ["image"])
    assert torch.equal(result["image"], torch.ones(2))
    assert sum("NaN/inf" in r.message for r in caplog.records) == 1
    assert "safe precision" in graph["decode"].record.notes[0]


def test_the_graph_shows_shapes_times_and_op_backends():
    graph = Graph([Stage("attend", lambda q: ops.attention(q, q, q, backend="torch"), ("q",), ("o",))])
    Runner().run(graph, {"q": torch.randn(1, 2, 5, 8)}, ["o"])
    text = str(graph)
    assert "attend: (q) -> (o)" in text
    assert "q[1, 2, 5, 8]" in text and "o[1, 2, 5, 8]" in text
    assert "attention torch×1" in text
