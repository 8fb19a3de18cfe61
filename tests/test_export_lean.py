"""graph_passes.qdq.compact: the lean export changes bytes, never values.

The same QDQ model with and without compaction gives bit-identical outputs at every onnxruntime
optimisation level; the compacted one is smaller, has no weight zero points, no duplicate
initializers and short names; models with subgraphs keep their names; and a mixed-width plan
of the digits sample exported lean passes the one gate (``plugin.api.apply_plan``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from graph_passes.qdq import compact, insert_qdq
from tests.test_qdq import chain_model, chain_plan

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def _run(model: onnx.ModelProto, feeds: dict, level: str) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (2, 4), (None, 8), (None, 2)])
def test_compact_is_exact_at_every_level_and_smaller(wbits, abits) -> None:
    model = chain_model()
    weights, acts = chain_plan(wbits, abits)
    plain = insert_qdq(model, weights, acts)
    lean = compact(insert_qdq(model, weights, acts))
    onnx.checker.check_model(lean.model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal([2, 3, 6, 6]).astype(np.float32)}
    for level in LEVELS:
        for a, b in zip(_run(plain.model, feeds, level), _run(lean.model, feeds, level)):
            assert np.array_equal(a, b), level
    assert len(lean.model.SerializeToString()) < len(plain.model.SerializeToString())
    g = lean.model.graph
    inits = {t.name: t for t in g.initializer}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    if wbits == 8 and abits == 8:  # all 8 bits: uint8 weights, zero point 128 (graph_passes.qdq, saturation)
        assert weight_dq and all(len(n.input) == 3 and inits[n.input[0]].data_type == onnx.TensorProto.UINT8
                                 and np.all(numpy_helper.to_array(inits[n.input[2]]) == 128) for n in weight_dq)
    else:
        assert weight_dq and all(len(n.input) == 2 for n in weight_dq)
        assert all(layer.zero_point_bytes == 0 for layer in lean.layers.values())
    contents = [(t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in g.initializer]
    assert len(contents) == len(set(contents))  # every constant once
    used = {i for n in g.node for i in n.input}
    assert all(t.name in used for t in g.initializer)
    # the activations' scalar zero points: one tensor per type
    zps = {n.input[2] for n in g.node if n.op_type == "QuantizeLinear"}
    assert len(zps) <= len({inits[z].data_type for z in zps})
    # graph inputs/outputs keep their names; the rest is short, packed weights and the input's scale/zero point keep theirs
    assert [v.name for v in g.input] == ["x"] and {o.name for o in g.output} == {o.name for o in model.graph.output}
    packed = {n.input[0] for n in weight_dq}
    inputs = {i for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "x" for i in n.input[1:]}
    assert all(len(t.name) <= 3 for t in g.initializer if t.name not in packed | inputs)
    assert all(t.name.startswith("W") for t in g.initializer if t.name in packed)


def test_subgraph_models_keep_their_names() -> None:
    then = helper.make_graph([helper.make_node("Identity", ["a_dq"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["a_dq"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["a_q"], name="q"),
         helper.make_node("DequantizeLinear", ["a_q", "s", "z"], ["a_dq"], name="dq"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z"),
         numpy_helper.from_array(np.uint8(0), "z2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    from graph_passes.qdq import QdqResult

    out = compact(QdqResult(model)).model
    assert [n.name for n in out.graph.node] == ["q", "dq", "if"]
    assert "a_dq" in {o for n in out.graph.node for o in n.output}
    assert {t.name for t in out.graph.initializer} == {"s", "z"}  # the unused one dropped


def test_digits_mixed_plan_exported_lean_passes_the_gate(tmp_path) -> None:
    from graph_passes.prepare import prepare_model
    from plugin import api
    from plugin.space import Precisions, SearchSpace

    from graph_passes.digest import model_digest

    prepared = prepare_model(str(DIGITS / "model.onnx"))
    space = SearchSpace(prepared.analysis, Precisions((8, 4, 2, 0), (8, 4)),
                        model_sha256=model_digest(prepared.original))
    bits = {name: [(8, 4, 2)[c % 3] for c in range(len(info.columns))] for name, info in space.layers.items()}
    plan = space.plan(layer_bits=bits, site_bits=8)
    path = plan.save(tmp_path / "mixed.plan.json")
    data = np.load(DIGITS / "test.npz")
    result = api.apply_plan(str(DIGITS / "model.onnx"), path, data=str(DIGITS / "test.npz"), progress=False)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Gather" in ops  # the mixed-width path
    x = data["input"][:64]
    ref = _run(result.model, {"input": x}, "ORT_DISABLE_ALL")[0]
    for level in LEVELS[1:]:
        assert np.allclose(_run(result.model, {"input": x}, level)[0], ref, rtol=1e-4, atol=1e-4), level
    f = result.report["file"]
    assert f["bytes"] == len(result.model.SerializeToString())
