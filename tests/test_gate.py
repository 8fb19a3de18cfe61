"""The one gate (graph_passes.gate): a multi-output and a regression model pass against their own
outputs; deliberately broken variants (wrong shape, NaN, one output off, checker failure) are
refused with a one-line VerificationError naming the output; fidelity figures on known arrays.

:func:`break_output` breaks one output of ANY model in one of the ways the gate must refuse; the
command-level tests (compress / export write nothing) use it on the exported model, e.g. by
wrapping ``plugin.export.export_plan``::

    from tests.test_gate import BREAKS, break_output
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.errors import VerificationError
from graph_passes.gate import fidelity, gate, jsonable, refusal_of, sqnr_db
from graph_passes.ort_utils import make_session, run_batched, run_model

ROOT = Path(__file__).resolve().parent.parent
N = 64
RNG = np.random.default_rng(0)
W_LOGITS = RNG.standard_normal((4, 10)).astype(np.float32)
W_HIDDEN = RNG.standard_normal((4, 8)).astype(np.float32)
W_REG = RNG.standard_normal((8, 3)).astype(np.float32)


def _model(nodes, inits, outputs, batch: int | str = "N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])], outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _out(name: str, shape: list | None, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def multi_output(reg_scale: float = 1.0, logits_tail=(), reg_tail=(), reg_shape=("N", 3),
                 batch: int | str = "N", extra_inits=None) -> onnx.ModelProto:
    """x -> logits [N, 10] (classifier head) and x -> Relu(x W) W' -> reg [N, 3] (regression)."""
    logits_src = "logits" if not logits_tail else "logits_raw"
    reg_src = "reg" if not reg_tail else "reg_raw"
    nodes = [helper.make_node("MatMul", ["x", "w_logits"], [logits_src], name="head_cls"),
             helper.make_node("MatMul", ["x", "w_hidden"], ["h"], name="hidden"),
             helper.make_node("Relu", ["h"], ["h_relu"]),
             helper.make_node("MatMul", ["h_relu", "w_reg"], [reg_src], name="head_reg"),
             *logits_tail, *reg_tail]
    inits = {"w_logits": W_LOGITS, "w_hidden": W_HIDDEN, "w_reg": W_REG * np.float32(reg_scale)}
    inits.update(extra_inits or {})
    shape = [batch if d == "N" else d for d in reg_shape] if reg_shape is not None else None
    return _model(nodes, inits, [_out("logits", [batch, 10]), _out("reg", shape)], batch)


def regression(scale: float = 1.0) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w_hidden"], ["h"], name="hidden"),
             helper.make_node("Relu", ["h"], ["h_relu"]),
             helper.make_node("MatMul", ["h_relu", "w_reg"], ["y"], name="head")]
    return _model(nodes, {"w_hidden": W_HIDDEN, "w_reg": W_REG * np.float32(scale)}, [_out("y", ["N", 3])])


def feeds(n: int = N, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)}


def outputs_of(model: onnx.ModelProto, f: dict[str, np.ndarray], batch: int | None = None):
    return run_batched(make_session(model), f, batch)


def _assert_one_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("nothing was written"), text
    return text


#: the ways :func:`break_output` breaks an output, and what the gate's message then says
BREAKS: dict[str, str] = {
    "scale": "differs from the reference",       # numerically off (x 1.5): SQNR 6 dB
    "nan": "NaN or Inf",                         # NaN values
    "shape": "has shape",                        # one element fewer on the last axis
    "shapeless": "Field 'shape' of 'type' is required but missing",  # the checker refuses
}


