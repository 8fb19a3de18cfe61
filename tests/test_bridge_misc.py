"""Bridge converters for GlobalMaxPool, OneHot, Clip with run-time / absent bounds, and control
flow (If), each against onnxruntime through the bridge's own parity check."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx.shape_inference
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graph_passes.errors import DataError
from graph_passes.ort_utils import make_session, run
from plugin.bridge import check_parity, convert
from tests.test_bridge_ops import _model as _parsed_model

RTOL = 1e-6
RNG = np.random.default_rng(0)


def _model(opset: int, signature: str, body: str, inits: str = "") -> onnx.ModelProto:
    return _parsed_model(opset, signature, body, inits, ir_version=8)


def _parity(model: onnx.ModelProto, feeds: dict | None = None) -> float:
    return check_parity(model, convert(model), feeds=feeds, rtol=RTOL)


# ---------------------------------------------------------------------------- GlobalMaxPool


@pytest.mark.parametrize("shape", ["2,3,5", "2,3,5,6", "1,4,3,2,5"])
@pytest.mark.parametrize("opset", [13, 22])
def test_global_max_pool(shape: str, opset: int) -> None:
    model = _model(opset, f"(float[{shape}] x) => (float y)", "y = GlobalMaxPool(x)")
    feeds = {"x": RNG.standard_normal([int(d) for d in shape.split(",")]).astype(np.float32) - 3.0}
    assert _parity(model, feeds) <= RTOL


# ---------------------------------------------------------------------------- OneHot


@pytest.mark.parametrize("axis", [-1, 0, 1, -2])
@pytest.mark.parametrize("index_type,depth_type", [("int64", "int64"), ("float", "float"), ("int32", "int32")])
def test_one_hot_constant_depth(axis: int, index_type: str, depth_type: str) -> None:
    """(The type combinations onnxruntime's CPU kernel has.)"""
    model = _model(11, f"({index_type}[2,5] i) => (float y)", f"y = OneHot <axis={axis}> (i, depth, values)",
                   f"<{depth_type}[1] depth = {{4}}, float[2] values = {{-0.5, 2.0}}>")
    # negative indices count from depth; -5 and 4, 7 are out of range: all 'off'
    indices = np.array([[0, 3, -1, -4, 4], [2, 1, 7, -5, 0]])
    dtype = {"int64": np.int64, "float": np.float32, "int32": np.int32}[index_type]
    assert _parity(model, {"i": indices.astype(dtype)}) <= RTOL


def test_one_hot_runtime_depth_and_values() -> None:
    """depth and values are graph inputs (a float depth is cast to int64), int32 output."""
    model = _model(11, "(int64[3] i, float[] depth, int32[2] values) => (int32 y)",
                   "y = OneHot (i, depth, values)")
    feeds = {"i": np.array([0, 2, 5], np.int64), "depth": np.array(6.0, np.float32),
             "values": np.array([3, 9], np.int32)}
    assert _parity(model, feeds) == 0.0


def test_one_hot_tf2onnx_pattern() -> None:
    """magika-v1's form: byte values cast to int32 indices, one-hot over 257 classes, axis -1,
    then a MatMul with a weight."""
    model = _model(11, "(int32[1,6] b, float[257,3] w) => (float y)",
                   "h = Cast <to=6> (b)\n oh = OneHot <axis=-1> (h, depth, values)\n y = MatMul (oh, w)",
                   "<int32 depth = {257}, float[2] values = {0.0, 1.0}>")
    feeds = {"b": np.array([[0, 1, 255, 256, 7, 3]], np.int32),
             "w": RNG.standard_normal((257, 3)).astype(np.float32)}
    assert _parity(model, feeds) <= RTOL


# ---------------------------------------------------------------------------- ScatterElements


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("opset,reduction", [(13, "none"), (16, "add"), (16, "mul"), (18, "max"), (18, "min")])
def test_scatter_elements(axis: int, opset: int, reduction: str) -> None:
    attr = "" if opset < 16 else f', reduction="{reduction}"'
    model = _model(opset, "(float[3,4] data, int64[2,3] idx, float[2,3] upd) => (float y)",
                   f"y = ScatterElements <axis={axis}{attr}> (data, idx, upd)")
    size = 3 if axis == 0 else 4
    # distinct targets per column/row for 'none' (duplicates have no defined order); negatives too
    idx = np.array([[0, -1, 1], [2, 0, -size]]) if reduction == "none" and axis == 0 else \
        np.array([[0, -1, 1], [1, 2, 0]]) if reduction == "none" else np.array([[0, -1, 1], [0, 1, -1]])
    feeds = {"data": RNG.standard_normal((3, 4)).astype(np.float32), "idx": idx.astype(np.int64),
             "upd": RNG.standard_normal((2, 3)).astype(np.float32)}
    assert _parity(model, feeds) <= RTOL


# ---------------------------------------------------------------------------- Clip


X = "(float[2,3,4] x) => (float y)"


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_clip_min_computed_at_run_time(opset: int) -> None:
    """oww-melspectrogram: min = ReduceMax(x) - 80, a value the graph computes."""
    model = _model(opset, X, "m = ReduceMax <keepdims=0> (x)\n low = Sub (m, d)\n y = Clip (x, low, high)",
                   "<float d = {1.5}, float high = {1.0}>")
    assert _parity(model) <= RTOL


def test_clip_both_bounds_inputs() -> None:
    model = _model(13, "(float[2,3,4] x, float lo, float hi) => (float y)", "y = Clip (x, lo, hi)")
    feeds = {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32),
             "lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}
    assert _parity(model, feeds) <= RTOL
    # min > max: ONNX and torch both set every value to max
    feeds.update(lo=np.array(0.5, np.float32), hi=np.array(-0.5, np.float32))
    assert _parity(model, feeds) <= RTOL


@pytest.mark.parametrize("body", ['y = Clip (x, lo, "")', 'y = Clip (x, "", hi)', "y = Clip (x, lo)",
                                  'y = Clip (x, "", "")', "y = Clip (x)"])
def test_clip_absent_bounds(body: str) -> None:
    """romanizer-encoder: the torch exporter's clamp(min=1) is Clip(x, min, '')."""
    model = _model(17, X, body, "<float lo = {-0.2}, float hi = {0.3}>")
    assert _parity(model) <= RTOL


def test_clip_integer_runtime_bound() -> None:
    model = _model(13, "(int64[5] x, int64 hi) => (int64 y)", 'y = Clip (x, "", hi)')
    feeds = {"x": np.array([-4, 0, 3, 9, 2], np.int64), "hi": np.array(2, np.int64)}
    assert _parity(model, feeds) == 0.0


# ---------------------------------------------------------------------------- If


def _f32(name: str, shape: list[int] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _verifier_if_model(opset: int = 13) -> onnx.ModelProto:
    """oww-hey-jarvis' pattern: a main Gemm + Sigmoid score p; If p >= 0.5 run a verifier
    (two Gemms, a LayerNorm written out in ops, Sigmoid) on the input, else return p as it is.
    The verifier's weights are main-graph initializers that only the branch reads; the main
    Gemm's bias is also read inside the branch (a shared, live value)."""
    then_nodes = [
        helper.make_node("Flatten", ["x"], ["t_flat"]),
        helper.make_node("Gemm", ["t_flat", "v1_w", "v1_b"], ["t1"], transB=1),
        helper.make_node("ReduceMean", ["t1"], ["t_mean"], axes=[-1]),
        helper.make_node("Sub", ["t1", "t_mean"], ["t_centred"]),
        helper.make_node("Mul", ["t_centred", "t_centred"], ["t_sq"]),
        helper.make_node("ReduceMean", ["t_sq"], ["t_var"], axes=[-1]),
        helper.make_node("Add", ["t_var", "eps"], ["t_var_eps"]),
        helper.make_node("Sqrt", ["t_var_eps"], ["t_std"]),
        helper.make_node("Div", ["t_centred", "t_std"], ["t_norm"]),
        helper.make_node("Relu", ["t_norm"], ["t_act"]),
        helper.make_node("Gemm", ["t_act", "v2_w", "m_b"], ["t2"], transB=1),
        helper.make_node("Sigmoid", ["t2"], ["t_out"]),
    ]
    then_branch = helper.make_graph(then_nodes, "then", [], [_f32("t_out", [1, 1])],
                                    initializer=[numpy_helper.from_array(np.array(1e-5, np.float32), "eps")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["p"], ["e_out"])], "else", [],
                                    [_f32("e_out", [1, 1])])
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "m_w", "m_b"], ["logit"], transB=1),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("GreaterOrEqual", ["p", "half"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    inits = [_init("m_w", (1, 12)), _init("m_b", (1,)), _init("v1_w", (6, 12)), _init("v1_b", (6,)),
             _init("v2_w", (1, 6)), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(nodes, "if_model", [_f32("x", [1, 3, 4])], [_f32("y", [1, 1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds_taking(model: onnx.ModelProto, branch: bool) -> dict[str, np.ndarray]:
    """Random inputs for which the If's condition is ``branch`` (found by onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name="c"), onnx.ValueInfoProto(name="p")])
    session = make_session(probe)
    for seed in range(200):
        x = np.random.default_rng(seed).standard_normal((1, 3, 4)).astype(np.float32)
        _, cond, p = run(session, {"x": x})
        # p away from 0 and 1: onnxruntime's Sigmoid approximation is ~1e-4 relative out there
        if bool(cond) == branch and 0.1 < float(p.reshape(-1)[0]) < 0.9:
            return {"x": x}
    raise AssertionError("no input takes that branch")


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("opset", [12, 13])
def test_if_data_dependent_condition(branch: bool, opset: int) -> None:
    model = _verifier_if_model(opset)
    bridged = convert(model)
    assert check_parity(model, bridged, feeds=_feeds_taking(model, branch), rtol=1e-5) <= 1e-5


def test_if_branch_weights_are_frozen_main_weights_trainable() -> None:
    """Branch weights are buffers (never trained, the export keeps them); the main Gemm's weight
    and bias stay trainable parameters, and the branch reads the bias live (trained values)."""
    model = _verifier_if_model()
    bridged = convert(model)
    params = dict(bridged.module.named_parameters())
    assert bridged.param_map["m_w"] in params and bridged.param_map["m_b"] in params
    assert not any("branch" in name for name in params)
    assert "v1_w" not in bridged.param_map  # copied into the branch as a constant
    feeds = _feeds_taking(model, True)
    x = torch.from_numpy(feeds["x"])
    with torch.no_grad():
        before = bridged.module(x).clone()
        params[bridged.param_map["m_b"]].add_(0.25)  # moves p (and the If input) and the branch's Gemm bias
        after = bridged.module(x)
    assert not torch.equal(before, after)


def test_if_condition_with_a_batch_is_refused() -> None:
    model = _verifier_if_model()
    bridged = convert(model)
    if_module = bridged.module.get_submodule(bridged.node_map["If_4"])
    outer = [torch.zeros(1, 3, 4), torch.zeros(1, 1)][:len(if_module.then_index) and 2]
    with pytest.raises(DataError, match="needs a batch of 1"):
        if_module(torch.ones(4, dtype=torch.bool), *outer)


def test_if_nested_and_multiple_outputs() -> None:
    """An If in a branch (reading the outermost input), two outputs, a branch reading an input and
    an enclosing-scope initializer."""
    inner = helper.make_node(
        "If", ["c2"], ["i_out"],
        then_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "t2", [], [_f32("n", [2, 3])]),
        else_branch=helper.make_graph([helper.make_node("Abs", ["x"], ["a"])], "e2", [], [_f32("a", [2, 3])]))
    then_branch = helper.make_graph(
        [helper.make_node("ReduceMin", ["x"], ["mn"], keepdims=0),
         helper.make_node("Less", ["mn", "zero"], ["c2"]), inner,
         helper.make_node("Mul", ["i_out", "x"], ["o2"])],
        "then", [], [_f32("i_out", [2, 3]), _f32("o2", [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["x_copy"]),
                                     helper.make_node("Add", ["x", "zero"], ["x_plus"])], "else", [],
                                    [_f32("x_copy", [2, 3]), _f32("x_plus", [2, 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y1", "y2"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "nested", [_f32("x", [2, 3])], [_f32("y1", [2, 3]), _f32("y2", [2, 3])],
                              initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)
    onnx.checker.check_model(model)
    bridged = convert(model)
    session = make_session(model)
    for x in ([[1.0, 2.0, -0.5], [0.5, 0.5, 0.5]], [[1.0, 2.0, 0.5], [0.5, 0.5, 0.5]], [[-1.0, -2.0, 0.5], [0, 0, 0]]):
        x = np.array(x, np.float32)
        with torch.no_grad():
            got = bridged.module(torch.from_numpy(x))
        for value, ref in zip(got, run(session, {"x": x})):
            np.testing.assert_array_equal(value.numpy(), ref)


# ---------------------------------------------------------------------------- Loop


def _decoder_loop_model(with_trip: bool, with_cond: bool) -> onnx.ModelProto:
    """An autoregressive decoder in the shape paddle2onnx writes (SLANet): a hidden state carried
    through a Loop whose body runs a MatMul + Tanh on it and the encoder's features (an
    enclosing-scope value), emits one step's output as a scan output, and stops when the step's
    score drops below a threshold or after M steps. As paddle2onnx does, a weight is a carried
    value the body returns unchanged."""
    body_nodes = [
        helper.make_node("MatMul", ["h_in", "w_carry"], ["hw"]),
        helper.make_node("Add", ["hw", "feat"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
        helper.make_node("ReduceMean", ["h_out"], ["score"], keepdims=0),
        helper.make_node("Greater", ["score", "limit"], ["cond_out"]),
        helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["h_out", "i_f"], ["step_out"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _f32("h_in", [1, 4]),
         _f32("w_carry", [4, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _f32("h_out", [1, 4]),
         _f32("w_carry", [4, 4]), _f32("step_out", [1, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["feat"]),
             helper.make_node("Loop", ["trip" if with_trip else "", "cond" if with_cond else "", "h0", "w_h"],
                              ["h_final", "w_final", "steps"], body=body)]
    inits = [_init("w_in", (3, 4)), _init("w_h", (4, 4)), numpy_helper.from_array(np.zeros((1, 4), np.float32), "h0"),
             numpy_helper.from_array(np.array(-0.2, np.float32), "limit"),
             numpy_helper.from_array(np.array(6, np.int64), "trip"),
             numpy_helper.from_array(np.array(True), "cond")]
    graph = helper.make_graph(nodes, "loop_model", [_f32("x", [1, 3])],
                              [_f32("h_final", [1, 4]), _f32("w_final", [4, 4]), _f32("steps", None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("with_trip,with_cond", [(True, True), (True, False)])
def test_loop_decoder(with_trip: bool, with_cond: bool) -> None:
    model = _decoder_loop_model(with_trip, with_cond)
    bridged = convert(model)
    session = make_session(model)
    lengths = set()
    for seed in range(6):
        x = np.random.default_rng(seed).standard_normal((1, 3)).astype(np.float32)
        with torch.no_grad():
            got = bridged.module(torch.from_numpy(x))
        ref = run(session, {"x": x})
        lengths.add(ref[2].shape[0])
        for value, expected in zip(got, ref):
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the body's condition, computed from data, ends the loop at different steps (onnxruntime
    # reads it even without a condition input)
    assert len(lengths) > 1


# ---------------------------------------------------------------------------- BatchNormalization


def test_batch_norm_with_computed_statistics_trains() -> None:
    """magika-v1 (tf2onnx): a LayerNorm written as BatchNormalization fed mean/var the graph
    computes. With gradients on, the statistics carry gradients (F.batch_norm refuses that): the
    module normalises by the formula, equal to onnxruntime."""
    model = _model(15, "(float[1,4,6] x) => (float y)",
                   "m = ReduceMean <axes=[0, 2], keepdims=0> (x)\n m3 = Unsqueeze (m, ax)\n c = Sub (x, m3)\n"
                   "sq = Mul (c, c)\n v = ReduceMean <axes=[0, 2], keepdims=0> (sq)\n"
                   "y = BatchNormalization <epsilon=0.001> (x, scale, bias, m, v)",
                   "<float[4] scale = {1.0, 2.0, 0.5, -1.0}, float[4] bias = {0.1, 0.2, 0.3, 0.4}, "
                   "int64[2] ax = {0, 2}>")
    bridged = convert(model)
    feeds = {"x": RNG.standard_normal((1, 4, 6)).astype(np.float32)}
    assert check_parity(model, bridged, feeds=feeds, rtol=1e-5) <= 1e-5
    x = torch.from_numpy(feeds["x"]).requires_grad_(True)
    out = bridged.module(x)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    np.testing.assert_allclose(out.detach().numpy(), run(make_session(model), feeds)[0], rtol=1e-5, atol=1e-5)
