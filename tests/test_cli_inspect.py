"""`prunequant inspect` end to end, and the bad-input list: one clear line, exit code != 0,
no traceback, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits" / "model.onnx"

CONV_TEXT = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[{dims}] x) => (float[1,4,4,4] y) {{
  t = Conv <pads=[1,1,1,1]> (x, w)
  y = Relu(t)
}}
"""


def _conv_model(opset: int = 17, dims: str = "1,3,4,4") -> onnx.ModelProto:
    model = onnx.parser.parse_model(CONV_TEXT.format(opset=opset, dims=dims))
    w = np.random.default_rng(0).standard_normal([4, 3, 3, 3]).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return model


def _invoke(*args: str):
    result = CliRunner().invoke(main, ["inspect", *args])
    return result.exit_code, result.stdout, result.stderr


def _assert_clean_error(tmp_path: Path, before: set, code: int, out: str, err: str, needle: str):
    assert code not in (0, 1, 70), f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err + out
    assert set(os.listdir(tmp_path)) == before, "something was written"


def test_inspect_digits_text_and_json():
    code, out, err = _invoke(str(DIGITS), "--no-bridge")
    assert code == 0, err
    assert "6 weight layers" in out and "4 prunable" in out and "reaches graph output 'logits'" in out
    code, out, _ = _invoke(str(DIGITS), "--json", "--no-bridge")
    report = json.loads(out)
    assert report["totals"]["weight_layers"] == 6
    assert report["totals"]["conv_prunable_share"] == 1.0
    assert report["normalisation"]["max_rel_error"] <= 1e-4
    assert {g["id"] for g in report["groups"] if not g["prunable"]} == {"g4"}


def test_inspect_reports_the_bridge():
    code, out, _ = _invoke(str(DIGITS), "--json")
    assert code == 0
    bridge = json.loads(out)["bridge"]
    assert bridge["ok"] and bridge["max_rel_error"] <= 1e-4


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _bad_inputs(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    good = _conv_model().SerializeToString()
    cases = [
        ("missing", [str(tmp_path / "nope.onnx")], "nope.onnx"),
        ("empty", [str(_write(tmp_path, "empty.onnx", b""))], "empty"),
        ("text", [str(_write(tmp_path, "text.onnx", b"hello, this is not a model\n" * 20))], "not an ONNX model"),
        ("jpeg", [str(_write(tmp_path, "photo.onnx", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(300)))], "JPEG"),
        ("truncated", [str(_write(tmp_path, "trunc.onnx", good[: len(good) // 2]))], "trunc.onnx"),
    ]
    broken = _conv_model()
    broken.graph.node[1].input[0] = "undefined_tensor"
    cases.append(("checker", [str(_write(tmp_path, "broken.onnx", broken.SerializeToString()))], "checker"))
    future = _conv_model()
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    cases.append(("opset", [str(_write(tmp_path, "future.onnx", future.SerializeToString()))], "opset"))
    symbolic = _conv_model(dims="1,3,h,w")
    cases.append(("symbolic", [str(_write(tmp_path, "sym.onnx", symbolic.SerializeToString()))], "--input-shape"))
    custom = _conv_model()
    custom.graph.node[1].op_type, custom.graph.node[1].domain = "Twice", "my.ops"
    custom.opset_import.append(helper.make_opsetid("my.ops", 1))
    cases.append(("custom", [str(_write(tmp_path, "custom.onnx", custom.SerializeToString()))], "my.ops"))
    for label, location in (("missing-data", "weights.bin"), ("escaping-data", "../outside.bin")):
        ext = _conv_model()
        tensor = ext.graph.initializer[0]
        raw_len = len(tensor.SerializeToString())
        tensor.ClearField("float_data")
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(4 * 4 * 3 * 9))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        assert raw_len
        cases.append((label, [str(_write(tmp_path, f"{label}.onnx", ext.SerializeToString()))], location.split("/")[-1]))
    cases.append(("bad-shape-flag", [str(_write(tmp_path, "ok.onnx", good)), "--input-shape", "x=1xAx4x4"], "x=1xAx4x4"))
    return cases


def test_bad_inputs_fail_cleanly(tmp_path):
    cases = _bad_inputs(tmp_path)
    before = set(os.listdir(tmp_path))
    for label, args, needle in cases:
        code, out, err = _invoke(*args, "--no-bridge")
        try:
            _assert_clean_error(tmp_path, before, code, out, err, needle)
        except AssertionError as exc:
            raise AssertionError(f"case {label}: {exc}") from None


def test_control_flow_is_analysed_as_blocking_not_crashing(tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x, bool c) => (float[1,4,4,4] y) {
      t = Conv <pads=[1,1,1,1]> (x, w)
      y = If (c) <then_branch = g1 () => (float[1,4,4,4] o1) { o1 = Relu(t) },
                  else_branch = g2 () => (float[1,4,4,4] o2) { o2 = Sigmoid(t) }>
    }
    """)
    model.graph.initializer.append(numpy_helper.from_array(np.ones([4, 3, 3, 3], np.float32), "w"))
    path = _write(tmp_path, "if.onnx", model.SerializeToString())
    code, out, err = _invoke(str(path), "--json", "--no-bridge")
    assert code == 0, err
    group = json.loads(out)["groups"][0]
    assert not group["prunable"] and any("control flow" in r for r in group["reasons"])


def test_console_script_runs_as_a_process(tmp_path):
    """The installed entry point, as a pipeline would call it: exit codes and streams."""
    exe = Path(sys.executable).with_name("prunequant")
    if not exe.exists():
        pytest.fail(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(exe), "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "missing.onnx" in proc.stderr
