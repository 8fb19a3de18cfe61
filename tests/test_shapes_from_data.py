"""Symbolic input dims pinned from `--data` (issue 16): a model with symbolic H, W compresses
without `--input-shape`; a data shape that contradicts a static dim is one DataError line (exit
10) and nothing is written; `--input-shape` still overrides the data."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from plugin import api
from plugin.cli import main

QUICK = ["--epochs", "1", "--finetune-epochs", "1", "--no-progress", "--strategy", "uniform",
         "--weight-bits", "0,8"]


def _model(path, channels: int = 1) -> str:
    """x [N, C, H, W] (N, H, W symbolic) -> Conv 3x3 (8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, channels, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "symbolic_hw",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def _data(path, shape) -> str:
    np.savez(path, x=np.random.default_rng(1).normal(size=shape).astype(np.float32))
    return str(path)


def _run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _input_dims(path) -> list:
    value = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in value]


def test_symbolic_hw_compresses_with_data_alone(tmp_path):
    model = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d.npz", (40, 1, 6, 5))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m_pq.onnx"
    code, stdout, err = _run("compress", model, "--data", data, "-o", str(out), *QUICK)
    assert code == 0, err
    assert _input_dims(out) == ["N", 1, 6, 5]  # H, W from the data; the batch dim stays dynamic
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((3, 1, 6, 5), np.float32)})[0].shape == (3, 4)
    report = json.loads((tmp_path / "out" / "m_pq.report.json").read_text())
    assert report["quality"]["dynamic_batch_restored"] is True

    # export with --data pins the same way (no --input-shape)
    again = tmp_path / "out" / "again.onnx"
    code, _, err = _run("export", model, "--plan", str(tmp_path / "out" / "m_pq.plan.json"), "-o", str(again),
                        "--data", data, "--no-progress")
    assert code == 0, err
    assert _input_dims(again) == ["N", 1, 6, 5]


def test_without_data_shapes_the_message_still_asks_for_input_shape(tmp_path):
    model = _model(tmp_path / "m.onnx")
    code, _, err = _run("inspect", model)
    assert code == 4 and "--input-shape" in err


@pytest.mark.parametrize("shape, needle", [((20, 3, 6, 5), "fixes dim 1 to 1"),
                                           ((20, 6, 5), "rank 3")])
def test_contradicting_data_is_one_data_error_and_writes_nothing(tmp_path, shape, needle):
    model = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d.npz", shape)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stdout, err = _run("compress", model, "--data", data, "-o", str(out_dir / "m.onnx"), *QUICK)
    lines = err.strip().splitlines()
    assert code == 10, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0] and "'x'" in lines[0], lines[0]
    assert os.listdir(out_dir) == []


def test_input_shape_overrides_the_data(tmp_path):
    model = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d.npz", (40, 1, 6, 5))
    # the explicit pin wins: data of another size is then refused by the data check, naming the shape
    code, _, err = _run("compress", model, "--data", data, "--input-shape", "x=1x1x7x7",
                        "-o", str(tmp_path / "a.onnx"), *QUICK)
    assert code == 10 and "expects [N,1,7,7]" in err, err
    assert not (tmp_path / "a.onnx").exists()
    # and with matching data it is used as given (batch pinned by the user: static in the output)
    data7 = _data(tmp_path / "d7.npz", (40, 1, 7, 7))
    code, _, err = _run("compress", model, "--data", data7, "--input-shape", "x=1x1x7x7",
                        "-o", str(tmp_path / "b.onnx"), *QUICK)
    assert code == 0, err
    assert _input_dims(tmp_path / "b.onnx")[1:] == [1, 7, 7]


def test_pins_from_in_memory_data_and_headers(tmp_path):
    model = _model(tmp_path / "m.onnx", channels=2)
    x = np.zeros((5, 2, 9, 4), np.float32)
    assert api._data_input_shapes(model, {"x": x, "labels": np.zeros(5)}, {}) == ({"x": [1, 2, 9, 4]}, {"x": "N"})
    assert api._data_input_shapes(model, [x], {})[0] == {"x": [1, 2, 9, 4]}
    np.save(tmp_path / "x.npy", x)
    assert api._data_input_shapes(model, str(tmp_path / "x.npy"), {})[0] == {"x": [1, 2, 9, 4]}
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", x=x)
    assert api._data_input_shapes(model, str(folder), {})[0] == {"x": [1, 2, 9, 4]}
    # named explicitly: not pinned from the data
    assert api._data_input_shapes(model, {"x": x}, {"x": [1, 2, 3, 3]}) == ({}, {})
