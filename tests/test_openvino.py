"""OpenVINO (CPU) as a second runtime: which of our exports it runs (README: "Runtimes"),
``prunequant evaluate --runtime openvino``, and the compress report's ``runtimes`` comparison.

The models are exported straight from plans (no training: a second each); what is compared is
OpenVINO against onnxruntime on the same file, not accuracy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from plugin.cli import main
from plugin import runtimes as openvino_rt
from plugin.runtimes import OpenVinoSession, compare_with_onnxruntime, unsupported_reason

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"

if not openvino_rt.openvino_available():  # in CI (PRUNEQUANT_CI=1) a missing openvino is a failure
    if os.environ.get("PRUNEQUANT_CI") == "1":
        raise RuntimeError("openvino is not installed but PRUNEQUANT_CI=1: install the dev extra")
    pytest.skip("openvino is not installed (pip install 'prunequant[openvino]')", allow_module_level=True)


@pytest.fixture(scope="module")
def space():
    from graph_passes.prepare import prepare_model
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(DIGITS / "model.onnx"))
    return prepared, SearchSpace(prepared.analysis, Precisions.parse("0,2,4,8", "2,4,8"))


@pytest.fixture(scope="module")
def test_inputs() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "test.npz") as data:
        return {"input": data["input"][:256]}


def _export(space, weight_bits, act_bits: int, opset: int | None = None) -> onnx.ModelProto:
    from graph_passes.batch import restore_dynamic_batch
    from graph_passes.qdq import ensure_opset
    from plugin.export import export_plan

    prepared, sp = space
    if weight_bits == "mixed":  # every layer mixes 8 and 4 bits per channel (Gather-merged branches)
        bits = {n: [(8, 4)[i % 2] for i in range(len(info.columns))] for n, info in sp.layers.items()}
    else:
        bits = {n: weight_bits for n in sp.layers}
    exported = export_plan(prepared.model, prepared.analysis, sp.plan(layer_bits=bits, site_bits=act_bits))
    model, restored = restore_dynamic_batch(exported.model)
    assert restored
    if opset is not None:
        model, _ = ensure_opset(model, opset)
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("weight_bits, act_bits, opset, min_agreement", [
    (8, 8, None, 0.99),
    (8, 8, 21, 0.99),
    (8, 8, 25, 0.99),
    (4, 8, None, 0.99),   # INT4 weights: opset 21
    (4, 8, 25, 0.99),
    ("mixed", 8, None, 0.99),
    (8, 4, None, 0.95),   # 4-bit activations: the runtimes round differently (measured 97.7%)
])
def test_openvino_runs_8_and_4_bit_exports(space, test_inputs, weight_bits, act_bits, opset, min_agreement):
    model = _export(space, weight_bits, act_bits, opset)
    if opset is not None:
        assert _opset(model) == opset
    assert unsupported_reason(model) is None
    result = compare_with_onnxruntime(model, test_inputs)
    assert result.status == "ok", result.reason
    assert result.samples == 256 and result.outputs[0]["name"] == "logits"
    assert result.top1_agreement_with_onnxruntime >= min_agreement
    assert 0 <= result.max_abs_diff and result.outputs[0]["max_rel_diff"] < 0.2


@pytest.mark.parametrize("weight_bits, act_bits, where", [(2, 8, "weight"), (8, 2, "input_zp"),
                                                           ("mixed2", 8, "weight")])
def test_2_bit_exports_are_refused_naming_the_type(space, test_inputs, weight_bits, act_bits, where):
    import openvino as ov

    if weight_bits == "mixed2":
        prepared, sp = space
        from graph_passes.batch import restore_dynamic_batch
        from plugin.export import export_plan

        bits = {n: [(8, 4, 2)[i % 3] for i in range(len(info.columns))] for n, info in sp.layers.items()}
        model, _ = restore_dynamic_batch(export_plan(prepared.model, prepared.analysis,
                                                     sp.plan(layer_bits=bits, site_bits=act_bits)).model)
    else:
        model = _export(space, weight_bits, act_bits)
    assert _opset(model) == 25
    # the README's claim: OpenVINO itself cannot read it ("Unsupported type" from a file, "Unsupported data type INT2" from bytes); when a new
    # OpenVINO can, this fails: update the README's table and UNREADABLE_TYPES
    with pytest.raises(RuntimeError, match="Unsupported (data )?type"):
        ov.Core().read_model(model.SerializeToString())
    reason = unsupported_reason(model)
    assert reason is not None and "tensor(int2)" in reason and where in reason
    result = compare_with_onnxruntime(model, test_inputs)
    assert result.status == "unsupported" and "int2" in result.reason
    from graph_passes.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="int2"):
        OpenVinoSession(model)


def test_comparison_never_raises(space, test_inputs, monkeypatch):
    model = _export(space, 8, 8)

    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/x.cpp:1:\nCheck 'false' failed\nsomething broke inside")

    monkeypatch.setattr(OpenVinoSession, "_compile", staticmethod(broken))
    result = compare_with_onnxruntime(model, test_inputs)
    assert result.status == "unsupported" and "something broke inside" in result.reason
    assert "Exception from" not in result.reason
    monkeypatch.setattr(openvino_rt, "openvino_available", lambda: False)
    assert compare_with_onnxruntime(model, test_inputs).status == "not installed"


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def model_files(space, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ov")
    out = {}
    for name, (wb, ab) in {"w8a8": (8, 8), "w2a8": (2, 8)}.items():
        out[name] = folder / f"{name}.onnx"
        onnx.save(_export(space, wb, ab), out[name])
    return out


def test_evaluate_with_openvino(model_files):
    import json

    code, stdout, err = _run("evaluate", model_files["w8a8"], "--data", DIGITS / "test.npz", "--runtime",
                             "openvino", "--reference", model_files["w8a8"], "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["runtime"] == "openvino" and result["samples"] == 540
    assert result["agreement"] >= 0.99 and 0 < result["max_rel_error"] < 0.1
    code, ort_out, err = _run("evaluate", model_files["w8a8"], "--data", DIGITS / "test.npz", "--json",
                              "--no-progress")
    assert code == 0 and json.loads(ort_out)["runtime"] == "onnxruntime"
    assert abs(json.loads(ort_out)["accuracy"] - result["accuracy"]) < 0.02


def test_evaluate_refuses_what_openvino_cannot_read_in_one_line(model_files):
    code, _, err = _run("evaluate", model_files["w2a8"], "--data", DIGITS / "test.npz", "--runtime", "openvino")
    lines = err.strip().splitlines()
    assert code == 5 and len(lines) == 1 and "tensor(int2)" in lines[0] and "DequantizeLinear" in lines[0], err


def test_evaluate_without_openvino_names_the_extra(model_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    code, _, err = _run("evaluate", model_files["w8a8"], "--data", DIGITS / "test.npz", "--runtime", "openvino")
    lines = err.strip().splitlines()
    assert code == 14 and len(lines) == 1 and "prunequant[openvino]" in lines[0], err


def test_unknown_runtime_is_a_usage_error(model_files):
    code, _, err = _run("evaluate", model_files["w8a8"], "--data", DIGITS / "test.npz", "--runtime", "tensorrt")
    assert code == 64 and "onnxruntime" in err


@pytest.mark.slow
def test_compress_report_compares_the_runtimes(tmp_path):
    """The report of a compress OpenVINO can run states its agreement; the gate stays onnxruntime's."""
    import json

    out = tmp_path / "w4.onnx"
    code, _, err = _run("compress", DIGITS / "model.onnx", "--data", DIGITS / "train.npz", "-o", out, "--strategy",
                        "uniform", "--weight-bits", "4", "--act-bits", "8", "--epochs", "1", "--finetune-epochs", "0",
                        "--no-progress")
    assert code == 0, err
    report = json.loads(out.with_name("w4.report.json").read_text())
    runtimes = report["runtimes"]
    assert runtimes["onnxruntime"]["role"] == "the gate"
    openvino = runtimes["openvino"]
    assert openvino["status"] == "ok", openvino
    assert openvino["samples"] == report["quality"]["held_out_samples"]
    assert openvino["top1_agreement_with_onnxruntime"] >= 0.97 and openvino["max_abs_diff"] >= 0
    assert "runtimes" in report["seconds"]
