"""Already-quantized models (issue 11 item 3): onnxruntime's dynamic quantization and QDQ
weights are rewritten back to float (graph_passes.dequantize), verified against the quantized
original within its activation quantization, then compressed as usual; the rest is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graph_passes import dequantize as dq
from graph_passes.dequantize import dequantize, quantized_ops
from graph_passes.errors import UnsupportedModelError, VerificationError
from graph_passes.ort_utils import make_session, random_feeds
from graph_passes.prepare import prepare_model
from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def _conv_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("MatMul", ["f", "w3"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b3"], ["y"])]
    inits = [_init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.3), _init("b1", rng.normal(size=8) * 0.1),
             _init("w2", rng.normal(size=(16, 8, 3, 3)) * 0.2), _init("b2", rng.normal(size=16) * 0.1),
             _init("w3", rng.normal(size=(16 * 4 * 4, 10)) * 0.1), _init("b3", rng.normal(size=10) * 0.1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _lstm_model(direction: str = "bidirectional") -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    dirs, hidden, size = (2 if direction == "bidirectional" else 1), 8, 6
    inits = [_init("W", rng.normal(size=(dirs, 4 * hidden, size)) * 0.4),
             _init("R", rng.normal(size=(dirs, 4 * hidden, hidden)) * 0.4),
             _init("B", rng.normal(size=(dirs, 8 * hidden)) * 0.1)]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0"], ["y", "yh"], hidden_size=hidden,
                              direction=direction, name="lstm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, size]),
                                           helper.make_tensor_value_info("h0", TensorProto.FLOAT, [dirs, 1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, dirs, 1, hidden]),
                               helper.make_tensor_value_info("yh", TensorProto.FLOAT, [dirs, 1, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _quantize(model: onnx.ModelProto, tmp_path: Path, per_channel: bool = False, **kwargs) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "float.onnx", tmp_path / f"quantized{int(per_channel)}.onnx"
    onnx.save(model, src)
    quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                     weight_type=QuantType.QInt8 if per_channel else QuantType.QUInt8, **kwargs)
    return onnx.load(dst)


def _outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return make_session(model).run(None, feeds)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_dynamic_conv_and_matmul_back_to_float(tmp_path, per_channel):
    floating = _conv_matmul_model()
    quantized = _quantize(floating, tmp_path, per_channel)
    assert quantized_ops(quantized) == {"DynamicQuantizeLinear": 3, "ConvInteger": 2, "MatMulInteger": 1}
    result = dequantize(quantized)
    assert result is not None and not quantized_ops(result.model)
    assert result.rewritten == {"ConvInteger": 2, "MatMulInteger": 1, "DynamicQuantizeLinear": 3}
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MatMul") == 1
    # the quantizer's "<name>_quant" nodes give their float layers the original names back
    assert {n.name for n in result.model.graph.node if n.op_type in ("Conv", "MatMul")} == {"conv1", "conv2", "fc"}
    # the weights are (w_int - zero_point) * scale, within half a weight step of the float original
    q_inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    d_inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    f_inits = {t.name: numpy_helper.to_array(t) for t in floating.graph.initializer}
    for name in ("w1", "w2", "w3"):
        w_int, zp, scale = (q_inits[f"{name}_{k}"] for k in ("quantized", "zero_point", "scale"))
        axis = (-1,) + (1,) * (w_int.ndim - 1) if name != "w3" else (-1,)
        zp = zp.reshape(axis) if zp.size > 1 else zp
        scale = scale.reshape(axis) if scale.size > 1 else scale
        np.testing.assert_array_equal(d_inits[name], (w_int.astype(np.float32) - zp) * scale)
        assert np.max(np.abs(d_inits[name] - f_inits[name]) / np.broadcast_to(scale, w_int.shape)) <= 0.5 + 1e-3
    assert per_channel == (np.size(q_inits["w3_scale"]) > 1)
    assert any(c.per_channel for c in result.checks) == per_channel
    # verified per layer: within the activation-quantization bound, and exact on the dequantized input
    assert len(result.checks) == 3 and all(c.ok for c in result.checks)
    assert all(0 < c.error <= c.bound for c in result.checks)
    assert all(c.emulated_error <= c.emulated_bound < 0.1 * c.bound for c in result.checks)
    feeds = random_feeds(make_session(floating), seed=3)
    got, original, quant = _outputs(result.model, feeds)[0], _outputs(floating, feeds)[0], _outputs(quantized, feeds)[0]
    # the float model is the original float model up to the weights' quantization, and closer to it than
    # the quantized model is (no activation quantization left)
    assert _rel(got, original) < 0.02
    assert _rel(got, original) < _rel(quant, original)
    assert 0 < result.output_rel_error < 0.05


def test_dynamic_lstm_back_to_float(tmp_path):
    floating = _lstm_model()
    quantized = _quantize(floating, tmp_path)
    assert quantized_ops(quantized) == {"DynamicQuantizeLSTM": 1}
    result = dequantize(quantized)
    assert result.rewritten == {"DynamicQuantizeLSTM": 1}
    (node,) = result.model.graph.node
    assert node.op_type == "LSTM" and node.domain == "" and node.name == "lstm"
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "direction")) == b"bidirectional"
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    f_inits = {t.name: numpy_helper.to_array(t) for t in floating.graph.initializer}
    q_inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for key in ("W", "R"):
        got = inits[node.input[1 if key == "W" else 2]]
        assert got.shape == f_inits[key].shape  # back to ONNX LSTM's [dirs, 4*hidden, size] layout
        step = q_inits[f"{key}_scale"].reshape(-1, 1, 1)
        assert np.max(np.abs(got - f_inits[key]) / step) <= 0.5 + 1e-3
    (check,) = result.checks
    assert check.op == "DynamicQuantizeLSTM" and check.ok and 0 < check.error <= check.bound
    # one step on the original's own quantization of x_t and h_{t-1}: float rounding only
    assert check.emulated_error <= check.emulated_bound < 0.01 * check.bound
    feeds = random_feeds(make_session(floating), seed=2)
    got, original, quant = _outputs(result.model, feeds), _outputs(floating, feeds), _outputs(quantized, feeds)
    assert _rel(got[0], original[0]) < 0.02
    assert _rel(got[0], original[0]) < _rel(quant[0], original[0])


def test_a_wrong_dequantization_is_caught(tmp_path, monkeypatch):
    """One weight step off in one weight: inside the loose float bound, caught by the check on the
    original's own dequantized input."""
    quantized = _quantize(_conv_matmul_model(), tmp_path)
    real = dq._match_integer

    def off_by_one_step(node, *args):
        found = real(node, *args)
        if not isinstance(found, str) and found.op == "MatMulInteger":
            found.weight = found.weight + found.w_scale[0]
        return found

    monkeypatch.setattr(dq, "_match_integer", off_by_one_step)
    with pytest.raises(VerificationError, match="MatMulInteger.*dequantized input"):
        dequantize(quantized)


