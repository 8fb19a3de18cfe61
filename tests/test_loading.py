"""Safe loading: every bad input gives one typed, one-line error; good inputs load static."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import loading, ort_utils
from graph_passes.errors import (
    ExternalDataError,
    InputFileError,
    InputShapeError,
    ModelLoadError,
    PrunequantError,
    UnsupportedModelError,
)
from graph_passes.loading import check_runnable, load_model
from graph_passes.shapes import (
    parse_input_shape,
    parse_input_shapes,
    static_input_shapes,
    tensor_shape,
)

STATIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) {
  r = Relu(x)
  y = Add(r, w)
}
"""

SYMBOLIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch,3,h,w] x) => (float[batch,3,h,w] y) {
  y = Relu(x)
}
"""


def _model(text: str = STATIC, weight: np.ndarray | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    if weight is not None:
        model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    return model


def _static_model() -> onnx.ModelProto:
    return _model(STATIC, np.arange(4, dtype=np.float32).reshape(1, 4))


def _raises(exc_type: type[PrunequantError], fn, *args, match: tuple[str, ...] = (), **kwargs):
    """Assert the error type, a single-line message, and that it names the problem."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = info.value.message
    assert "\n" not in message and "\n" not in str(info.value), message
    for needle in match:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def _save(tmp_path, model: onnx.ModelProto, name: str = "model.onnx") -> str:
    path = str(tmp_path / name)
    onnx.save_model(model, path)
    return path


def _save_external(directory, model: onnx.ModelProto, location: str = "w.bin") -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def _set_location(path: str, location: str) -> None:
    model = onnx.load_model(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, path)


# ---------------------------------------------------------------- good sources


def test_loads_from_path_bytes_and_modelproto(tmp_path):
    model = _static_model()
    path = _save(tmp_path, model)
    for source in (path, tmp_path / "model.onnx", model.SerializeToString(), model):
        loaded = load_model(source)
        assert [n.op_type for n in loaded.graph.node] == ["Relu", "Add"]
        assert tensor_shape(loaded, "r") == [1, 4]  # value_info from shape inference
    assert not model.graph.value_info  # the caller's ModelProto is never mutated


def test_loaded_model_runs_like_the_original():
    model = _static_model()
    feeds = {"x": np.array([[-1, 2, -3, 4]], np.float32)}
    got = ort_utils.run(load_model(model), feeds)[0]
    np.testing.assert_array_equal(got, np.maximum(feeds["x"], 0) + np.arange(4))


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    _raises(InputFileError, load_model, str(tmp_path / "nope.onnx"),
            match=("nope.onnx", "does not exist"))


def test_directory(tmp_path):
    _save(tmp_path, _static_model(), "inner.onnx")
    _raises(InputFileError, load_model, str(tmp_path), match=("is a directory", "inner.onnx"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _raises(InputFileError, load_model, str(path), match=("empty.onnx", "empty (0 bytes)"))


def test_empty_bytes():
    _raises(InputFileError, load_model, b"", match=("empty",))


def test_unreadable_file(tmp_path, monkeypatch):
    path = _save(tmp_path, _static_model())
    if os.geteuid() == 0:  # root reads whatever the permissions: make open() refuse instead

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(loading, "open", refuse, raising=False)
    else:
        os.chmod(path, 0)
    _raises(InputFileError, load_model, path, match=("cannot read", "Permission denied"))


def test_text_file_renamed_onnx(tmp_path):
    path = tmp_path / "readme.onnx"
    path.write_text("This is a README, not a model.\nSecond line.\n")
    _raises(InputFileError, load_model, str(path),
            match=("readme.onnx", "not an ONNX model", "text"))


def test_jpeg_renamed_onnx(tmp_path):
    path = tmp_path / "cat.onnx"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)) * 4)
    _raises(InputFileError, load_model, str(path), match=("cat.onnx", "JPEG"))


def test_garbage_that_protobuf_parses_is_not_a_model(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07\x12\x03abc")  # valid wire format: ir_version=7, a string, no graph
    _raises(InputFileError, load_model, str(path), match=("garbage.onnx", "not an ONNX model"))


def test_truncated_model(tmp_path):
    data = _static_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _raises(ModelLoadError, load_model, str(path), match=("cut.onnx", "truncated"))


def test_unsupported_source_type():
    _raises(InputFileError, load_model, 42, match=("int",))


# ---------------------------------------------------------------- versions and checker


def test_checker_undefined_input():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y) {
      y = Add(x, missing)
    }
    """)
    _raises(ModelLoadError, load_model, model, match=("onnx checker", "missing"))


def test_checker_wrong_attribute_type():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y) {
      y = Softmax<axis = 1.5>(x)
    }
    """)
    _raises(ModelLoadError, load_model, model, match=("onnx checker", "axis"))
    assert load_model(model, check=False).graph.node[0].op_type == "Softmax"


