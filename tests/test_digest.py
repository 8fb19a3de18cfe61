"""graph_passes.digest.model_digest: the same for the same function, different otherwise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graph_passes.digest import model_digest

from .graph_helpers import build

ROOT = Path(__file__).resolve().parents[1]
TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
  t = Conv <pads=[1,1,1,1]> (x, w, b)
  y = Relu(t)
}
"""


def _model() -> onnx.ModelProto:
    model = build(TEXT, w=[4, 3, 3, 3], b=[4])
    model.graph.node[0].name = "conv"
    model.graph.node[1].name = "relu"
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_is_sha256_hex():
    d = model_digest(_model())
    assert len(d) == 64 and int(d, 16) >= 0
    assert model_digest(_model()) == d  # deterministic


def test_shape_inference_does_not_change_it():
    model = _model()
    inferred = onnx.shape_inference.infer_shapes(model)
    assert len(inferred.graph.value_info) > len(model.graph.value_info)
    assert model_digest(inferred) == model_digest(model)


def test_producer_doc_strings_and_metadata_do_not_change_it():
    model = _model()
    other = _copy(model)
    other.producer_name, other.producer_version, other.doc_string = "someone", "9.9", "docs"
    other.model_version = 7
    other.graph.doc_string = "graph docs"
    other.graph.name = "renamed_graph"
    other.graph.node[0].doc_string = "a conv"
    onnx.helper.set_model_props(other, {"author": "me"})
    assert model_digest(other) == model_digest(model)


def test_initializer_order_does_not_change_it():
    model = _model()
    other = _copy(model)
    inits = list(other.graph.initializer)[::-1]
    del other.graph.initializer[:]
    other.graph.initializer.extend(inits)
    assert model_digest(other) == model_digest(model)


def test_one_weight_value_changes_it():
    model = _model()
    other = _copy(model)
    w = numpy_helper.to_array(_init(other, "w")).copy()
    w[1, 2, 0, 0] += np.float32(1e-3)
    _init(other, "w").CopyFrom(numpy_helper.from_array(w, "w"))
    assert model_digest(other) != model_digest(model)


@pytest.mark.parametrize("name,value", [("pads", [0, 0, 0, 0]), ("strides", [1, 1]), ("group", 1)])
def test_one_attribute_changes_it(name, value):
    model = _model()
    other = _copy(model)
    node = other.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    assert model_digest(other) != model_digest(model)


def test_node_names_inputs_and_opset_change_it():
    model = _model()
    base = model_digest(model)
    renamed = _copy(model)
    renamed.graph.node[0].name = "conv2"
    assert model_digest(renamed) != base
    opset = _copy(model)
    opset.opset_import[0].version = 18
    assert model_digest(opset) != base
    input_type = _copy(model)
    input_type.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    assert model_digest(input_type) != base


def test_attribute_order_does_not_change_it():
    model = _model()
    other = _copy(model)
    node = other.graph.node[0]
    node.attribute.extend([helper.make_attribute("strides", [1, 1])])
    reordered = _copy(other)
    attrs = list(reordered.graph.node[0].attribute)[::-1]
    del reordered.graph.node[0].attribute[:]
    reordered.graph.node[0].attribute.extend(attrs)
    assert model_digest(reordered) == model_digest(other)


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16,
                                   onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8])
def test_raw_data_and_typed_fields_digest_alike(dtype):
    rng = np.random.default_rng(0)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    values = (rng.standard_normal((3, 5)) * 10).astype(np_type)
    raw = helper.make_tensor("c", dtype, values.shape, values.tobytes(), raw=True)
    typed = helper.make_tensor("c", dtype, values.shape, values.reshape(-1).tolist() if dtype != onnx.TensorProto.FLOAT16
                               else values.reshape(-1), raw=False)
    assert not typed.raw_data and raw.raw_data
    np.testing.assert_array_equal(numpy_helper.to_array(raw), numpy_helper.to_array(typed))

    def model_with(t):
        graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"], name="id")], "g", [],
                                  [helper.make_tensor_value_info("y", dtype, [3, 5])], [t])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert model_digest(model_with(raw)) == model_digest(model_with(typed))


def test_subgraph_attributes_are_hashed():
    def model(threshold: float):
        then_c = helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.array([threshold], np.float32)))
        else_c = helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.array([0.0], np.float32)))
        out = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])
        node = helper.make_node("If", ["cond"], ["y"], name="if",
                                then_branch=helper.make_graph([then_c], "then", [], [out]),
                                else_branch=helper.make_graph([else_c], "else", [], [out]))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert model_digest(model(1.0)) == model_digest(model(1.0))
    assert model_digest(model(1.0)) != model_digest(model(2.0))
    inferred = onnx.shape_inference.infer_shapes(model(1.0))
    assert model_digest(inferred) == model_digest(model(1.0))


def test_external_data_must_be_loaded_first(tmp_path):
    model = _model()
    expected = model_digest(model)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(ValueError, match="external data"):
        model_digest(lazy)
    assert model_digest(onnx.load(tmp_path / "m.onnx")) == expected


def test_the_samples_survive_a_save_load_round_trip(tmp_path):
    model = onnx.load(ROOT / "samples" / "digits" / "model.onnx")
    expected = model_digest(model)
    onnx.save_model(model, tmp_path / "copy.onnx", save_as_external_data=True, location="copy.data",
                    size_threshold=0)
    assert model_digest(onnx.load(tmp_path / "copy.onnx")) == expected


def test_a_100mb_model_digests_quickly():
    w = np.random.default_rng(0).standard_normal((25_000_000,), dtype=np.float32)  # 100 MB
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"], name="id")], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [w.size])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    start = time.perf_counter()
    model_digest(model)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"{elapsed:.2f}s for 100 MB"