def break_output(model: onnx.ModelProto, output: str | int = 0, how: str = "scale",
                 factor: float = 1.5) -> onnx.ModelProto:
    """A copy of ``model`` with one graph output broken (see :data:`BREAKS`); the other outputs
    and every internal reader of the tensor keep the original values."""
    if how not in BREAKS:
        raise ValueError(f"how must be one of {sorted(BREAKS)}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    g = work.graph
    out = g.output[output] if isinstance(output, int) else next(o for o in g.output if o.name == output)
    name, pre = out.name, out.name + "_before_break"
    if how == "shapeless":
        out.type.tensor_type.ClearField("shape")
        return work
    for node in g.node:
        node.input[:] = [pre if i == name else i for i in node.input]
        node.output[:] = [pre if o == name else o for o in node.output]
    kept = [v for v in g.value_info if v.name != name]
    del g.value_info[:]
    g.value_info.extend(kept)
    if how == "scale":
        g.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), pre + "_k"))
        g.node.append(helper.make_node("Mul", [pre, pre + "_k"], [name]))
    elif how == "nan":
        g.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), pre + "_k"))
        g.node.append(helper.make_node("Add", [pre, pre + "_k"], [name]))
    else:  # shape: drop the last element of the last axis
        last = out.type.tensor_type.shape.dim[-1]
        ends = np.array([-1], np.int64)
        for k, v in {"_s": np.array([0], np.int64), "_e": ends, "_a": np.array([-1], np.int64)}.items():
            g.initializer.append(numpy_helper.from_array(v, pre + k))
        g.node.append(helper.make_node("Slice", [pre, pre + "_s", pre + "_e", pre + "_a"], [name]))
        if last.HasField("dim_value"):
            last.dim_value -= 1
    return work


# --- passing models -------------------------------------------------------------------------

def test_multi_output_model_passes_against_its_own_outputs():
    model, f = multi_output(), feeds()
    report = gate(model, f, outputs_of(model, f), classifier={"logits"})
    assert report.samples == N and report.batch is None
    assert [o.name for o in report.plain] == ["logits", "reg"] == [o.name for o in report.optimized]
    assert all(o.sqnr_db == math.inf and o.rel_rmse == 0.0 for o in report.plain)
    assert report.plain[0].top1_agreement == 100.0 and report.plain[1].top1_agreement is None
    assert report.optimized[1].sqnr_db > 100  # ORT_ENABLE_ALL on a float model: float rounding
    # JSON-able: asdict for Python, to_json for strict JSON (inf as a string)
    assert dataclasses.asdict(report)["plain"][1]["name"] == "reg"
    text = json.dumps(report.to_json(), allow_nan=False)
    assert '"inf"' in text


def test_reference_by_name_and_user_names():
    model, f = multi_output(), feeds()
    logits, reg = outputs_of(model, f)
    report = gate(model, f, {"reg": reg, "logits": logits}, names=["class scores", "box"])
    assert [o.name for o in report.plain] == ["class scores", "box"]
    # auto-detection: both are 2-D float [N, C > 1] outputs
    assert report.plain[0].top1_agreement == report.plain[1].top1_agreement == 100.0


def test_regression_model_passes():
    model, f = regression(), feeds()
    report = gate(model, f, outputs_of(model, f), classifier=False)
    assert len(report.plain) == 1 and report.plain[0].shape == [N, 3]
    assert report.plain[0].top1_agreement is None
    (y,) = outputs_of(model, f)
    assert gate(model, f, y, classifier=False).plain[0].sqnr_db == math.inf  # one array, one output


def test_batch_fixed_to_one_runs_sample_by_sample():
    model, f = multi_output(batch=1), feeds(5)
    with pytest.raises(Exception):  # the model cannot take 5 samples at once
        make_session(model).run(None, f)
    report = gate(model, f, outputs_of(model, f, batch=1))
    assert report.batch == 1 and report.plain[0].shape == [5, 10]


def test_explicit_batch():
    model, f = multi_output(), feeds(10)
    assert gate(model, f, outputs_of(model, f), batch=4).batch == 4


# --- broken exports are refused ----------------------------------------------------------------

