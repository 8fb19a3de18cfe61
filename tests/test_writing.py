"""write_outputs / check_output_path: atomic, all-or-nothing, clear errors."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest

import graph_passes.writing as writing
from graph_passes.errors import OutputError
from graph_passes.writing import check_output_path, write_outputs

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) { y = Relu (x) }"""


@pytest.fixture
def model() -> onnx.ModelProto:
    return onnx.parser.parse_model(TEXT)


def sidecars() -> dict[str, str | bytes]:
    return {"plan.json": json.dumps({"version": 1}), "report.json": b'{"ok": true}'}


def test_writes_model_and_sidecars(tmp_path, model):
    result = write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "plan.json", "report.json"]
    assert onnx.load(str(tmp_path / "out.onnx")) == model
    assert json.loads((tmp_path / "plan.json").read_text()) == {"version": 1}
    assert result.files[tmp_path / "out.onnx"] == model.ByteSize()


def test_overwrites_existing_files(tmp_path, model):
    (tmp_path / "out.onnx").write_bytes(b"old")
    (tmp_path / "plan.json").write_text("old")
    write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert onnx.load(str(tmp_path / "out.onnx")) == model
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "plan.json", "report.json"]


def test_missing_directory(tmp_path, model):
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "out.onnx")
    with pytest.raises(OutputError, match="does not exist"):
        write_outputs(tmp_path / "nope" / "out.onnx", model)
    assert os.listdir(tmp_path) == []


def test_path_is_a_directory(tmp_path, model):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_outputs(tmp_path / "d", model)
    assert os.listdir(tmp_path) == ["d"]


def test_bad_sidecar_name(tmp_path, model):
    with pytest.raises(OutputError, match="plain file name"):
        write_outputs(tmp_path / "out.onnx", model, {"../evil.json": "x"})
    with pytest.raises(OutputError, match="collides"):
        write_outputs(tmp_path / "out.onnx", model, {"out.onnx": "x"})
    assert os.listdir(tmp_path) == []


def test_read_only_directory(tmp_path, model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK) or os.geteuid() == 0:
            pytest.skip("running as root: chmod does not block writes (see the failing-replace "
                        "tests for the all-or-nothing proof)")
        with pytest.raises(OutputError, match="cannot write"):
            check_output_path(ro / "out.onnx")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(stat.S_IRWXU)


def test_unwritable_directory_as_root_is_detected(tmp_path, model, monkeypatch):
    """As root chmod does not block writes; make the probe fail the way a read-only dir does."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(writing.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot write to output directory .*Permission denied"):
        write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failing_replace_leaves_nothing(tmp_path, model, monkeypatch, fail_at):
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(30, "Read-only file system")
        return real(src, dst)
    monkeypatch.setattr(writing.os, "replace", flaky)
    with pytest.raises(OutputError, match="nothing was written.*Read-only file system"):
        write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert os.listdir(tmp_path) == []


def test_failure_restores_previous_files(tmp_path, model, monkeypatch):
    (tmp_path / "plan.json").write_text("previous plan")
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:  # plan moved aside, new plan placed, report placed, then the model
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(writing.os, "replace", flaky)
    with pytest.raises(OutputError, match="No space left"):
        write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert os.listdir(tmp_path) == ["plan.json"]
    assert (tmp_path / "plan.json").read_text() == "previous plan"


@pytest.mark.parametrize("where", ["stage", "commit"])
def test_keyboard_interrupt_leaves_nothing(tmp_path, model, monkeypatch, where):
    if where == "stage":
        real_write = writing._write_bytes
        calls = {"n": 0}

        def interrupted(path, data):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            real_write(path, data)
        monkeypatch.setattr(writing, "_write_bytes", interrupted)
    else:
        real = os.replace
        calls = {"n": 0}

        def interrupted(src, dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(src, dst)
        monkeypatch.setattr(writing.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "out.onnx", model, sidecars())
    assert os.listdir(tmp_path) == []


def test_large_model_goes_through_external_data(tmp_path, model, monkeypatch):
    monkeypatch.setattr(writing, "fits_in_protobuf", lambda m: False)
    big = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,300] x) => (float[2,300] y) { y = Add (x, B) }""")
    big.graph.initializer.append(onnx.numpy_helper.from_array(
        np.ones(300, dtype=np.float32), "B"))
    write_outputs(tmp_path / "big.onnx", big, {"plan.json": "{}"})
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "plan.json"]
    loaded = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert loaded.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    assert big.graph.initializer[0].data_location != onnx.TensorProto.EXTERNAL  # caller's intact
