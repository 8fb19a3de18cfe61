"""Bridge converters for GlobalMaxPool, OneHot, Clip with run-time / absent bounds, and control
flow (If), each against onnxruntime through the bridge's own parity check."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx.shape_inference
import pytest

from plugin.bridge import check_parity, convert

RTOL = 1e-6
RNG = np.random.default_rng(0)


def _model(opset: int, signature: str, body: str, inits: str = "") -> onnx.ModelProto:
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\nagraph {signature} {inits} {{ {body} }}'
    model = onnx.parser.parse_model(text)
    for output in model.graph.output:  # "float y" parses as rank 0: leave the shape to inference
        output.type.tensor_type.ClearField("shape")
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


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