def test_a_wrong_lstm_dequantization_is_caught(tmp_path, monkeypatch):
    quantized = _quantize(_lstm_model(), tmp_path)
    real = dq._match_lstm
    step = float(numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == "R_scale"))[1])

    def off_by_one_step(node, *args):
        found = real(node, *args)
        found.r[1, 3, 2] += step  # one recurrent weight of the reverse direction, one step off
        return found

    monkeypatch.setattr(dq, "_match_lstm", off_by_one_step)
    with pytest.raises(VerificationError, match="DynamicQuantizeLSTM.*dequantized input"):
        dequantize(quantized)


def _qlinear_conv_model() -> onnx.ModelProto:
    u8 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.uint8), name)  # noqa: E731
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="qconv"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    inits = [f32("xs", 0.02), u8("xz", 128), u8("w", np.random.default_rng(0).integers(0, 255, (4, 3, 1, 1))),
             f32("ws", 0.01), u8("wz", 128), f32("ys", 0.05), u8("yz", 128)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_qoperator_models_are_refused_in_one_line(tmp_path):
    model = _qlinear_conv_model()
    with pytest.raises(UnsupportedModelError, match="1 QLinearConv") as info:
        dequantize(model)
    assert "float model" in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "qlinear.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--no-bridge"])
    assert result.exit_code == UnsupportedModelError.exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "QLinearConv" in lines[0] and "Traceback" not in result.output