def test_wrong_output_shape_is_refused():
    model, f = multi_output(), feeds()
    reference = outputs_of(model, f)
    tail = [helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])),
            helper.make_node("Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [2])),
            helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
            helper.make_node("Slice", ["reg_raw", "starts", "ends", "axes"], ["reg"])]
    broken = multi_output(reg_tail=tail, reg_shape=("N", 2))
    text = _assert_one_line(refusal_of(broken, f, reference))
    assert "'reg'" in text and "shape [64, 2]" in text and "[64, 3]" in text


def test_nan_output_is_refused():
    model, f = multi_output(), feeds()
    reference = outputs_of(model, f)
    tail = [helper.make_node("Div", ["logits_raw", "zero"], ["logits"])]
    broken = multi_output(logits_tail=tail, extra_inits={"zero": np.zeros((1,), np.float32)})
    text = _assert_one_line(refusal_of(broken, f, reference))
    assert "'logits'" in text and "NaN or Inf" in text


def test_sqrt_of_negative_is_refused():
    model, f = regression(), feeds()
    reference = outputs_of(model, f)
    broken = regression()
    broken.graph.node[-1].output[0] = "y_raw"
    broken.graph.node.extend([helper.make_node("Neg", ["y_raw"], ["y_neg"]),
                              helper.make_node("Abs", ["y_neg"], ["y_abs"]),
                              helper.make_node("Neg", ["y_abs"], ["y_nonpos"]),
                              helper.make_node("Sqrt", ["y_nonpos"], ["y"])])
    text = _assert_one_line(refusal_of(broken, f, reference))
    assert "'y'" in text and "NaN or Inf" in text


def test_one_output_numerically_off_is_named():
    model, f = multi_output(), feeds()
    reference = outputs_of(model, f)
    exc = refusal_of(multi_output(reg_scale=1.5), f, reference)
    text = _assert_one_line(exc)
    assert isinstance(exc, VerificationError) and exc.exit_code == 7
    assert "output 'reg'" in text and "'logits'" not in text
    assert "SQNR 6.0 dB < 40 dB" in text  # 10 log10(1 / 0.5^2)


def test_regression_model_numerically_off_is_refused():
    model, f = regression(), feeds()
    text = _assert_one_line(refusal_of(regression(scale=1.02), f, outputs_of(model, f)))
    assert "output 'y'" in text and "SQNR 34.0 dB < 40 dB" in text  # 10 log10(1 / 0.02^2)
    gate(regression(scale=1.001), f, outputs_of(model, f))  # 60 dB passes


def test_optimized_bound_applies_to_ort_enable_all():
    model, f = regression(), feeds()
    report = gate(model, f, outputs_of(regression(scale=1.01), f), min_sqnr_db=30)
    assert 39 < report.plain[0].sqnr_db < 41 and 39 < report.optimized[0].sqnr_db < 41
    text = _assert_one_line(refusal_of(model, f, outputs_of(regression(scale=1.01), f),
                                       min_sqnr_db=30, min_sqnr_db_optimized=45))
    assert "with ORT_ENABLE_ALL" in text and "'y'" in text


def test_checker_failure_is_refused():
    model, f = multi_output(), feeds()
    reference = outputs_of(model, f)
    broken = multi_output()
    broken.graph.node[0].input[1] = "no_such_weight"
    text = _assert_one_line(refusal_of(broken, f, reference))
    assert "fails the onnx checker" in text


def test_output_without_shape_is_refused_by_the_checker():
    """The real-world failure of issue 9: a graph output with a type but no shape."""
    model, f = multi_output(), feeds()
    text = _assert_one_line(refusal_of(multi_output(reg_shape=None), f, outputs_of(model, f)))
    assert "fails the onnx checker: Field 'shape' of 'type' is required but missing" in text