def test_opset_newer_than_onnx_knows():
    model = _static_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    _raises(ModelLoadError, load_model, model,
            match=(f"opset {model.opset_import[0].version}", "upgrade onnx"))


def test_ml_opset_newer_than_onnx_knows():
    model = _static_model()
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 99))
    _raises(ModelLoadError, load_model, model, match=("ai.onnx.ml", "99"))


def test_ir_version_newer_than_onnx_knows():
    model = _static_model()
    model.ir_version = onnx.IR_VERSION + 1
    _raises(ModelLoadError, load_model, model,
            match=(f"IR version {onnx.IR_VERSION + 1}", "upgrade onnx"))


# ---------------------------------------------------------------- external data


def test_external_data_ok(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    loaded = load_model(path)
    weight = loaded.graph.initializer[0]
    assert weight.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(weight), np.arange(4).reshape(1, 4))


def test_external_data_in_subdirectory_and_constant_attribute(tmp_path):
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y) {
      c = Constant<value = float[1,4] {1, 2, 3, 4}>()
      y = Add(x, c)
    }
    """)
    directory = tmp_path / "m"
    directory.mkdir()
    path = str(directory / "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="data/c.bin",
                    size_threshold=0, convert_attribute=True)
    loaded = load_model(path)
    value = numpy_helper.to_array(loaded.graph.node[0].attribute[0].t)
    np.testing.assert_array_equal(value, [[1, 2, 3, 4]])


def test_external_data_missing(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    os.remove(tmp_path / "m" / "w.bin")
    _raises(ExternalDataError, load_model, path, match=("tensor 'w'", "w.bin", "does not exist"))


def test_external_data_too_short(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    with open(tmp_path / "m" / "w.bin", "r+b") as handle:
        handle.truncate(8)
    _raises(ExternalDataError, load_model, path, match=("tensor 'w'", "truncated"))


def test_external_data_escaping_with_dotdot(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    shutil.copy(tmp_path / "m" / "w.bin", tmp_path / "w.bin")
    _set_location(path, "../w.bin")
    _raises(ExternalDataError, load_model, path, match=("tensor 'w'", "../w.bin", "'..'"))


def test_external_data_absolute_path(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    _set_location(path, str(tmp_path / "m" / "w.bin"))
    _raises(ExternalDataError, load_model, path, match=("tensor 'w'", "absolute path"))


def test_external_data_symlink_outside(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    os.replace(tmp_path / "m" / "w.bin", tmp_path / "secret.bin")
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "w.bin")
    _raises(ExternalDataError, load_model, path, match=("tensor 'w'", "symlink", "outside"))


def test_external_data_escaping_from_a_subgraph(tmp_path):
    model = _if_model()
    model.graph.node[0].attribute[0].g.node[0].attribute[0].t.CopyFrom(_external_tensor("../x"))
    _raises(ExternalDataError, load_model, model, base_dir=tmp_path, match=("'..'", "Constant"))


def test_external_data_from_bytes_needs_a_base_dir(tmp_path):
    path = _save_external(tmp_path / "m", _static_model())
    with open(path, "rb") as handle:
        data = handle.read()
    _raises(ExternalDataError, load_model, data, match=("tensor 'w'", "base_dir"))
    assert len(load_model(data, base_dir=tmp_path / "m").graph.initializer[0].raw_data) == 16


def _external_tensor(location: str) -> onnx.TensorProto:
    return _external("c", [1], location)


def _external(name: str, dims: list[int], location: str) -> onnx.TensorProto:
    """A float tensor whose data lives in ``location`` (offset 0)."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * np.prod(dims)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


# ---------------------------------------------------------------- input shapes


def test_symbolic_dims_without_pins():
    message = _raises(InputShapeError, load_model, _model(SYMBOLIC))
    assert message.startswith(
        "input 'x' has symbolic dims ['batch', 'h', 'w'] (shape [batch,3,h,w]); "
        "pin them with --input-shape x=1x3xHxW"
    )


def test_pinned_dims_make_everything_static():
    loaded = load_model(_model(SYMBOLIC), {"x": [2, 3, 8, 8]})
    assert static_input_shapes(loaded) == {"x": [2, 3, 8, 8]}
    assert tensor_shape(loaded, "y") == [2, 3, 8, 8]  # the stale symbolic output is replaced


def test_pin_wrong_input_name():
    _raises(InputShapeError, load_model, _model(SYMBOLIC), {"image": [1, 3, 8, 8]},
            match=("'image'", "['x']"))


def test_pin_wrong_rank():
    _raises(InputShapeError, load_model, _model(SYMBOLIC), {"x": [1, 3, 8]},
            match=("rank 3", "rank 4"))