def test_static_qdq_weights_become_float_initializers():
    rng = np.random.default_rng(0)
    w_int = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    scale = np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w_int, "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = dequantize(model)
    assert result.rewritten == {"DequantizeLinear (weights)": 1}
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    w = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(w, w_int.astype(np.float32) * scale.reshape(-1, 1, 1, 1))
    feeds = random_feeds(make_session(model))
    np.testing.assert_array_equal(_outputs(result.model, feeds)[0], _outputs(model, feeds)[0])
    prepared = prepare_model(model)
    assert len(prepared.analysis.layers) == 1 and prepared.dequantized is not None


def test_static_qdq_model_back_to_float(tmp_path):
    """onnxruntime's static QDQ format: weights are DequantizeLinear of integers, activations
    QuantizeLinear -> DequantizeLinear pairs whose range stands in for the Relus it removed."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    floating = _conv_matmul_model()
    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(floating, src)
    quantize_static(str(src), str(dst), Calibration(), quant_format=QuantFormat.QDQ)
    quantized = onnx.load(dst)
    assert "Relu" not in {n.op_type for n in quantized.graph.node}
    result = dequantize(quantized)
    pairs = result.rewritten["QuantizeLinear/DequantizeLinear (activations)"]
    assert result.rewritten["DequantizeLinear (weights)"] == 6 and pairs >= 4
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and ops.count("Clip") == pairs
    assert all(c.ok and c.error <= c.bound for c in result.checks) and len(result.checks) == pairs
    # on a calibration input (inside the calibrated ranges) the float model again, up to weight quantization
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    assert _rel(_outputs(result.model, feeds)[0], _outputs(floating, feeds)[0]) < 0.05
    # elsewhere the calibrated ranges clip, as in the quantized original
    feeds = random_feeds(make_session(floating), seed=5)
    assert _rel(_outputs(result.model, feeds)[0], _outputs(quantized, feeds)[0]) < 0.05
    prepared = prepare_model(str(dst))
    assert prepared.analysis.prunable_groups and not prepared.analysis.unknown_ops


def test_the_older_quantizers_integer_bias_is_folded_back():
    """onnx.quantize 0.1 (ddddocr's common_old.onnx): the bias is Cast(Floor(b / (x_scale * w_scale)))
    added to the integer accumulator before the Cast to float."""
    rng = np.random.default_rng(4)
    w_int = rng.integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)
    bias = rng.normal(size=4).astype(np.float32)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("Mul", ["xs", "ws"], ["bs"]),
             helper.make_node("Div", ["b", "bs"], ["bd"]),
             helper.make_node("Floor", ["bd"], ["bf"]),
             helper.make_node("Cast", ["bf"], ["bi"], to=TensorProto.INT32),
             helper.make_node("Reshape", ["bi", "shape"], ["br"]),
             helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["acc"], pads=[1, 1, 1, 1], name="Conv_0_quant"),
             helper.make_node("Add", ["acc", "br"], ["acc_b"]),
             helper.make_node("Cast", ["acc_b"], ["acc_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["scales"]),
             helper.make_node("Mul", ["acc_f", "scales"], ["y"])]
    inits = [numpy_helper.from_array(w_int, "wq"), numpy_helper.from_array(np.array(128, np.uint8), "wz"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    result = dequantize(model)
    (node,) = result.model.graph.node
    assert node.op_type == "Conv" and node.name == "Conv_0" and len(node.input) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(inits[node.input[2]], bias)
    np.testing.assert_array_equal(inits[node.input[1]], (w_int.astype(np.float32) - 128) * np.float32(0.01))
    (check,) = result.checks
    assert check.ok and check.emulated_error <= check.emulated_bound


def test_dynamic_quantize_matmul_back_to_float():
    """com.microsoft DynamicQuantizeMatMul (onnxruntime's fusion of DynamicQuantizeLinear + MatMulInteger),
    per-column scales and a bias."""
    rng = np.random.default_rng(6)
    w_int = rng.integers(-127, 128, (16, 5)).astype(np.int8)
    scale = rng.uniform(0.005, 0.02, 5).astype(np.float32)
    zp = rng.integers(-3, 4, 5).astype(np.int8)
    bias = rng.normal(size=5).astype(np.float32)
    node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "bs", "bz", "bias"], ["y"], domain="com.microsoft",
                            name="fc_quant")
    inits = [numpy_helper.from_array(w_int, "b"), numpy_helper.from_array(scale, "bs"),
             numpy_helper.from_array(zp, "bz"), numpy_helper.from_array(bias, "bias")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    result = dequantize(model)
    assert result.rewritten == {"DynamicQuantizeMatMul": 1}
    assert [(n.op_type, n.name) for n in result.model.graph.node] == [("MatMul", "fc"), ("Add", "fc_bias")]
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(inits[result.model.graph.node[0].input[1]],
                                  (w_int.astype(np.float32) - zp.astype(np.float32)) * scale)
    (check,) = result.checks
    assert check.per_channel and check.ok and check.emulated_error <= check.emulated_bound < 0.1 * check.bound


def test_a_float_model_is_left_alone():
    assert dequantize(_conv_matmul_model()) is None


def test_inspect_says_what_was_dequantized(tmp_path):
    quantized = _quantize(_conv_matmul_model(), tmp_path)
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--no-bridge"])
    assert result.exit_code == 0, result.output
    assert "dequantized to float (2 ConvInteger, 1 MatMulInteger, 3 DynamicQuantizeLinear); verified" in result.stdout
    assert "3 weight layers" in result.stdout
    result = CliRunner().invoke(main, ["inspect", str(path), "--no-bridge", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["normalisation"]["dequantized"].startswith("dequantized to float")
    assert report["totals"]["weight_layers"] == 3


@pytest.mark.slow
def test_compress_a_dynamically_quantized_model_end_to_end(tmp_path):
    """The digits CNN quantized by onnxruntime (uint8 weights: about a third of the float file)
    compresses end to end from its dequantized float form."""
    from onnxruntime.quantization import quantize_dynamic

    source = tmp_path / "digits_dynamic.onnx"
    quantize_dynamic(str(DIGITS / "model.onnx"), str(source))
    target = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compress", str(source), "--data", str(DIGITS / "train.npz"), "-o", str(target),
                                       "--json", "--epochs", "1", "--finetune-epochs", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gate"]["samples"] > 0  # the gate raises when it fails: exit 0 means it passed
    assert report["dequantized"].startswith("dequantized to float (5 ConvInteger, 1 MatMulInteger")
    onnx.checker.check_model(onnx.load(target), full_check=True)
    assert target.stat().st_size < source.stat().st_size  # measured: 16.6 kB from the 58.9 kB quantized input


def test_the_verification_reads_the_defined_integer_arithmetic():
    """onnxruntime's uint8 x int8 kernels saturate on x86 CPUs without VNNI (255 * 127 * 2 >
    32767 in an int16 pair sum); the copy the verification runs stores the int8 weight as uint8
    (q + 128, zero point + 128), which every CPU computes exactly (measured under qemu -cpu
    Haswell: 1,048,544 for 2,072,640 from the int8 model, exact from the copy)."""
    k = 64
    w = np.full((k, 4), 127, np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4])],
                              [numpy_helper.from_array(w, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    copy = dq._unsaturating(model)
    inits = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
    (mm,) = copy.graph.node
    assert inits[mm.input[1]].dtype == np.uint8 and int(inits[mm.input[3]]) == 128
    a = np.full((2, k), 255, np.uint8)
    got = make_session(copy).run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, np.full((2, 4), 255 * 127 * k, np.int32))
    assert len(model.graph.initializer) == 1  # the model itself is left alone