def test_strict_shape_inference_failure_is_refused():
    """Declared output shape that contradicts inference: only full_check (strict) sees it."""
    model, f = multi_output(), feeds()
    broken = multi_output(reg_shape=("N", 7))
    onnx.checker.check_model(broken)  # the plain checker is happy
    assert "fails the onnx checker" in str(refusal_of(broken, f, outputs_of(model, f)))


def test_top1_disagreement_is_refused():
    model, f = multi_output(), feeds(200)
    swapped = multi_output()
    w = W_LOGITS.copy()
    w[:, [0, 1]] = w[:, [1, 0]]
    swapped.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w_logits"))
    text = _assert_one_line(refusal_of(swapped, f, outputs_of(model, f), min_sqnr_db=-math.inf,
                                       min_sqnr_db_optimized=-math.inf))
    assert "output 'logits'" in text and "top-1" in text


def test_output_count_mismatch_is_refused():
    model, f = multi_output(), feeds()
    text = _assert_one_line(refusal_of(model, f, outputs_of(model, f)[:1]))
    assert "2 outputs" in text


def test_nan_reference_is_refused():
    model, f = regression(), feeds()
    ref = outputs_of(model, f)
    ref[0][0, 0] = np.nan
    assert "reference output 'y'" in str(refusal_of(model, f, ref))


def test_all_zero_reference():
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    f = feeds()
    zero = _model(nodes, {"k": np.zeros((1,), np.float32)}, [_out("y", ["N", 4])])
    report = gate(zero, f, [np.zeros((N, 4), np.float32)])
    assert report.plain[0].sqnr_db == math.inf
    small = _model(nodes, {"k": np.full((1,), 1e-9, np.float32)}, [_out("y", ["N", 4])])
    assert gate(small, f, [np.zeros((N, 4), np.float32)]).plain[0].sqnr_db == -math.inf
    big = _model(nodes, {"k": np.full((1,), 1e-3, np.float32)}, [_out("y", ["N", 4])])
    text = _assert_one_line(refusal_of(big, f, [np.zeros((N, 4), np.float32)]))
    assert "reference is all zero" in text