def test_pin_contradicts_fixed_dim():
    _raises(InputShapeError, load_model, _model(SYMBOLIC), {"x": [1, 4, 8, 8]},
            match=("dim 1", "fixes it to 3"))


def test_pin_that_the_graph_cannot_take():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,K] x) => (float[N,2] y) {
      y = MatMul(x, w)
    }
    """, np.ones((4, 2), np.float32))
    _raises(InputShapeError, load_model, model, {"x": [1, 5]}, match=("--input-shape", "MatMul"))
    assert tensor_shape(load_model(model, {"x": [1, 4]}), "y") == [1, 2]


def test_initializers_listed_as_inputs_are_not_inputs():
    model = onnx.parser.parse_model("""
    <ir_version: 4, opset_import: ["" : 11]>
    g (float[1,4] x, float[1,4] w) => (float[1,4] y) {
      y = Add(x, w)
    }
    """)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 4), np.float32), "w"))
    assert static_input_shapes(load_model(model)) == {"x": [1, 4]}
    _raises(InputShapeError, load_model, model, {"w": [1, 4]}, match=("'w'", "['x']"))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("x", "no '='"),
        ("=1x3", "no input name"),
        ("x=", "no dims"),
        ("x=1x3xax4", "'a' is not an integer"),
        ("x=1x3x2.5", "not an integer"),
        ("x=1x0x4", "positive"),
        ("x=1x-3", "positive"),
        ("x=1x3,224", "not an integer"),
    ],
)
def test_bad_input_shape_texts(text, needle):
    _raises(InputShapeError, parse_input_shape, text, match=(needle, "NAME=D1xD2"))


def test_input_shape_texts():
    assert parse_input_shape("x=1x3x224x224") == ("x", [1, 3, 224, 224])
    assert parse_input_shape(" input_1:0 = 1X3 ") == ("input_1:0", [1, 3])
    assert parse_input_shape("a=b=2x2") == ("a=b", [2, 2])
    assert parse_input_shapes(["a=1", "b=2x3"]) == {"a": [1], "b": [2, 3]}
    _raises(InputShapeError, parse_input_shapes, ["a=1", "a=2"], match=("twice",))


# ---------------------------------------------------------------- runnable in onnxruntime


def test_custom_domain_op_is_not_runnable():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17, "com.acme" : 1]>
    g (float[1,4] x) => (float[1,4] y) {
      a = com.acme.Frobnicate(x)
      b = com.acme.Frobnicate(a)
      y = Relu(b)
    }
    """)
    loaded = load_model(model)  # loading is fine; running is not
    _raises(UnsupportedModelError, check_runnable, loaded,
            match=("'Frobnicate'", "'com.acme'", "2 nodes"))


def test_standard_and_contrib_ops_are_runnable():
    check_runnable(load_model(_static_model()))
    contrib = _model("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1,4] x) => (float[1,4] y) {
      y = com.microsoft.Gelu(x)
    }
    """)
    check_runnable(load_model(contrib))


def test_unknown_contrib_op_is_not_runnable():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1,4] x) => (float[1,4] y) {
      y = com.microsoft.NoSuchOp(x)
    }
    """)
    _raises(UnsupportedModelError, check_runnable, model, match=("'NoSuchOp'", "1 node"))


def test_opset_onnxruntime_does_not_support():
    model = _static_model()
    model.opset_import[0].version = 99
    _raises(UnsupportedModelError, check_runnable, model, match=("onnxruntime", "opset"))


# ---------------------------------------------------------------- control flow


def _scalar_first_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """The text parser reads ``bool[]`` as 'rank unknown'; make the first input a scalar."""
    model.graph.input[0].type.tensor_type.shape.SetInParent()
    return model


