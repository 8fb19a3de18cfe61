"""Issue 10, class 2: an If whose branches read an outer weight that pruning would shrink.

The rules never look inside If/Loop/Scan bodies, so the analysis blocks every group whose
channels index an initializer read there (the layer's output group and, for a weight, its input
group too), with the reason; an If that reads an outer initializer pruning never touches (a
scalar) leaves the groups prunable, and pruning them matches the oracle (the original with the
removed channels zeroed) in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.channel_groups import analyse
from graph_passes.errors import PruningError
from graph_passes.ort_utils import make_session
from graph_passes.prepare import prepare_model
from graph_passes.prune import prune_channels


def _if_model(branch_reads: str, loop: bool = False) -> onnx.ModelProto:
    """x -> conv1 -> relu -> conv2 -> relu -> conv3 -> * s -> y, where s comes from an If (or a
    one-trip Loop) whose body reduces the outer initializer ``branch_reads``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)
             for name, shape in (("W1", (8, 3, 3, 3)), ("W2", (8, 8, 3, 3)), ("W3", (4, 8, 3, 3)))]
    inits += [numpy_helper.from_array(np.array(2.0, np.float32), "c"),
              numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "axes"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(1, np.int64), "trips")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "W2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "W3"], ["y0"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["x", "axes"], ["sx"], name="sum", keepdims=0),
             helper.make_node("Greater", ["sx", "zero"], ["cond"], name="gt")]
    scalar = helper.make_tensor_value_info
    if loop:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
             helper.make_node("ReduceSum", [branch_reads], ["acc_out0"], name="bsum", keepdims=0),
             helper.make_node("Add", ["acc_in", "acc_out0"], ["acc_out"], name="badd")],
            "body", [scalar("i", TensorProto.INT64, []), scalar("cond_in", TensorProto.BOOL, []),
                     scalar("acc_in", TensorProto.FLOAT, [])],
            [scalar("cond_out", TensorProto.BOOL, []), scalar("acc_out", TensorProto.FLOAT, [])])
        nodes.append(helper.make_node("Loop", ["trips", "cond", "zero"], ["s"], name="loop", body=body))
    else:
        then = helper.make_graph([helper.make_node("ReduceSum", [branch_reads], ["t"], name="tsum", keepdims=0)],
                                 "then", [], [scalar("t", TensorProto.FLOAT, [])])
        other = helper.make_graph([helper.make_node("ReduceMax", [branch_reads], ["e"], name="emax", keepdims=0)],
                                  "else", [], [scalar("e", TensorProto.FLOAT, [])])
        nodes.append(helper.make_node("If", ["cond"], ["s"], name="if", then_branch=then, else_branch=other))
    nodes.append(helper.make_node("Mul", ["y0", "s"], ["y"], name="mul"))
    graph = helper.make_graph(nodes, "g", [scalar("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [scalar("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _group_of(analysis, producer: str):
    return next(g for g in analysis.groups if producer in g.producers)


@pytest.mark.parametrize("loop", [False, True], ids=["If", "Loop"])
def test_weight_read_inside_a_subgraph_blocks_its_groups(tmp_path, loop: bool) -> None:
    path = tmp_path / "w.onnx"
    onnx.save(_if_model("W2", loop), str(path))
    prepared = prepare_model(str(path))
    analysis = prepared.analysis
    for producer in ("conv2", "conv1"):  # W2's output axis (conv2's group) and input axis (conv1's)
        group = _group_of(analysis, producer)
        assert not group.prunable
        assert any("'W2'" in r and "inside a subgraph" in r for r in group.reasons), group.reasons
    with pytest.raises(PruningError):
        prune_channels(prepared.model, analysis, {_group_of(analysis, "conv2").id: [0, 1]})


def test_outer_scalar_read_inside_a_subgraph_stays_prunable(tmp_path) -> None:
    path = tmp_path / "c.onnx"
    onnx.save(_if_model("c"), str(path))
    group = _group_of(prepare_model(str(path)).analysis, "conv2")
    assert group.prunable, group.reasons


def test_outer_scalar_read_inside_a_subgraph_prunes_to_the_oracle(tmp_path) -> None:
    path = tmp_path / "c.onnx"
    onnx.save(_if_model("c"), str(path))
    prepared = prepare_model(str(path))
    group = _group_of(prepared.analysis, "conv2")
    removed = [1, 4, 6]
    pruned = prune_channels(prepared.model, prepared.analysis, {group.id: removed})
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(prepared.model)
    for tensor in zeroed.graph.initializer:
        if tensor.name == "W2":
            w = numpy_helper.to_array(tensor).copy()
            w[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(w, "W2"))
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    expected = make_session(zeroed).run(None, x)[0]
    got = make_session(pruned).run(None, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    w2 = next(t for t in pruned.graph.initializer if t.name == "W2")
    assert list(w2.dims) == [5, 8, 3, 3]


def test_weight_read_by_a_second_main_graph_node_keeps_its_value(tmp_path) -> None:
    """In the main graph a second reader is no reason to block: pruning gives the sliced weight
    a name of its own, and the other reader keeps the original."""
    model = _if_model("c")
    model.graph.node.append(helper.make_node("ReduceSum", ["W2"], ["w2sum"], name="w2sum", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("w2sum", TensorProto.FLOAT, []))
    model = onnx.shape_inference.infer_shapes(model)
    analysis = analyse(model)
    group = _group_of(analysis, "conv2")
    assert group.prunable, group.reasons