def test_reference_within_zero_atol_of_zero_takes_the_absolute_bound():
    """A reference with no signal above zero_atol (PP-OCRv4 det's probability map on random inputs
    peaks at ~1e-19): its SQNR is rounding noise; the output passes when it is as small."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    f = feeds()
    ref = [outputs_of(_model(nodes, {"k": np.full((1,), 1e-20, np.float32)}, [_out("y", ["N", 4])]), f)[0]]
    tiny = _model(nodes, {"k": np.full((1,), 3e-20, np.float32)}, [_out("y", ["N", 4])])
    assert gate(tiny, f, ref).plain[0].sqnr_db < 0  # relative figures say nothing here
    big = _model(nodes, {"k": np.full((1,), 1e-3, np.float32)}, [_out("y", ["N", 4])])
    text = _assert_one_line(refusal_of(big, f, ref))
    assert "reference is zero within" in text


def test_integer_output_element_agreement():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    model = _model(nodes, {"w": W_LOGITS}, [_out("label", ["N"], TensorProto.INT64)])
    f = feeds(100)
    (labels,) = outputs_of(model, f)
    report = gate(model, f, [labels])
    assert report.plain[0].element_agreement == 100.0 and report.plain[0].sqnr_db is None
    wrong = labels.copy()
    wrong[:5] = (wrong[:5] + 1) % 10
    text = _assert_one_line(refusal_of(model, f, [wrong]))
    assert "95.00% of its elements" in text


@pytest.mark.parametrize("how", sorted(BREAKS))
@pytest.mark.parametrize("which", ["logits", "reg"])
def test_break_output_on_the_multi_output_model(how, which):
    model, f = multi_output(), feeds()
    exc = refusal_of(break_output(model, which, how), f, outputs_of(model, f))
    text = _assert_one_line(exc)
    assert BREAKS[how] in text
    if how != "shapeless":  # the checker names no output
        assert f"output {which!r}" in text
        other = "reg" if which == "logits" else "logits"
        assert repr(other) not in text


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_break_output_on_the_regression_model(how):
    model, f = regression(), feeds()
    text = _assert_one_line(refusal_of(break_output(model, 0, how), f, outputs_of(model, f)))
    assert BREAKS[how] in text


@pytest.fixture(scope="module")
def digits_qdq():
    """A real QDQ export of the digits sample (every width, mixed layers; no torch needed)."""
    from graph_passes.prepare import prepare_model
    from graph_passes.qdq import ActivationQuant, WeightQuant, insert_qdq

    prepared = prepare_model(str(ROOT / "samples" / "digits" / "model.onnx"))
    weights = {layer.name: WeightQuant(tuple((8, 4, 2)[i % 3] for i in range(layer.out_channels)))
               for layer in prepared.analysis.layers}
    acts = {site.tensor: ActivationQuant(4, not site.non_negative, 0.4, tuple(site.consumers))
            for site in prepared.analysis.sites}
    model = insert_qdq(prepared.model, weights, acts).model
    data = np.load(ROOT / "samples" / "digits" / "test.npz")
    name = model.graph.input[0].name
    f = {name: data["input"][:32]}
    return model, f


def test_real_qdq_export_passes_and_broken_ones_are_refused(digits_qdq):
    model, f = digits_qdq
    reference = run_model(model, f)
    report = gate(model, f, reference)
    assert report.batch == 1 and report.samples == 32  # the sample's batch is fixed to 1
    assert report.plain[0].sqnr_db == math.inf and report.plain[0].top1_agreement == 100.0
    for how, expected in BREAKS.items():
        assert expected in _assert_one_line(refusal_of(break_output(model, 0, how), f, reference))


# --- fidelity (reported, not gated) --------------------------------------------------------------

def test_fidelity_known_sqnr():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((1000, 10))
    noise = rng.standard_normal(ref.shape)
    noise *= math.sqrt(0.01 * np.sum(ref**2) / np.sum(noise**2))  # noise energy 1% -> 20 dB
    reg = rng.standard_normal((1000, 3)).astype(np.float32)
    (cls, box) = fidelity([ref + noise, reg * 2], [ref, reg], ["cls", "box"], classifier={"cls"})
    assert cls.sqnr_db == pytest.approx(20.0, abs=1e-9)
    assert cls.rel_rmse == pytest.approx(0.1, rel=1e-9)
    assert cls.max_abs_error == pytest.approx(np.max(np.abs(noise)))
    expected_top1 = 100 * np.mean((ref + noise).argmax(1) == ref.argmax(1))
    assert cls.top1_agreement == pytest.approx(expected_top1) and 50 < expected_top1 < 100
    assert box.top1_agreement is None
    assert box.sqnr_db == pytest.approx(0.0, abs=1e-6) and box.rel_rmse == pytest.approx(1.0)


def test_fidelity_edge_cases():
    z = np.zeros((4, 2))
    same, zero_ref, shape, nan, ints = fidelity(
        [np.ones(3), np.ones((4, 2)), np.ones((4, 3)), np.array([np.nan, 1.0]), np.array([1, 2, 3, 4])],
        [np.ones(3), z, z, np.ones(2), np.array([1, 2, 0, 4])], ["a", "b", "c", "d", "e"])
    assert same.sqnr_db == math.inf and same.rel_rmse == 0.0
    assert zero_ref.sqnr_db == -math.inf and zero_ref.rel_rmse == math.inf
    assert shape.sqnr_db is None and "differs" in shape.note
    assert nan.sqnr_db is None and "NaN" in nan.note
    assert ints.element_agreement == 75.0
    assert sqnr_db(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == math.inf
    text = json.dumps(jsonable([dataclasses.asdict(f) for f in (same, zero_ref)]), allow_nan=False)
    assert '"sqnr_db": "inf"' in text and '"sqnr_db": "-inf"' in text