def _if_model() -> onnx.ModelProto:
    return _scalar_first_input(_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool[] c, float[1,4] x) => (float[1,4] y) {
      y = If(c) <then_branch = t () => (float[1,4] o) {
                    k = Constant<value = float[1] {2}>()
                    o = Mul(x, k)
                 },
                 else_branch = e () => (float[1,4] o) { o = Neg(x) }>
    }
    """))


def test_if_model_loads():
    loaded = load_model(_if_model())
    assert loaded.graph.node[0].op_type == "If"
    check_runnable(loaded)


def test_loop_model_loads_and_runs():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[] n, float[1,4] x) => (float[1,4] y) {
      cond = Constant<value = bool {1}>()
      y = Loop(n, cond, x) <body = b (int64 i, bool c, float[1,4] acc)
                                  => (bool c2, float[1,4] out) {
                                c2 = Identity(c)
                                out = Add(acc, acc)
                            }>
    }
    """)
    body = model.graph.node[1].attribute[0].g
    for value in (body.input[0], body.input[1], body.output[0]):
        value.type.tensor_type.shape.SetInParent()  # iteration count and condition are scalars
    loaded = load_model(_scalar_first_input(model))
    assert loaded.graph.node[1].op_type == "Loop"
    got = ort_utils.run(loaded, {"n": np.array(3), "x": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_array_equal(got, np.full((1, 4), 8.0))


# ---------------------------------------------------------------- > 2 GiB paths, cheaply


def test_large_in_memory_model_paths(monkeypatch):
    """The > 2 GiB code paths (checker through a file, inference on a stripped proto), with the
    limit lowered so a 16 KiB weight counts as large."""
    monkeypatch.setattr(loading, "_PROTO_LIMIT", 8 * 1024)
    weight = np.arange(4096, dtype=np.float32).reshape(1, 4096)
    model = _model(STATIC.replace("[1,4]", "[1,4096]"), weight)
    loaded = load_model(model)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    assert tensor_shape(loaded, "r") == [1, 4096]
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].input[1] = "missing"
    _raises(ModelLoadError, load_model, broken, match=("onnx checker", "missing"))


def test_make_session_leaves_a_large_model_intact(monkeypatch):
    monkeypatch.setattr(ort_utils, "_PROTO_LIMIT", 8 * 1024)
    weight = np.ones((1, 4096), np.float32)
    model = _model(STATIC.replace("[1,4]", "[1,4096]"), weight)
    ort_utils.make_session(model)
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


# ---------------------------------------------------------------- > 2 GiB for real

_ROWS, _COLS = 16400, 32768  # float32: 2,149,580,800 bytes, just over 2 GiB


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def private_tmp(monkeypatch):
    """A temp dir for the test and for every tempfile the code under test makes; removed after,
    and checked to hold nothing but the test's own files."""
    directory = tempfile.mkdtemp(prefix="pq-test-2gb-")
    monkeypatch.setattr(tempfile, "tempdir", directory)
    try:
        yield directory
        assert sorted(os.listdir(directory)) == ["model"], "code under test left temp files"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_model_over_2gib_loads_and_runs(private_tmp):
    needed = 4 * _ROWS * _COLS * 4  # measured peak: about 3 copies of the weight
    if _available_bytes() < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free memory, only "
                    f"{_available_bytes() / 2**30:.1f} GiB available")
    if shutil.disk_usage(private_tmp).free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free disk in {private_tmp}")
    path = _write_big_matmul(os.path.join(private_tmp, "model"))
    model = load_model(path)
    weight = model.graph.initializer[0]
    assert weight.data_location == onnx.TensorProto.DEFAULT and not weight.external_data
    values = np.frombuffer(weight.raw_data, np.float32).reshape(_ROWS, _COLS)
    np.testing.assert_array_equal(values[[0, -1]], _row(np.array([0, _ROWS - 1])))
    del values
    assert tensor_shape(model, "y") == [1, _COLS]
    x = np.zeros((1, _ROWS), np.float32)
    x[0, 0], x[0, -1] = 1.0, 2.0
    got = ort_utils.run(ort_utils.make_session(model), {"x": x})[0]
    np.testing.assert_array_equal(got[0], _row(0) + 2 * _row(_ROWS - 1))


def _row(i: int | np.ndarray) -> np.ndarray:
    i = np.asarray(i)[..., None]
    return ((i % 7) + np.arange(_COLS) % 5).astype(np.float32)


def _write_big_matmul(directory: str) -> str:
    """y = x @ w with w (2 GiB+) written through a memmap, never held in memory whole."""
    os.makedirs(directory)
    data = np.memmap(os.path.join(directory, "w.bin"), np.float32, "w+", shape=(_ROWS, _COLS))
    for start in range(0, _ROWS, 1024):
        stop = min(start + 1024, _ROWS)
        data[start:stop] = _row(np.arange(start, stop))
    data.flush()
    del data
    model = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{_ROWS}] x) => (float[1,{_COLS}] y) {{
      y = MatMul(x, w)
    }}
    """)
    model.graph.initializer.append(_external("w", [_ROWS, _COLS], "w.bin"))
    path = os.path.join(directory, "model.onnx")
    onnx.save_model(model, path)
    return path


def test_duplicate_node_names_are_not_an_invalid_model():
    """onnxruntime refuses two nodes with one name; normalisation renames them, so the smoke run
    of check_runnable must not refuse such a model (common in hand-edited exports)."""
    from graph_passes.prepare import prepare_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Relu", ["a"], ["y"], name="same")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    check_runnable(model)
    prepared = prepare_model(model)
    assert [n.name for n in prepared.model.graph.node] == ["same", "Relu_1"]
    assert [n.name for n in model.graph.node] == ["same", "same"]  # the caller's model is untouched
